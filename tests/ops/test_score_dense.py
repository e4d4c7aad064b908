"""score_dense: every backend and contraction order against the float64 reference."""
import pytest
import torch

from fastinf.ops import score_dense, score_dense_reference
from fastinf.ops import plan

from _cases import (BACKENDS, DTYPES, KERNEL_DTYPES, assert_close, check_bounded, close_to_max,
                    make, mask, masks_with_holes, poison, rand, random_mask, skip_unusable,
                    TRITON_DEV)

# (N, T, Q, din, dout)
SHAPES = [
    (5, 1, 4, 7, 3),
    (3, 4, 1, 13, 7),
    (4, 17, 3, 33, 5),
    (1, 3, 2, 1, 1),
    (7, 2, 6, 65, 17),
]


def _inputs(shape, dtype, device, noncontig=False):
    N, T, Q, din, dout = shape
    return (make((N, T, din), dtype, device, noncontig=noncontig),
            make((N, T, dout), dtype, device, noncontig=noncontig),
            make((Q, dout, din), dtype, device, noncontig=noncontig))


def _ref(A, G, M, am=None):
    d = lambda x: x.detach().cpu().double()
    return score_dense_reference(d(A), d(G), d(M), None if am is None else am.cpu())


def test_reference_is_the_formula():
    A, G, M = _inputs((4, 3, 5, 6, 4), torch.float64, "cpu")
    am = random_mask(4, 3, "cpu")
    D = torch.einsum("nte,ntd->ned", G * am[..., None], A)
    torch.testing.assert_close(score_dense_reference(A, G, M, am), torch.einsum("ned,qed->nq", D, M))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("contraction", ["token", "materialize", None])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_shapes(backend, device, contraction, shape):
    skip_unusable(backend, device)
    A, G, M = _inputs(shape, torch.float32, device)
    out = score_dense(A, G, M, backend=backend, contraction=contraction)
    assert_close(out, _ref(A, G, M), 2e-5, f"{backend}/{contraction}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("contraction", ["token", "materialize"])
def test_dtypes(backend, device, dtype, tol, contraction):
    skip_unusable(backend, device)
    A, G, M = _inputs((6, 5, 4, 24, 10), dtype, device)
    out = score_dense(A, G, M, backend=backend, contraction=contraction)
    assert_close(out, _ref(A, G, M), tol, f"{backend}/{dtype}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("contraction", ["token", "materialize"])
def test_masks_and_nan_in_masked_tokens(backend, device, contraction):
    skip_unusable(backend, device)
    A, G, M = _inputs((5, 6, 4, 11, 5), torch.float32, device)
    am = random_mask(5, 6, device, all_masked_rows=(3,))
    ref = _ref(A, G, M, am)
    A, G = A.clone(), G.clone()
    A[~am] = float("nan"); G[~am] = float("-inf")
    out = score_dense(A, G, M, a_mask=am, backend=backend, contraction=contraction)
    assert_close(out, ref, 2e-5, f"{backend}/{contraction}")
    assert (out[3] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_noncontiguous(backend, device):
    skip_unusable(backend, device)
    A, G, M = _inputs((4, 5, 3, 9, 6), torch.float32, device, noncontig=True)
    for contraction in ("token", "materialize"):
        out = score_dense(A, G, M, backend=backend, contraction=contraction)
        assert_close(out, _ref(A, G, M), 2e-5, contraction)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("N,Q", [(0, 3), (3, 0)])
def test_empty(backend, device, N, Q):
    skip_unusable(backend, device)
    A, G, M = _inputs((N, 2, Q, 5, 4), torch.float32, device)
    for contraction in ("token", "materialize", None):
        out = score_dense(A, G, M, backend=backend, contraction=contraction)
        assert out.shape == (N, Q) and out.dtype == torch.float32


def test_chunking_keeps_results(monkeypatch):
    A, G, M = _inputs((9, 4, 7, 8, 5), torch.float32, "cpu")
    want = _ref(A, G, M)
    monkeypatch.setenv("FASTINF_WORKSPACE_MB", "0.0001")
    for contraction in ("token", "materialize"):
        assert_close(score_dense(A, G, M, backend="torch", contraction=contraction), want, 2e-5)
    assert_close(score_dense(A.double(), G.double(), M.double()).float(), want, 1e-6)


@pytest.mark.parametrize("tile", [1, 8 * 4 * 3, 10 ** 9])
def test_materialize_cpu_row_chunks_keep_results(monkeypatch, tile):
    """materialize's chunks of D's rows on the CPU (D_TILE bytes, at least one row): one row at
    a time, chunks that do not divide dout, all rows."""
    import sys
    monkeypatch.setattr(sys.modules["fastinf.ops.score_dense"], "D_TILE", tile)
    A, G, M = _inputs((9, 4, 7, 8, 5), torch.float32, "cpu")
    am = random_mask(9, 4, "cpu")
    assert_close(score_dense(A, G, M, a_mask=am, backend="torch", contraction="materialize"),
                 _ref(A, G, M, am), 2e-5)


@pytest.mark.parametrize("rows", [1, 5, 2048])
@pytest.mark.parametrize("mb", ["0.0001", "0.002", "256"])
def test_token_tiles_keep_results(monkeypatch, rows, mb):
    """token_torch's tiles (>= TOKEN_ROWS token rows, then queries, then more examples) over a
    range of workspaces: one tile, query tiles, example tiles."""
    import sys
    monkeypatch.setattr(sys.modules["fastinf.ops.score_dense"], "TOKEN_ROWS", rows)
    monkeypatch.setenv("FASTINF_WORKSPACE_MB", mb)
    A, G, M = _inputs((9, 3, 7, 8, 5), torch.float32, "cpu")
    am = random_mask(9, 3, "cpu")
    assert_close(score_dense(A, G, M, a_mask=am, backend="torch", contraction="token"),
                 _ref(A, G, M, am), 2e-5)


def test_plan_follows_flops():
    # T = 1: equal FLOPs; near-ties go to the smaller intermediate (T·Q·dout vs dout·din).
    p = lambda dev, N, T, Q, din, dout: plan("score_dense", dev, N=N, T=T, Q=Q, din=din, dout=dout)
    assert p("cpu", 100, 1, 64, 512, 512) == "token"
    assert p("cpu", 100, 1, 300, 256, 256) == "materialize"
    assert p("cuda", 10, 1, 1, 256, 256) == "token"
    assert p("cuda", 100, 512, 100, 768, 768) == "materialize"


# (N, T, Q, din, dout)
CPP_SHAPES = [
    (1, 1, 1, 1, 1),
    (5, 1, 3, 13, 7),
    (17, 1, 9, 65, 17),
    (33, 1, 2, 33, 16),           # columns exactly fill panels within one query
    (4, 9, 3, 13, 7),
    (3, 17, 5, 27, 33),
    (0, 3, 4, 8, 8),
    (3, 3, 0, 8, 8),
    (40, 2, 30, 9, 5),
]


@pytest.mark.parametrize("mask", [None, "random", "holes"])
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_kernel_shapes(shape, mask):
    """The C++ kernel's tiling edges (panels within and across queries), NaN in masked tokens."""
    skip_unusable("cpp", "cpu")
    N, T, Q, din, dout = shape
    A, G = torch.randn(N, T, din), torch.randn(N, T, dout)
    M = torch.randn(Q, dout, din)
    am, _ = masks_with_holes(N, T, 1, 1, mask)
    ref = score_dense_reference(A.double(), G.double(), M.double(), am)
    A, G = poison(A, am), poison(G, am)
    out = score_dense(A, G, M, a_mask=am, backend="cpp", contraction="token")
    assert_close(out, ref, 1e-4)
    if mask == "holes" and N and Q:
        assert (out[0] == 0).all()


def test_cpp_kernel_noncontiguous():
    skip_unusable("cpp", "cpu")
    N, T, Q, din, dout = 5, 4, 3, 14, 9
    A = torch.randn(N, din, T).transpose(1, 2)
    G = torch.randn(N, T, 2 * dout)[:, :, 1::2]
    M = torch.randn(Q, din, dout).transpose(1, 2)        # [Q, dout, din], strided
    ref = score_dense_reference(A.double(), G.double(), M.double())
    assert_close(score_dense(A, G, M, backend="cpp", contraction="token"), ref, 1e-4)


# --------------------------------------------------------------------------- triton tile edges
# Under the interpreter blocks are 32: T=1/S=1, odd sizes, sizes across block boundaries, T≠S,
# token counts that need several token blocks; the gpu cases repeat it at realistic sizes.
def _triton(N, T, Q, din, dout, dtype, masks=False, noncontig=False, nan=False):
    skip_unusable("triton", TRITON_DEV)
    A = rand(N, T, din, dtype=dtype, noncontig=noncontig)
    G = rand(N, T, dout, dtype=dtype, noncontig=noncontig)
    M = rand(Q, dout, din, dtype=dtype, noncontig=noncontig)
    am = mask(N, T, all_masked=(1,)) if masks else None
    if nan:
        A, G = poison(A, am), poison(G, am)
    out = score_dense(A, G, M, a_mask=am, backend="triton", contraction="token")
    ref = score_dense_reference(A.double(), G.double(), M.double(), am)
    return out, ref


# (N, T, Q, din, dout)
TRITON_SHAPES = [
    (5, 1, 3, 13, 7),
    (37, 1, 2, 33, 40),
    (3, 5, 4, 13, 7),
    (2, 37, 3, 9, 35),
]


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_score_dense_triton(shape, dtype):
    close_to_max(*_triton(*shape, dtype), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_score_dense_triton_masks_nan_noncontig(dtype):
    out, ref = _triton(4, 6, 3, 13, 7, dtype, masks=True, noncontig=True, nan=True)
    close_to_max(out, ref, dtype)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("N,Q", [(0, 3), (3, 0), (0, 0)])
def test_score_dense_triton_empty(N, Q):
    out, ref = _triton(N, 2, Q, 5, 4, torch.float32)
    assert out.shape == (N, Q) and out.dtype == torch.float32


TRITON_GPU_SHAPES = [
    (300, 1, 20, 1025, 777),
    (16, 130, 6, 192, 96),
    (4, 512, 3, 256, 384),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", TRITON_GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_score_dense_triton_gpu(shape, dtype):
    out, ref = _triton(*shape, dtype, masks=shape[1] > 1, nan=True)
    close_to_max(out, ref, dtype)
    out2, ref2 = _triton(*shape, dtype, noncontig=True)
    close_to_max(out2, ref2, dtype)


# --------------------------------------------------------------------------- cuda tile edges
# The engine (csrc/cuda/score_engine.cuh) pads 64 x 64 tiles of token rows x token columns and
# reduces them per (example, query); the shapes straddle every tile boundary it has: T or S equal
# to 1, below / at / above 64, not dividing 64, K not a multiple of the K step, N above the old
# 65535 grid limit, Q above 65535 query tiles (grid-stride in y).
DEV = "cuda"
# (N, T, Q, din, dout)
CUDA_SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 1, 5, 7, 9),
    (5, 7, 3, 13, 11),
    (2, 65, 3, 5, 70),         # T, dout > 64
    (130, 3, 67, 40, 1),       # dout = 1: 64 queries per block
    (70, 30, 3, 8, 33),
    (4, 100, 2, 33, 129),
    (3, 2, 2, 100, 64),
]

def _dense_refs(A, G, M, am):
    d = [x.double().nan_to_num() for x in (A, G, M)]
    return score_dense_reference(*d, am), score_dense_reference(*(x.abs() for x in d), am)


def _cuda_dense(A, G, M, am=None):
    return score_dense(A, G, M, a_mask=am, backend="cuda", contraction="token")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_dense_matches_reference(shape, dtype):
    N, T, Q, din, dout = shape
    A, G, M = rand(N, T, din, dtype=dtype, device=DEV), rand(N, T, dout, dtype=dtype, device=DEV), rand(Q, dout, din, dtype=dtype, device=DEV)
    out = _cuda_dense(A, G, M)
    check_bounded(out, *_dense_refs(A, G, M, None), dtype, (N, Q))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_dense_masks_with_nan_in_excluded_tokens(shape, dtype):
    N, T, Q, din, dout = shape
    am = mask(N, T, device=DEV)
    am[-1] = False
    A = poison(rand(N, T, din, dtype=dtype, device=DEV), am)
    G = poison(rand(N, T, dout, dtype=dtype, device=DEV), am)
    M = rand(Q, dout, din, dtype=dtype, device=DEV)
    out = _cuda_dense(A, G, M, am)
    check_bounded(out, *_dense_refs(A, G, M, am), dtype, (N, Q))
    assert (out[-1] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_dense_many_examples(dtype):
    N, T, Q, din, dout = 66_000, 1, 2, 3, 5
    A, G, M = rand(N, T, din, dtype=dtype, device=DEV), rand(N, T, dout, dtype=dtype, device=DEV), rand(Q, dout, din, dtype=dtype, device=DEV)
    am = mask(N, T, device=DEV)
    check_bounded(_cuda_dense(A, G, M, am), *_dense_refs(A, G, M, am), dtype, (N, Q))


@pytest.mark.gpu
def test_dense_many_query_tiles():
    N, T, Q, din, dout = 2, 3, 64 * 65_535 + 5, 2, 1
    A = rand(N, T, din, dtype=torch.float32, device=DEV)
    G = rand(N, T, dout, dtype=torch.float32, device=DEV)
    M = rand(Q, dout, din, dtype=torch.float32, device=DEV)
    check_bounded(_cuda_dense(A, G, M), *_dense_refs(A, G, M, None), torch.float32, (N, Q))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_dense_non_contiguous(dtype):
    N, T, Q, din, dout = 7, 5, 4, 11, 9
    A = rand(N, din, T, dtype=dtype, device=DEV).transpose(1, 2)
    G = rand(N, T, dout + 2, dtype=dtype, device=DEV)[:, :, 2:]
    M = rand(Q, din, dout, dtype=dtype, device=DEV).transpose(1, 2)
    am = mask(T, N, device=DEV).t()
    out = _cuda_dense(A, G, M, am)
    check_bounded(out, *_dense_refs(A, G, M, am), dtype, (N, Q))


@pytest.mark.gpu
@pytest.mark.parametrize("N,Q", [(0, 3), (4, 0), (0, 0)])
def test_dense_empty(N, Q):
    A, G, M = (rand(N, 2, 3, dtype=torch.float32, device=DEV), rand(N, 2, 4, dtype=torch.float32, device=DEV),
               rand(Q, 4, 3, dtype=torch.float32, device=DEV))
    out = _cuda_dense(A, G, M)
    assert out.shape == (N, Q) and out.dtype == torch.float32
