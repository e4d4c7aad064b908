"""Shared plumbing of the ops: validation at the Python boundary, backend resolution, tiling.

Every op validates here (dtype, device, rank, size agreement) and raises ``TypeError`` /
``ValueError`` naming the argument, what was given and what was expected; the compiled kernels
only ever see contiguous tensors of the right shapes.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch

from .._native import BACKENDS, backends, native, triton_interpret

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def workspace_bytes() -> int:
    """Bytes one op may use for an intermediate tile (env ``FASTINF_WORKSPACE_MB``, default 256)."""
    return int(float(os.environ.get("FASTINF_WORKSPACE_MB", "256")) * 2**20)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_tensor(op: str, name: str, x, dims: Sequence[str], *, allow_float64: bool = True):
    """Checks that ``x`` is a floating tensor of rank ``len(dims)``; ``dims`` names its axes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor of shape "
                        f"[{', '.join(dims)}], got {type(x).__name__}")
    if x.dim() != len(dims):
        raise ValueError(f"{op}: argument '{name}' must have {len(dims)} dimensions "
                         f"[{', '.join(dims)}], got shape {_fmt(x.shape)}")
    ok = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if x.dtype not in ok:
        raise TypeError(f"{op}: argument '{name}' has dtype {x.dtype}; expected one of "
                        f"{', '.join(str(d) for d in ok)}")


def check_mask(op: str, name: str, m, shape, ref_name: str, device):
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a bool torch.Tensor or None, "
                        f"got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"{op}: argument '{name}' must have dtype torch.bool, got {m.dtype}")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{op}: argument '{name}' has shape {_fmt(m.shape)}; expected "
                         f"{_fmt(shape)} (the first two dimensions of '{ref_name}')")
    if m.device != device:
        raise ValueError(f"{op}: argument '{name}' is on {m.device}, but '{ref_name}' is on {device}")
    return m


def check_same(op: str, tensors: dict):
    """All tensors on one device and of one dtype."""
    names = list(tensors)
    first = tensors[names[0]]
    for n in names[1:]:
        t = tensors[n]
        if t.device != first.device:
            raise ValueError(f"{op}: arguments '{names[0]}' and '{n}' are on different devices "
                             f"({first.device} and {t.device})")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: arguments '{names[0]}' and '{n}' have different dtypes "
                            f"({first.dtype} and {t.dtype}); cast them to one dtype")


def check_dim(op: str, name: str, x, axis: int, expected: int, what: str, dims: Sequence[str]):
    if x.shape[axis] != expected:
        raise ValueError(f"{op}: argument '{name}' has shape {_fmt(x.shape)}; expected "
                         f"[{', '.join(dims)}] with {dims[axis]}={expected} ({what})")


@torch.compiler.assume_constant_result
def _usable(name: str, device_type: str) -> bool:
    # A constant under torch.compile: backend availability is resolved once, outside the graph.
    return _usable_cached(name, device_type)


@functools.lru_cache(maxsize=None)
def _usable_cached(name: str, device_type: str) -> bool:
    st = backends()[name]
    if not st.available:
        return False
    if name == "cpu":
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    return True


def resolve_backend(op: str, backend: Optional[str], device: torch.device, dtype: torch.dtype,
                    preference: Sequence[str]) -> str:
    """The backend to run: ``backend`` when given (checked), else the first usable of ``preference``."""
    if dtype == torch.float64:
        if backend not in (None, "reference"):
            raise TypeError(f"{op}: float64 inputs are supported by backend='reference' only, "
                            f"got backend={backend!r}; cast the inputs to float32")
        return "reference"
    if backend is None:
        for name in preference:
            if _usable(name, device.type):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} "
                         "or None (fastest available)")
    if not _usable(backend, device.type):
        st = backends()[backend]
        why = st.detail if not st.available else f"it does not run on {device.type} tensors"
        raise ValueError(f"{op}: backend {backend!r} is not usable for inputs on {device}: {why}")
    return backend


def default_preference(device: torch.device):
    """Backend order for ``backend=None``: fused compiled/Triton kernels first, torch last."""
    if device.type == "cuda":
        return ("triton", "cuda", "torch")
    if device.type == "cpu":
        return ("cpu", "torch")
    return ("torch",)


def chunk(total: int, per_item_bytes: float, budget: Optional[int] = None, minimum: int = 1) -> int:
    """How many items of ``per_item_bytes`` fit into the workspace budget (at least ``minimum``)."""
    budget = workspace_bytes() if budget is None else budget
    n = int(budget // max(per_item_bytes, 1.0))
    return max(minimum, min(max(total, 1), n))


def ptr(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def contiguous(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.contiguous()


def mask_rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` [B, T, d] with the rows of excluded tokens set to 0 (NaN-safe)."""
    if mask is None:
        return x
    return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def require_native(op: str):
    C = native()
    if C is None:
        raise RuntimeError(f"{op}: the compiled module fastinf._C is not loaded: "
                           f"{backends()['cpu'].detail}")
    return C


def find_nonfinite(op: str, tensors: dict, masks: dict):
    """Raises ValueError naming the first argument and example index holding NaN/Inf.

    ``tensors`` maps names to [B, T, d] (or [B, ...]) tensors; ``masks`` maps names to the [B, T]
    mask that applies (masked tokens are ignored). Returns silently if all are finite.
    """
    for name, x in tensors.items():
        bad = ~torch.isfinite(x)
        while bad.dim() > 2:
            bad = bad.any(-1)
        m = masks.get(name)
        if m is not None:
            bad = bad & m
        if bad.dim() > 1:
            bad = bad.any(-1)
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0])
            count = int(bad.sum())
            raise ValueError(f"{op}: argument '{name}' has non-finite values (NaN or Inf) in "
                             f"{count} example(s), the first at index {idx}")



def dispatch(custom_op, run, *args):
    """Calls an op through its ``torch.library`` custom op when traced (torch.compile, fake or
    meta tensors), and straight through ``run`` (the same implementation) in eager mode, which
    saves the dispatcher's overhead on small calls."""
    x = args[0]
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type == "meta":
        return custom_op(*args)
    return run(*args)


def has_nonfinite(out: torch.Tensor) -> bool:
    """True when ``out`` holds NaN/Inf: one reduction when all is finite (the common case)."""
    if out.numel() == 0 or torch.compiler.is_compiling():
        return False
    if bool(torch.isfinite(out.sum())):
        return False
    return not bool(torch.isfinite(out).all())
