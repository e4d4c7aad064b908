"""A TRAK projector over :func:`fastinf.ops.jl_project`: a drop-in for TRAK's ``CudaProjector``.

TRAK (``trak/projectors.py``) calls ``projector.project(grads, model_id)`` with ``grads`` a
``[B, grad_dim]`` tensor or a dict ``{param_name: [B, ...]}`` of per-example gradients, which it
flattens and concatenates in dict order (its ``vectorize``). :class:`Projector` does the same, on
the CPU or a GPU, for any ``proj_dim`` (``fast_jl`` kernels need a multiple of 512), without
``fast_jl`` or TRAK installed.

**Scaling.** TRAK's projections are *unnormalised*: the entries of its matrix are ±1 (Rademacher)
or N(0, 1), so features have norm ≈ √proj_dim·‖g‖. ``fastinf.ops.jl_project`` scales by 1/√k
(norm-preserving). The projector matches TRAK: it returns ``√proj_dim · jl_project(g)``
(``normalize=True`` gives fastinf's norm-preserving features instead).

**Randomness.** The matrix of ``(seed, model_id)`` is that of ``jl_project`` with seed
``seed_for(model_id) = (model_id << 32) | (seed mod 2³²)``: deterministic, identical on every
device and backend, distinct for distinct ``(seed, model_id)`` pairs (TRAK's own
``seed + 10⁴·model_id`` collides, e.g. (10⁴, 0) and (0, 1)); ``model_id=0`` gives
``jl_project(..., seed=seed)`` exactly. The matrices differ from ``fast_jl``'s (another
generator), so features are not interchangeable with ones TRAK projected, only equally distributed.

**Dtypes.** Output dtype = input dtype (float64 input is projected and returned in float32, as
TRAK's CudaProjector downcasts it); accumulation is float32.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch

from ..ops.jl_project import KINDS, jl_project

try:  # a real subclass when TRAK is installed (isinstance checks pass); never required
    from trak.projectors import AbstractProjector as _Base  # type: ignore
except Exception:  # pragma: no cover - TRAK absent
    _Base = object

__all__ = ["Projector", "vectorize"]


def _kind(proj_type) -> str:
    """"rademacher"/"normal" from a string or TRAK's ``ProjectionType`` (by value or name)."""
    for cand in (getattr(proj_type, "value", None), getattr(proj_type, "name", None), proj_type):
        if isinstance(cand, str) and cand.lower() in KINDS:
            return cand.lower()
    raise ValueError(f"proj_type {proj_type!r} not recognized; expected 'rademacher' or 'normal' "
                     "(or TRAK's ProjectionType)")


def vectorize(grads: Dict[str, torch.Tensor], device=None) -> torch.Tensor:
    """``[B, Σ params]``: every ``[B, ...]`` entry flattened per example, concatenated in dict
    order (TRAK's ``vectorize``; 1-D entries are one value per example)."""
    if not grads:
        raise ValueError("Projector.project: grads is an empty dict")
    vals = list(grads.values())
    B = vals[0].shape[0]
    for k, v in grads.items():
        if not isinstance(v, torch.Tensor) or v.dim() < 1 or v.shape[0] != B:
            raise ValueError(f"Projector.project: grads[{k!r}] must be a [B={B}, ...] tensor, got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
    out = torch.cat([v.detach().reshape(B, -1) for v in vals], dim=1)
    return out if device is None else out.to(device)


class Projector(_Base):
    """TRAK's projector interface (``AbstractProjector``) over ``fastinf.ops.jl_project``.

    Args:
        grad_dim: number of parameters (columns of the flattened gradients; checked).
        proj_dim: output dimension, any positive int.
        seed: random seed of the projection.
        proj_type: ``"rademacher"``, ``"normal"`` or TRAK's ``ProjectionType``.
        device: where dict gradients are assembled; tensors are projected on their own device.
        block_size, dtype, max_batch_size: accepted for compatibility with TRAK's projectors,
            unused (fastinf tiles by its workspace; the output dtype follows the input).
        normalize: False (default) matches TRAK's unnormalised scale; True divides by √proj_dim.
        backend: a ``jl_project`` backend, None for the fastest available.
    """

    def __init__(self, grad_dim: int, proj_dim: int, seed: int = 0,
                 proj_type: Union[str, object] = "rademacher",
                 device: Union[str, torch.device, None] = "cuda", block_size: int = 100,
                 dtype: Optional[torch.dtype] = None, max_batch_size: int = 32, *args,
                 normalize: bool = False, backend: Optional[str] = None, **kwargs) -> None:
        if isinstance(grad_dim, bool) or not isinstance(grad_dim, int) or grad_dim < 1:
            raise ValueError(f"grad_dim must be a positive int, got {grad_dim!r}")
        if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1:
            raise ValueError(f"proj_dim must be a positive int, got {proj_dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        # the attributes of TRAK's AbstractProjector.__init__ (not called: it is abstract there)
        self.grad_dim, self.proj_dim, self.seed = grad_dim, proj_dim, seed
        self.proj_type = proj_type
        self.kind = _kind(proj_type)
        self.device = device
        self.block_size, self.dtype, self.max_batch_size = block_size, dtype, max_batch_size
        self.normalize = bool(normalize)
        self.backend = backend

    def seed_for(self, model_id: int) -> int:
        """The ``jl_project`` seed of checkpoint ``model_id``."""
        if isinstance(model_id, bool) or not isinstance(model_id, int) or model_id < 0:
            raise ValueError(f"model_id must be an int >= 0, got {model_id!r}")
        return (model_id << 32) | (self.seed & 0xFFFFFFFF)

    def project(self, grads: Union[torch.Tensor, Dict[str, torch.Tensor]], model_id: int = 0,
                **kwargs) -> torch.Tensor:
        """``[B, proj_dim]`` features of ``grads`` (``[B, grad_dim]``, ``[grad_dim]`` or a dict
        of per-parameter ``[B, ...]`` gradients) under the matrix of ``(seed, model_id)``."""
        if isinstance(grads, dict):
            dev = None if self.device is None else torch.device(self.device)
            first = next(iter(grads.values()), None)
            if dev is not None and dev.type == "cuda" and not torch.cuda.is_available() \
                    and isinstance(first, torch.Tensor):
                dev = first.device  # the TRAK default device="cuda" on a machine without one
            grads = vectorize(grads, dev)
        if not isinstance(grads, torch.Tensor):
            raise TypeError(f"Projector.project: grads must be a tensor or a dict of tensors, got "
                            f"{type(grads).__name__}")
        if grads.dim() == 1:
            grads = grads[None]
        if grads.dim() != 2 or grads.shape[1] != self.grad_dim:
            raise ValueError(f"Projector.project: grads has shape {tuple(grads.shape)}; expected "
                             f"[B, grad_dim={self.grad_dim}]")
        out_dtype = torch.float32 if grads.dtype == torch.float64 else grads.dtype
        X = grads.detach()
        if X.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            X = X.float()
        Y = jl_project(X, self.proj_dim, seed=self.seed_for(model_id), kind=self.kind,
                       backend=self.backend)
        if not self.normalize:
            Y = Y * math.sqrt(self.proj_dim)
        return Y.to(out_dtype)

    def free_memory(self) -> None:
        """No-op: the matrix is generated on the fly, nothing is cached between calls."""
        return None

    def __repr__(self) -> str:
        return (f"fastinf.integrations.trak.Projector(grad_dim={self.grad_dim}, "
                f"proj_dim={self.proj_dim}, seed={self.seed}, proj_type={self.kind!r})")
