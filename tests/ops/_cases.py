"""Shared parametrisation of the op tests: backends, dtypes with tolerances, adversarial inputs."""
import pytest
import torch

import fastinf

# (backend, device) pairs; the cuda ones are marked gpu and skip without a GPU.
BACKENDS = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("cpp", "cpu", id="cpp"),  # "cpu" = cpp or torch by the CPU rule: test_dispatch.py
    pytest.param("triton", "cpu", id="triton-interp"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.gpu),
]

# dtype -> relative tolerance (w.r.t. the largest |score|) against the float64 reference
DTYPES = [
    pytest.param(torch.float32, 2e-5, id="f32"),
    pytest.param(torch.float16, 1e-2, id="f16"),
    pytest.param(torch.bfloat16, 5e-2, id="bf16"),
]


def skip_unusable(backend, device):
    st = fastinf.backends()[backend]
    if not st.available:
        pytest.skip(f"backend {backend!r} unavailable here: {st.detail}")
    if backend == "triton" and device == "cpu":
        import os
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")


def make(shape, dtype, device, *, noncontig=False, scale=1.0):
    """Random tensor of ``shape``; with ``noncontig`` a strided view of a larger tensor."""
    if noncontig and len(shape) == 3:
        big = torch.randn(shape[0], shape[2], shape[1] * 2 + 1, dtype=torch.float64) * scale
        x = big[:, :, : shape[1] * 2 : 2].transpose(1, 2)  # non-contiguous view
        assert not x.is_contiguous() or x.numel() <= 1
    else:
        x = torch.randn(*shape, dtype=torch.float64) * scale
    return x.to(device=device, dtype=dtype)


def random_mask(B, T, device, *, all_masked_rows=()):
    m = torch.rand(B, T) > 0.3
    if T:
        m[:, 0] = True
    for r in all_masked_rows:
        if r < B:
            m[r] = False
    return m.to(device)


def assert_close(out, ref, tol, what=""):
    assert out.dtype == torch.float32, out.dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    ref = ref.to(out.device, torch.float64)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * max(scale, 1e-30) + 1e-30, f"{what}: max err {err:.3e}, scale {scale:.3e}, tol {tol}"


def masks_with_holes(N, T, Q, S, kind):
    if kind is None:
        return None, None
    am = torch.rand(N, T) > 0.4
    vm = torch.rand(Q, S) > 0.4
    if kind == "holes" and N:
        am[0] = False              # an all-masked example
        if Q:
            vm[-1] = False         # an all-masked query
    return am, vm


def poison(x, m):
    """NaN in the masked tokens: they must not leak into the scores."""
    if m is None:
        return x
    x = x.clone()
    x[~m] = float("nan")
    return x


# --------------------------------------------------------------------------- compiled kernels' tile edges
# Tolerances of the Triton / CUDA tile-edge cases: relative to the largest |score| (Triton), or
# elementwise to the same score computed on |terms| (CUDA, so cancellation can neither fail a
# correct kernel nor hide a wrong one).
KERNEL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
KERNEL_DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in KERNEL_TOL]
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU


def rand(*shape, dtype, device=TRITON_DEV, noncontig=False):
    if noncontig and len(shape) == 3:
        # last dim strided and the first two swapped: exercises all three strides
        x = torch.randn(shape[1], shape[0], 2 * shape[2], device=device).to(dtype)
        return x.transpose(0, 1)[:, :, ::2]
    return torch.randn(*shape, device=device).to(dtype)


def mask(*shape, device=TRITON_DEV, p=0.3, all_masked=()):
    m = torch.rand(*shape, device=device) > p
    for b in all_masked:
        if b < shape[0]:
            m[b] = False
    return m


def close_to_max(out, ref, dtype):
    """Max error within ``KERNEL_TOL`` of the largest |score|."""
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    if ref.numel() == 0:
        return
    assert torch.isfinite(out).all()
    scale = ref.abs().max().item() + 1e-30
    err = (out.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= KERNEL_TOL[dtype] * scale, f"max abs err {err:.3e} vs scale {scale:.3e}"


def check_bounded(out, ref, bound, dtype, shape):
    """Every score within ``KERNEL_TOL * bound`` (``bound``: the score of |terms|), on CUDA."""
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert tuple(out.shape) == tuple(shape)
    out = out.double().cpu()
    ref, bound = ref.cpu(), bound.cpu()
    assert torch.isfinite(out).all()
    err = (out - ref).abs()
    lim = KERNEL_TOL[dtype] * bound + 1e-30
    bad = err > lim
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} scores off; worst err "
                           f"{float(err.max()):.3g}, bound there {float(bound.flatten()[err.argmax()]):.3g}")
