"""fastinf: fast TracIn and EK-FAC influence functions over fused kernels."""
from ._native import backends
from . import ops
from .capture import NonFiniteError
from .ekfac import EKFAC
from .scoring import GradientStore
from .store import StoreError
from .tracin import KroneckerProjection, RandomProjection, TracIn
from . import integrations  # Kronfluence / TRAK bridges (they import no peer library)
from . import selection
from .ensemble import Ensemble

__version__ = "0.1.0"
__all__ = ["backends", "ops", "integrations", "EKFAC", "TracIn", "KroneckerProjection",
           "RandomProjection", "GradientStore", "StoreError", "NonFiniteError", "__version__",
           "Ensemble", "selection"]
