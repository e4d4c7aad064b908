"""Triton kernels of score_factored / score_dense against the float64 references.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; the ``gpu`` tests repeat the check at realistic sizes on CUDA.
"""
import pytest
import torch

from fastinf.ops import (score_dense, score_dense_reference, score_factored,
                         score_factored_reference)

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# rtol relative to the largest |score| (entries can cancel to ~0, so plain rtol is meaningless)
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in TOL]


def _close(out, ref, dtype):
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    if ref.numel() == 0:
        return
    assert torch.isfinite(out).all()
    scale = ref.abs().max().item() + 1e-30
    err = (out.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max abs err {err:.3e} vs scale {scale:.3e}"


def _rand(*shape, dtype, noncontig=False):
    if noncontig and len(shape) == 3:
        # last dim strided and the first two swapped: exercises all three strides
        x = torch.randn(shape[1], shape[0], 2 * shape[2], device=DEV).to(dtype)
        return x.transpose(0, 1)[:, :, ::2]
    return torch.randn(*shape, device=DEV).to(dtype)


def _mask(B, T, all_masked=()):
    m = torch.rand(B, T, device=DEV) > 0.3
    for b in all_masked:
        if b < B:
            m[b] = False
    return m


def _poison(x, mask):
    """NaN into the tokens a mask excludes: they must contribute nothing."""
    if mask is None:
        return x
    x = x.clone()
    x[~mask] = float("nan")
    return x


def _factored(N, T, Q, S, din, dout, dtype, masks=False, noncontig=False, nan=False):
    A = _rand(N, T, din, dtype=dtype, noncontig=noncontig)
    G = _rand(N, T, dout, dtype=dtype, noncontig=noncontig)
    V = _rand(Q, S, din, dtype=dtype, noncontig=noncontig)
    U = _rand(Q, S, dout, dtype=dtype, noncontig=noncontig)
    am = _mask(N, T, all_masked=(1,)) if masks else None
    vm = _mask(Q, S, all_masked=(0,)) if masks else None
    if nan:
        A, G, V, U = _poison(A, am), _poison(G, am), _poison(V, vm), _poison(U, vm)
    out = score_factored(A, G, V, U, a_mask=am, v_mask=vm, backend="triton",
                         contraction="factored")
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double(), am, vm)
    return out, ref


def _dense(N, T, Q, din, dout, dtype, masks=False, noncontig=False, nan=False):
    A = _rand(N, T, din, dtype=dtype, noncontig=noncontig)
    G = _rand(N, T, dout, dtype=dtype, noncontig=noncontig)
    M = _rand(Q, dout, din, dtype=dtype, noncontig=noncontig)
    am = _mask(N, T, all_masked=(1,)) if masks else None
    if nan:
        A, G = _poison(A, am), _poison(G, am)
    out = score_dense(A, G, M, a_mask=am, backend="triton", contraction="token")
    ref = score_dense_reference(A.double(), G.double(), M.double(), am)
    return out, ref


# (N, T, Q, S, din, dout): T=1/S=1, odd sizes, sizes across block boundaries (blocks are 32 under
# the interpreter), T≠S, long-ish token counts that need several token blocks.
FACTORED_SHAPES = [
    (5, 1, 3, 1, 13, 7),
    (37, 1, 35, 1, 33, 40),
    (3, 5, 4, 3, 13, 7),
    (2, 1, 3, 6, 9, 17),
    (2, 37, 3, 1, 13, 7),
    (2, 33, 2, 40, 35, 5),
]


