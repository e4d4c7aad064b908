"""fastinf: fast TracIn and EK-FAC influence functions over fused kernels."""
from ._native import backends
from . import ops

__version__ = "0.1.0"
__all__ = ["backends", "ops", "__version__"]

# --- tracin
from .tracin import KroneckerProjection, RandomProjection, TracIn  # noqa: E402

__all__ += ["TracIn", "KroneckerProjection", "RandomProjection"]
