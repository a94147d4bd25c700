"""The MNIST-1D distillation benchmark suite (see ``--help`` and BENCHMARKS_mnist1d.md).

    .venv/bin/python benchmarks/mnist1d/run_suite.py --out bench_out/mnist1d
    .venv/bin/python benchmarks/mnist1d/run_suite.py --quick

The program is ``suite.py`` next to this file; this is only its entry point (worker
processes are started with ``spawn``, hence the ``__main__`` guard).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import main  # noqa: E402 - found through the line above

if __name__ == "__main__":
    sys.exit(main())
