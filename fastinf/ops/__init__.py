"""The kernel layer: fused contractions over factored per-example gradients.

Each op validates its inputs, picks a backend (``reference``, ``torch``, ``cpu``, ``triton``,
``cuda``) and a contraction order by a cost model, and is registered as a ``torch.library``
custom op (``torch.ops.fastinf.<op>``) so that code using it still traces.
"""
from .ekfac_lambda import ekfac_lambda, ekfac_lambda_reference
from .jl_project import jl_project, jl_project_reference
from .kron_project import kron_project, kron_project_reference
from .score_dense import score_dense, score_dense_reference
from .score_factored import score_factored, score_factored_reference

__all__ = [
    "score_factored", "score_factored_reference", "score_dense", "score_dense_reference",
    "ekfac_lambda", "ekfac_lambda_reference", "kron_project", "kron_project_reference",
    "jl_project", "jl_project_reference",
]
