"""fastinf: fast TracIn and EK-FAC influence functions over fused kernels."""
from ._native import backends
from . import ops
from .capture import NonFiniteError
from .ekfac import EKFAC
from .tracin import KroneckerProjection, RandomProjection, TracIn
from .store import GradientStore, StoreError

__version__ = "0.1.0"
__all__ = ["backends", "ops", "EKFAC", "TracIn", "KroneckerProjection", "RandomProjection",
           "NonFiniteError", "GradientStore", "StoreError", "__version__"]
