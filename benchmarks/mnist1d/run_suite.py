"""The MNIST-1D distillation benchmark suite (see ``--help`` and BENCHMARKS.md).

    .venv/bin/python benchmarks/mnist1d/run_suite.py --out bench_out/mnist1d
    .venv/bin/python benchmarks/mnist1d/run_suite.py --quick

The code lives in :mod:`locakd.benchmarks.mnist1d_suite`; this file is only its entry point
(worker processes are started with ``spawn``, hence the ``__main__`` guard).
"""

import sys

from locakd.benchmarks.mnist1d_suite import main

if __name__ == "__main__":
    sys.exit(main())
