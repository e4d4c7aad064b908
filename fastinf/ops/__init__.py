"""The kernel layer: fused contractions over factored per-example gradients.

Each op validates its inputs, runs the backend and contraction order that the one dispatch table
(:mod:`fastinf.ops._dispatch`: cost models, CPU rules, backend order) picks, and is registered as
a ``torch.library`` custom op (``torch.ops.fastinf.<op>``) so that code using it still traces.

Backends (``backend=``): ``"reference"`` (pure torch, float64-capable), ``"torch"`` (the best
torch formulation), ``"cpu"`` (C++ kernel where it measured faster than torch, torch otherwise),
``"cpp"`` (the C++ kernel, forced), ``"triton"``, ``"cuda"``; None picks the fastest usable.

``fastinf.ops.<op>`` is the op's function; its module (torch formulations, ``validate``,
``CONTRACTIONS``) is reached with ``from fastinf.ops.<op> import name`` — the import system looks
modules up in ``sys.modules``, so the function bound here does not hide them.
"""
from .._native import BACKENDS
from ._dispatch import flops, plan
from .ekfac_lambda import ekfac_lambda, ekfac_lambda_reference
from .jl_project import jl_project, jl_project_reference
from .kron_project import kron_project, kron_project_reference
from .score_dense import score_dense, score_dense_reference
from .score_factored import score_factored, score_factored_reference

__all__ = [
    "score_factored", "score_factored_reference", "score_dense", "score_dense_reference",
    "ekfac_lambda", "ekfac_lambda_reference", "kron_project", "kron_project_reference",
    "jl_project", "jl_project_reference", "BACKENDS", "flops", "plan",
]