@pytest.mark.parametrize("shape", FACTORED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_factored_triton(shape, dtype):
    _close(*_factored(*shape, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_factored_triton_masks_nan_noncontig(dtype):
    # masks incl. a fully masked example and query, NaN in every masked token, strided inputs
    _close(*_factored(4, 6, 3, 5, 13, 7, dtype, masks=True, noncontig=True, nan=True), dtype)


def test_score_factored_triton_masks_t1():
    out, ref = _factored(6, 1, 5, 1, 13, 7, torch.float32, masks=True, nan=True)
    _close(out, ref, torch.float32)
    assert (out[1] == 0).all() and (out[:, 0] == 0).all()


@pytest.mark.parametrize("N,Q", [(0, 3), (3, 0), (0, 0)])
def test_score_factored_triton_empty(N, Q):
    out, ref = _factored(N, 2, Q, 3, 5, 4, torch.float32)
    assert out.shape == (N, Q) and out.dtype == torch.float32


# (N, T, Q, din, dout)
DENSE_SHAPES = [
    (5, 1, 3, 13, 7),
    (37, 1, 2, 33, 40),
    (3, 5, 4, 13, 7),
    (2, 37, 3, 9, 35),
]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_dense_triton(shape, dtype):
    _close(*_dense(*shape, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_dense_triton_masks_nan_noncontig(dtype):
    out, ref = _dense(4, 6, 3, 13, 7, dtype, masks=True, noncontig=True, nan=True)
    _close(out, ref, dtype)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("N,Q", [(0, 3), (3, 0), (0, 0)])
def test_score_dense_triton_empty(N, Q):
    out, ref = _dense(N, 2, Q, 5, 4, torch.float32)
    assert out.shape == (N, Q) and out.dtype == torch.float32


def test_token_block():
    from fastinf.triton.score_factored import token_block

    assert token_block(1, 128) == 1
    assert token_block(512, 128) == 128
    assert token_block(1000, 128) == 128          # 1024 rows: within 1/8 of the 1000 optimum
    assert token_block(5, 32) == 1                # 8 would pad 5 tokens to 8
    assert token_block(64, 32) == 32
    for T in range(1, 300):
        bt = token_block(T, 64)
        assert bt & (bt - 1) == 0 and 1 <= bt <= 64


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_align_features_path(dtype):
    """The zero-padded path (default on CUDA) on odd, strided, masked, NaN-poisoned inputs."""
    from fastinf.triton.score_dense import score_dense_triton
    from fastinf.triton.score_factored import score_factored_triton

    A = _poison(_rand(4, 6, 13, dtype=dtype, noncontig=True), am := _mask(4, 6, (1,)))
    G = _poison(_rand(4, 6, 7, dtype=dtype), am)
    V = _poison(_rand(3, 5, 13, dtype=dtype), vm := _mask(3, 5, (0,)))
    U = _poison(_rand(3, 5, 7, dtype=dtype, noncontig=True), vm)
    M = _rand(2, 7, 13, dtype=dtype, noncontig=True)
    d = [x.double() for x in (A, G, V, U, M)]
    _close(score_factored_triton(A, G, V, U, am, vm, align=True),
           score_factored_reference(*d[:4], am, vm), dtype)
    _close(score_dense_triton(A, G, M, am, align=True), score_dense_reference(d[0], d[1], d[4], am),
           dtype)


def test_align_features():
    from fastinf.triton.score_factored import align_features

    A, V = torch.randn(2, 3, 16), torch.randn(4, 1, 16)
    a, v = align_features([A, V], [(-1,), (-1,)])
    assert a is A and v is V                      # rows of 16 elements: nothing to do
    M = torch.randn(2, 7, 13)
    (m,) = align_features([M], [(-1, -2)])
    assert m.shape == (2, 16, 16) and torch.equal(m[:, :7, :13], M) and m[:, 7:].eq(0).all()
    h = torch.randn(2, 3, 32).half()[:, :, 4:20]   # 8-byte offset base, stride 32: copied
    (h2,) = align_features([h], [(-1,)])
    assert h2 is not h and h2.shape == h.shape and torch.equal(h2, h)


def test_int32_safe():
    from fastinf.triton.score_factored import int32_safe

    x = torch.randn(4, 3, 5)
    assert int32_safe(x) is x
    y = x.transpose(0, 2)
    assert int32_safe(y) is y                      # small strided views are passed as they are
    big = torch.empty_strided((2, 2, 2), (2**30, 1, 2**30), device="meta")   # span 2**31
    assert int32_safe(big) is not big and int32_safe(big).is_contiguous()


# --------------------------------------------------------------------------- GPU
GPU_FACTORED = [
    (300, 1, 200, 1, 1025, 777),      # MLP layer: two GEMMs + Hadamard
    (16, 130, 5, 257, 192, 96),       # sequence model, odd token counts
    (8, 512, 4, 512, 256, 128),       # long sequences
    (64, 37, 48, 16, 100, 33),        # low-rank query factors (S = rank)
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_FACTORED, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_factored_triton_gpu(shape, dtype):
    N, T, Q, S, _, _ = shape
    out, ref = _factored(*shape, dtype, masks=T > 1 and S > 1, nan=True)
    _close(out, ref, dtype)
    out2, ref2 = _factored(*shape, dtype, noncontig=True)
    _close(out2, ref2, dtype)


GPU_DENSE = [
    (300, 1, 20, 1025, 777),
    (16, 130, 6, 192, 96),
    (4, 512, 3, 256, 384),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_DENSE, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_dense_triton_gpu(shape, dtype):
    out, ref = _dense(*shape, dtype, masks=shape[1] > 1, nan=True)
    _close(out, ref, dtype)
    out2, ref2 = _dense(*shape, dtype, noncontig=True)
    _close(out2, ref2, dtype)


@pytest.mark.gpu
def test_score_factored_triton_gpu_tf32_opt_in():
    """With TF32 allowed the fp32 kernel may use it; results stay within TF32 accuracy."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        out, ref = _factored(64, 9, 32, 7, 256, 128, torch.float32)
    finally:
        torch.set_float32_matmul_precision(prev)
    err = (out.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= 1e-2 * ref.abs().max().item()
