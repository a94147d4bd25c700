"""Deprecated alias of :mod:`locakd.experiments` (kept for one release).

``locakd.benchmarks.<module>`` re-exports ``locakd.experiments.<module>`` for ``runner``,
``stats``, ``plots`` and ``mnist1d``. The MNIST-1D suite program is no longer part of the
library: it is ``benchmarks/mnist1d/suite.py`` in the repository.
"""

import warnings

from ..experiments import *  # noqa: F403 - the alias re-exports everything
from ..experiments import __all__  # noqa: F401

warnings.warn(
    "locakd.benchmarks is deprecated; import locakd.experiments instead", DeprecationWarning, stacklevel=2
)
