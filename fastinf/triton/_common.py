"""What every Triton kernel of fastinf shares: interpreter handling, dot precision, autotuning,
tile order, alignment, int64 offsets and the device guard. ``triton/<op>.py`` holds only the
kernel and its thin launcher, written the same way for every op::

    with device_guard(A):                   # tensors on cuda:1 while cuda:0 is current
        _kernel[grid](..., PRECISION=input_precision(A.dtype), UPCAST=upcast_dot(A.dtype))

Dot precision (one rule for every kernel): fp16/bf16 operands go to ``tl.dot`` in their own
dtype with an fp32 accumulator (tensor cores); fp32 operands follow torch's float32 matmul
precision, i.e. exact fp32 (``"ieee"``) by default and TF32 only when the caller opted in with
``torch.set_float32_matmul_precision("high")`` (or "medium"), as ``torch.matmul`` does.
Under the interpreter bf16 dot operands are upcast to fp32 (:func:`upcast_dot`): its bf16
``tl.dot`` is broken; compiled GPU runs keep the native bf16 dot.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
AUTOTUNE = os.environ.get("FASTINF_TRITON_AUTOTUNE", "1") not in ("", "0")
ALIGN = 16  # elements: triton specialises int arguments divisible by 16 (and 16-byte pointers)
GRID_MAX = 2**31 - 1  # programs on grid axis 0 (axes 1 and 2 hold only 65535: kernels use axis 0)


# --------------------------------------------------------------------------- interpreter
def _patch_interpreter() -> None:
    """Lets the interpreter loop over runtime bounds with numpy >= 2.3.

    The interpreter holds kernel scalars as 1-element arrays and converts them with
    ``int(array)`` when they bound a ``range`` loop; numpy 2.3+ rejects that for ndim > 0
    arrays, so every kernel with a runtime loop bound would fail. ``__index__`` then reads the
    single element. Only applied when the interpreter is on; compiled GPU runs are untouched.
    """
    if not INTERPRET:
        return
    try:
        from triton.runtime import interpreter as _i
    except Exception:  # pragma: no cover
        return
    orig = getattr(_i, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_fastinf_compat", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._fastinf_compat = True
    _i._patch_lang_tensor = _patch_lang_tensor


_patch_interpreter()


def static_sizes(*sizes):
    """Constexpr copies of loop bounds under the interpreter; zeros (= runtime ints) on GPU.

    Written inline in the kernel, ``range(0, X_C if X_C > 0 else X, ...)``, resolved at compile
    time: on GPU the kernel keeps runtime bounds (one compile for all sizes); the interpreter
    gets plain ints. The bound must not be assigned to a variable first (the interpreter turns
    every assignment into a 1-D tensor again).
    """
    return tuple(int(x) if INTERPRET else 0 for x in sizes)


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether to upcast dot operands to fp32 in the kernel: only for bfloat16 under the Triton
    interpreter, whose bf16 ``tl.dot`` returns garbage (seen with triton 3.6 and 3.8 on CPU)."""
    return INTERPRET and dtype == torch.bfloat16


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for ``dtype`` following torch's float32 matmul precision."""
    if dtype != torch.float32:
        return "ieee"  # unused for half types (native fp16/bf16 tensor-core dots)
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# --------------------------------------------------------------------------- autotuning
def configs(interpreted, tuned):
    """The autotune candidates: ``interpreted`` (one small config) under the interpreter, else
    ``tuned`` (its first = the untuned default, alone with ``FASTINF_TRITON_AUTOTUNE=0``)."""
    if INTERPRET:
        return [interpreted]
    return tuned if AUTOTUNE else tuned[:1]


def pow2_bucket(x: int) -> int:
    """Autotune key bucket: the next power of two (so close sequence lengths share a tuning)."""
    return triton.next_power_of_2(max(int(x), 1))


