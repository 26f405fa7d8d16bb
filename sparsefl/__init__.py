"""sparsefl: sparse federated learning on fused kernels."""

from sparsefl import (
    _native,  # noqa: F401  (loads the native kernels, or warns once)
    ops,
    optim,
)

__version__ = "0.1.0"
__all__ = ["ops", "optim", "__version__"]