def token_block(T: int, block_rows: int) -> int:
    """Tokens per example in a row tile of ``block_rows`` rows (a power of two ≤ block_rows).

    Picks the largest power of two whose padded token count ``ceil(T/BT)·BT`` is within 1/8
    of the smallest achievable one, trading a little padding for fewer, longer token blocks.
    """
    T = max(int(T), 1)
    cands = []
    bt = 1
    while bt <= block_rows:
        cands.append(bt)
        bt *= 2
    padded = {b: -(-T // b) * b for b in cands}
    best = min(padded.values())
    return max(b for b in cands if padded[b] * 8 <= best * 9)


@triton.jit
def tile_ids(pid, num_r, num_c, GROUP: tl.constexpr):
    """Grouped ("swizzled") program order: ``GROUP`` row tiles share each column tile in L2."""
    per_group = GROUP * num_c
    group = pid // per_group
    first_r = group * GROUP
    size = tl.minimum(num_r - first_r, GROUP)
    pid_r = first_r + (pid % per_group) % size
    pid_c = (pid % per_group) // size
    return pid_r, pid_c


def grid_1d(op: str, programs: int) -> tuple:
    """A 1-D grid of ``programs``, or a clear error past the hardware's 2³¹ - 1."""
    if programs > GRID_MAX:
        raise ValueError(f"{op}: {programs} Triton programs exceed the grid limit {GRID_MAX}; "
                         "split the call (fewer rows or a smaller output)")
    return (programs,)


# --------------------------------------------------------------------------- offsets
@triton.jit
def offsets64(idx, stride):
    """``idx * stride`` in int64: element offsets whose product can pass 2³¹ (``idx`` is an int32
    index, ``stride`` a runtime int, both int32 when they fit, and int32 products wrap)."""
    return idx.to(tl.int64) * stride


def int32_safe(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or a contiguous copy when it is a strided view spanning >= 2**31 elements.

    The score kernels index examples/queries in int64 but tokens/features in int32
    (``t * stride``, ``k * stride``), which cannot overflow for contiguous tensors; odd views could.
    """
    span = sum((d - 1) * st for d, st in zip(x.shape, x.stride()) if d > 0)
    return x if span < 2**31 or x.is_contiguous() else x.contiguous()


# --------------------------------------------------------------------------- alignment
def _is_aligned(x: torch.Tensor) -> bool:
    """Unit last stride, 16-byte aligned base, outer strides multiples of ALIGN elements."""
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0
            and all(st % ALIGN == 0 for d, st in zip(x.shape[:-1], x.stride()[:-1]) if d > 1))


def align_features(xs, dims):
    """Zero-pads the given feature dims of tensors sharing them to a multiple of ALIGN elements.

    ``xs``: tensors; ``dims``: for each, the axes to pad (negative). Returns the tensors and the
    padded tensors (the kernels then loop over the padded width: the zeros add nothing, and
    K bounds divisible by 16 keep the ``k < din`` masks from splitting vector loads).
    Copies only when some size is not a multiple or some tensor is not aligned; on GPU an odd
    ``din`` (bias column: in_features + 1) otherwise turns every operand load into scalar loads.
    """
    mult = ALIGN
    if all(x.shape[a] % mult == 0 for x, axes in zip(xs, dims) for a in axes) \
            and all(_is_aligned(x) for x in xs):
        return list(xs)
    out = []
    for x, axes in zip(xs, dims):
        shape = list(x.shape)
        for a in axes:
            shape[a] = -(-shape[a] // mult) * mult
        y = x.new_zeros(shape)
        y[tuple(slice(0, n) for n in x.shape)] = x
        out.append(y)
    return out


def mask_arg(m, like):
    """A mask as uint8 (the kernel compares != 0) with its strides, or a dummy pointer."""
    if m is None:
        return like, 0, 0, False
    m = m.view(torch.uint8) if m.dtype == torch.bool else m.to(torch.uint8)
    return m, m.stride(0), m.stride(1), True


# --------------------------------------------------------------------------- device guard
def device_guard(x: torch.Tensor):
    """Makes ``x``'s GPU the current device for a launch (Triton launches on the current device:
    tensors on ``cuda:1`` while ``cuda:0`` is current would be an illegal address)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
