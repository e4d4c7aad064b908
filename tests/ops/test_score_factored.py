"""score_factored: every backend and contraction order against the float64 reference."""
import pytest
import torch

from fastinf.ops import score_factored, score_factored_reference
from fastinf.ops import flops, plan

from _cases import (BACKENDS, DTYPES, KERNEL_DTYPES, assert_close, check_bounded, close_to_max,
                    make, mask, masks_with_holes, poison, rand, random_mask, skip_unusable,
                    TRITON_DEV)

# (N, T, Q, S, din, dout): adversarial shapes — single tokens, odd sizes, sizes off any tile grid
SHAPES = [
    (5, 1, 4, 1, 7, 3),       # MLP-like, T = S = 1
    (3, 4, 2, 1, 13, 7),      # S = 1
    (2, 1, 3, 5, 9, 11),      # T = 1
    (4, 17, 3, 9, 33, 5),     # off-grid sizes
    (1, 3, 1, 3, 1, 1),       # din = dout = 1
    (7, 2, 6, 3, 65, 17),
]


def _inputs(shape, dtype, device, noncontig=False):
    N, T, Q, S, din, dout = shape
    return (make((N, T, din), dtype, device, noncontig=noncontig),
            make((N, T, dout), dtype, device, noncontig=noncontig),
            make((Q, S, din), dtype, device, noncontig=noncontig),
            make((Q, S, dout), dtype, device, noncontig=noncontig))


def _ref(A, G, V, U, am=None, vm=None):
    d = lambda x: x.detach().cpu().double()
    return score_factored_reference(d(A), d(G), d(V), d(U),
                                    None if am is None else am.cpu(), None if vm is None else vm.cpu())


def test_reference_is_the_formula():
    """The oracle itself: against the materialised per-example gradients, in float64."""
    A, G, V, U = _inputs((4, 3, 5, 2, 6, 4), torch.float64, "cpu")
    D = torch.einsum("nte,ntd->ned", G, A)
    E = torch.einsum("qse,qsd->qed", U, V)
    torch.testing.assert_close(score_factored_reference(A, G, V, U), torch.einsum("ned,qed->nq", D, E))
    am, vm = random_mask(4, 3, "cpu"), random_mask(5, 2, "cpu")
    D = torch.einsum("nte,ntd->ned", G * am[..., None], A)
    E = torch.einsum("qse,qsd->qed", U * vm[..., None], V)
    torch.testing.assert_close(score_factored_reference(A, G, V, U, am, vm),
                               torch.einsum("ned,qed->nq", D, E))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("contraction", ["factored", "materialize", None])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_shapes(backend, device, contraction, shape):
    skip_unusable(backend, device)
    A, G, V, U = _inputs(shape, torch.float32, device)
    out = score_factored(A, G, V, U, backend=backend, contraction=contraction)
    assert_close(out, _ref(A, G, V, U), 2e-5, f"{backend}/{contraction}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("contraction", ["factored", "materialize"])
def test_dtypes(backend, device, dtype, tol, contraction):
    skip_unusable(backend, device)
    A, G, V, U = _inputs((6, 5, 4, 3, 24, 10), dtype, device)
    out = score_factored(A, G, V, U, backend=backend, contraction=contraction)
    assert_close(out, _ref(A, G, V, U), tol, f"{backend}/{dtype}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("contraction", ["factored", "materialize"])
def test_masks_and_nan_in_masked_tokens(backend, device, contraction):
    skip_unusable(backend, device)
    N, T, Q, S, din, dout = 5, 6, 4, 3, 11, 5
    A, G, V, U = _inputs((N, T, Q, S, din, dout), torch.float32, device)
    am = random_mask(N, T, device, all_masked_rows=(2,))
    vm = random_mask(Q, S, device, all_masked_rows=(1,))
    ref = _ref(A, G, V, U, am, vm)
    # Masked tokens must contribute nothing, whatever they hold.
    A, G, V, U = A.clone(), G.clone(), V.clone(), U.clone()
    A[~am] = float("nan"); G[~am] = float("inf"); V[~vm] = float("nan"); U[~vm] = float("nan")
    out = score_factored(A, G, V, U, a_mask=am, v_mask=vm, backend=backend, contraction=contraction)
    assert_close(out, ref, 2e-5, f"{backend}/{contraction}")
    assert (out[2] == 0).all() and (out[:, 1] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_noncontiguous(backend, device):
    skip_unusable(backend, device)
    A, G, V, U = _inputs((4, 5, 3, 4, 9, 6), torch.float32, device, noncontig=True)
    for contraction in ("factored", "materialize"):
        out = score_factored(A, G, V, U, backend=backend, contraction=contraction)
        assert_close(out, _ref(A, G, V, U), 2e-5, contraction)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("N,Q", [(0, 3), (3, 0), (0, 0)])
def test_empty(backend, device, N, Q):
    skip_unusable(backend, device)
    A, G, V, U = _inputs((N, 2, Q, 3, 5, 4), torch.float32, device)
    for contraction in ("factored", "materialize", None):
        out = score_factored(A, G, V, U, backend=backend, contraction=contraction)
        assert out.shape == (N, Q) and out.dtype == torch.float32


def test_chunking_keeps_results(monkeypatch):
    """A tiny workspace forces many tiles; results must not change."""
    A, G, V, U = _inputs((9, 4, 7, 3, 8, 5), torch.float32, "cpu")
    want = _ref(A, G, V, U)
    monkeypatch.setenv("FASTINF_WORKSPACE_MB", "0.0001")
    for backend in ("reference", "torch"):
        for contraction in ("factored", "materialize"):
            x = (A, G, V, U) if backend != "reference" else tuple(t.double() for t in (A, G, V, U))
            out = score_factored(*x, backend=backend, contraction=contraction)
            assert_close(out.float(), want, 2e-5, f"{backend}/{contraction}")


def test_materialize_builds_each_gradient_once(monkeypatch):
    """Tiles of whole gradients rebuilt the inner side once per outer tile (Q/2 times for a
    4096x4096 layer on the H200); chunks of gradient rows over all examples and queries build
    each row once, and beyond the workspace (N, Q > 30 here) once per tile of the other side."""
    import sys
    sf = sys.modules["fastinf.ops.score_factored"]
    monkeypatch.setenv("FASTINF_WORKSPACE_MB", str(480 / 2**20))  # 30 gradient rows of din=2
    rows = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm",
                        lambda a, b, **k: rows.append(a.shape[0] * a.shape[1]) or bmm(a, b, **k))
    dout = 5
    for N, Q in [(2, 20), (20, 2), (13, 13), (40, 3), (40, 40)]:
        A, G, V, U = _inputs((N, 3, Q, 2, 2, dout), torch.float32, "cpu")
        rows.clear()
        out = sf.materialize_torch(A, G, V, U)
        assert_close(out, _ref(A, G, V, U), 2e-5, f"N={N} Q={Q}")
        tiles = lambda n: -(-n // 30)
        assert sum(rows) == dout * (N * tiles(Q) + Q * tiles(N)), (N, Q, rows)


@pytest.mark.parametrize("tile,rows", [(1, 1), (6 * 12 * 3, 3), (10 ** 9, 7)])
@pytest.mark.parametrize("din,dout", [(3, 7), (7, 3)])
def test_materialize_cpu_side_tile_keeps_results(monkeypatch, tile, rows, din, dout):
    """materialize on the CPU: each side's chunk of gradient rows bounded by SIDE_TILE bytes (at
    least one row; a row at a time, chunks that do not divide the rows, all rows), the rows
    taken along the longer of din / dout (each bmm writes rows of the shorter one). 3 rows: all
    6 examples' rows of 3 floats (12 bytes) three times over."""
    import sys
    sf = sys.modules["fastinf.ops.score_factored"]
    monkeypatch.setattr(sf, "SIDE_TILE", tile)
    shapes = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, **k: shapes.append((a.shape, b.shape))
                        or bmm(a, b, **k))
    A, G, V, U = _inputs((6, 4, 5, 3, din, dout), torch.float32, "cpu")
    am, vm = random_mask(6, 4, "cpu"), random_mask(5, 3, "cpu")
    assert_close(sf.materialize_torch(A, G, V, U, am, vm), _ref(A, G, V, U, am, vm), 2e-5)
    assert shapes and all(b[2] == min(din, dout) for _, b in shapes)
    assert max(a[1] for a, _ in shapes) == rows, shapes


def test_plan_follows_flops():
    # MLP layer: factored is cheaper; long sequences with many queries: materialize.
    dims = dict(N=100, Q=100, din=768, dout=768)
    assert plan("score_factored", "cpu", T=1, S=1, **dims) == "factored"
    assert plan("score_factored", "cpu", T=512, S=512, **dims) == "materialize"
    f = flops("score_factored", T=512, S=512, **dims)
    assert f["materialize"] < f["factored"]


def test_default_backend_on_cpu_matches_reference():
    A, G, V, U = _inputs((6, 3, 5, 2, 10, 4), torch.float32, "cpu")
    assert_close(score_factored(A, G, V, U), _ref(A, G, V, U), 2e-5)
    out64 = score_factored(*(t.double() for t in (A, G, V, U)))
    assert out64.dtype == torch.float64


# (N, T, Q, S, din, dout)
CPP_SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (5, 1, 3, 1, 13, 7),          # MLP, odd sizes
    (17, 1, 33, 1, 65, 17),       # not multiples of the 6x16 tile
    (7, 5, 4, 1, 13, 7),          # S = 1 (rank-1 query)
    (3, 1, 5, 9, 33, 65),         # T = 1
    (9, 17, 6, 33, 27, 16),       # conv-like
    (4, 65, 3, 17, 3, 2),
    (13, 33, 11, 65, 17, 33),
    (0, 4, 3, 5, 8, 8),           # N = 0
    (3, 4, 0, 5, 8, 8),           # Q = 0
    (40, 3, 70, 2, 9, 5),         # many blocks / tasks
]


@pytest.mark.parametrize("mask", [None, "random", "holes"])
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_kernel_shapes(shape, mask):
    """The C++ kernel's tiling edges (6x16 micro-tiles, blocks, tasks), with NaN in masked tokens."""
    skip_unusable("cpp", "cpu")
    N, T, Q, S, din, dout = shape
    A, G = torch.randn(N, T, din), torch.randn(N, T, dout)
    V, U = torch.randn(Q, S, din), torch.randn(Q, S, dout)
    am, vm = masks_with_holes(N, T, Q, S, mask)
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double(), am, vm)
    A, G, V, U = poison(A, am), poison(G, am), poison(V, vm), poison(U, vm)
    out = score_factored(A, G, V, U, a_mask=am, v_mask=vm, backend="cpp", contraction="factored")
    assert_close(out, ref, 1e-4)
    if mask == "holes" and N and Q:
        assert (out[0] == 0).all() and (out[:, -1] == 0).all()


def test_cpp_kernel_noncontiguous():
    skip_unusable("cpp", "cpu")
    N, T, Q, S, din, dout = 6, 7, 5, 3, 19, 11
    A = torch.randn(N, din, T).transpose(1, 2)           # [N, T, din], strided
    G = torch.randn(T, N, dout).transpose(0, 1)          # [N, T, dout]
    V = torch.randn(Q, S, 2 * din)[:, :, ::2]            # [Q, S, din], step 2
    U = torch.randn(Q, 2 * S, dout)[:, 1::2]             # [Q, S, dout]
    am = (torch.rand(T, N) > 0.3).T                      # non-contiguous mask
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double(), am, None)
    assert_close(score_factored(A, G, V, U, a_mask=am, backend="cpp", contraction="factored"),
                 ref, 1e-4)


def test_cpp_kernel_deterministic():
    skip_unusable("cpp", "cpu")
    A, G = torch.randn(30, 9, 21), torch.randn(30, 9, 10)
    V, U = torch.randn(20, 7, 21), torch.randn(20, 7, 10)
    a = score_factored(A, G, V, U, backend="cpp", contraction="factored")
    b = score_factored(A, G, V, U, backend="cpp", contraction="factored")
    assert torch.equal(a, b)


def test_cpp_kernel_half_inputs():
    skip_unusable("cpp", "cpu")
    A, G = torch.randn(4, 5, 12), torch.randn(4, 5, 6)
    V, U = torch.randn(3, 2, 12), torch.randn(3, 2, 6)
    A, G, V, U = (x.bfloat16() for x in (A, G, V, U))
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double())
    assert_close(score_factored(A, G, V, U, backend="cpp", contraction="factored"), ref, 1e-4)


# --------------------------------------------------------------------------- triton tile edges
# Under the interpreter blocks are 32: T=1/S=1, odd sizes, sizes across block boundaries, T≠S,
# token counts that need several token blocks; the gpu cases repeat it at realistic sizes.
def _triton(N, T, Q, S, din, dout, dtype, masks=False, noncontig=False, nan=False):
    skip_unusable("triton", TRITON_DEV)
    A = rand(N, T, din, dtype=dtype, noncontig=noncontig)
    G = rand(N, T, dout, dtype=dtype, noncontig=noncontig)
    V = rand(Q, S, din, dtype=dtype, noncontig=noncontig)
    U = rand(Q, S, dout, dtype=dtype, noncontig=noncontig)
    am = mask(N, T, all_masked=(1,)) if masks else None
    vm = mask(Q, S, all_masked=(0,)) if masks else None
    if nan:
        A, G, V, U = poison(A, am), poison(G, am), poison(V, vm), poison(U, vm)
    out = score_factored(A, G, V, U, a_mask=am, v_mask=vm, backend="triton",
                         contraction="factored")
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double(), am, vm)
    return out, ref


# (N, T, Q, S, din, dout): T=1/S=1, odd sizes, sizes across block boundaries (blocks are 32 under
# the interpreter), T≠S, long-ish token counts that need several token blocks.
TRITON_SHAPES = [
    (5, 1, 3, 1, 13, 7),
    (37, 1, 35, 1, 33, 40),
    (3, 5, 4, 3, 13, 7),
    (2, 1, 3, 6, 9, 17),
    (2, 37, 3, 1, 13, 7),
    (2, 33, 2, 40, 35, 5),
]


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_score_factored_triton(shape, dtype):
    close_to_max(*_triton(*shape, dtype), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_score_factored_triton_masks_nan_noncontig(dtype):
    # masks incl. a fully masked example and query, NaN in every masked token, strided inputs
    close_to_max(*_triton(4, 6, 3, 5, 13, 7, dtype, masks=True, noncontig=True, nan=True), dtype)


def test_score_factored_triton_masks_t1():
    out, ref = _triton(6, 1, 5, 1, 13, 7, torch.float32, masks=True, nan=True)
    close_to_max(out, ref, torch.float32)
    assert (out[1] == 0).all() and (out[:, 0] == 0).all()


@pytest.mark.parametrize("N,Q", [(0, 3), (3, 0), (0, 0)])
def test_score_factored_triton_empty(N, Q):
    out, ref = _triton(N, 2, Q, 3, 5, 4, torch.float32)
    assert out.shape == (N, Q) and out.dtype == torch.float32


TRITON_GPU_SHAPES = [
    (300, 1, 200, 1, 1025, 777),      # MLP layer: two GEMMs + Hadamard
    (16, 130, 5, 257, 192, 96),       # sequence model, odd token counts
    (8, 512, 4, 512, 256, 128),       # long sequences
    (64, 37, 48, 16, 100, 33),        # low-rank query factors (S = rank)
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", TRITON_GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_score_factored_triton_gpu(shape, dtype):
    N, T, Q, S, _, _ = shape
    out, ref = _triton(*shape, dtype, masks=T > 1 and S > 1, nan=True)
    close_to_max(out, ref, dtype)
    out2, ref2 = _triton(*shape, dtype, noncontig=True)
    close_to_max(out2, ref2, dtype)


@pytest.mark.gpu
def test_score_factored_triton_gpu_tf32_opt_in():
    """With TF32 allowed the fp32 kernel may use it; results stay within TF32 accuracy."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        out, ref = _triton(64, 9, 32, 7, 256, 128, torch.float32)
    finally:
        torch.set_float32_matmul_precision(prev)
    err = (out.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= 1e-2 * ref.abs().max().item()


# --------------------------------------------------------------------------- cuda tile edges
# The engine (csrc/cuda/score_engine.cuh) pads 64 x 64 tiles of token rows x token columns and
# reduces them per (example, query); the shapes straddle every tile boundary it has: T or S equal
# to 1, below / at / above 64, not dividing 64, K not a multiple of the K step, N above the old
# 65535 grid limit, Q above 65535 query tiles (grid-stride in y).
DEV = "cuda"
# (N, T, Q, S, din, dout)
CUDA_SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (3, 1, 5, 1, 7, 9),        # T = S = 1: 64 examples x 64 queries per block
    (5, 7, 3, 1, 13, 11),
    (2, 1, 4, 6, 33, 65),      # K not a multiple of 16 / 32
    (3, 65, 2, 70, 17, 19),    # T, S > 64: several row and column chunks per pair
    (130, 3, 67, 5, 40, 24),   # 21 examples / 12 queries per block, ragged last tiles
    (4, 100, 2, 129, 130, 31),
    (70, 30, 3, 33, 8, 8),     # 2 examples per block, 60 of 64 rows used
    (2, 64, 3, 64, 16, 32),    # exactly one tile
    (9, 2, 11, 3, 256, 1),     # long din, dout = 1
]


def _factored_refs(A, G, V, U, am, vm):
    d = [x.double().nan_to_num() for x in (A, G, V, U)]
    ref = score_factored_reference(*d, am, vm)
    bound = score_factored_reference(*(x.abs() for x in d), am, vm)
    return ref, bound


def _cuda_factored(A, G, V, U, am=None, vm=None):
    return score_factored(A, G, V, U, a_mask=am, v_mask=vm, backend="cuda", contraction="factored")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_factored_matches_reference(shape, dtype):
    N, T, Q, S, din, dout = shape
    A, G = rand(N, T, din, dtype=dtype, device=DEV), rand(N, T, dout, dtype=dtype, device=DEV)
    V, U = rand(Q, S, din, dtype=dtype, device=DEV), rand(Q, S, dout, dtype=dtype, device=DEV)
    out = _cuda_factored(A, G, V, U)
    check_bounded(out, *_factored_refs(A, G, V, U, None, None), dtype, (N, Q))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_factored_masks_with_nan_in_excluded_tokens(shape, dtype):
    N, T, Q, S, din, dout = shape
    am, vm = mask(N, T, device=DEV), mask(Q, S, device=DEV)
    am[0] = False            # an example with no token
    vm[-1] = False           # a query with no token
    A = poison(rand(N, T, din, dtype=dtype, device=DEV), am)
    G = poison(rand(N, T, dout, dtype=dtype, device=DEV), am)
    V = poison(rand(Q, S, din, dtype=dtype, device=DEV), vm)
    U = poison(rand(Q, S, dout, dtype=dtype, device=DEV), vm)
    out = _cuda_factored(A, G, V, U, am, vm)
    check_bounded(out, *_factored_refs(A, G, V, U, am, vm), dtype, (N, Q))
    assert (out[0] == 0).all() and (out[:, -1] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_factored_only_onemask(dtype, device=DEV):
    N, T, Q, S, din, dout = 6, 5, 4, 3, 9, 7
    A, G = rand(N, T, din, dtype=dtype, device=DEV), rand(N, T, dout, dtype=dtype, device=DEV)
    V, U = rand(Q, S, din, dtype=dtype, device=DEV), rand(Q, S, dout, dtype=dtype, device=DEV)
    am, vm = mask(N, T, device=DEV), mask(Q, S, device=DEV)
    check_bounded(_cuda_factored(A, G, V, U, am, None), *_factored_refs(A, G, V, U, am, None), dtype, (N, Q))
    check_bounded(_cuda_factored(A, G, V, U, None, vm), *_factored_refs(A, G, V, U, None, vm), dtype, (N, Q))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_factored_many_examples(dtype):
    # N > 65535 (the old grid limit) with tiny other dimensions; T = 2 -> 32 examples per block.
    N, T, Q, S, din, dout = 70_001, 2, 3, 2, 5, 4
    A, G = rand(N, T, din, dtype=dtype, device=DEV), rand(N, T, dout, dtype=dtype, device=DEV)
    V, U = rand(Q, S, din, dtype=dtype, device=DEV), rand(Q, S, dout, dtype=dtype, device=DEV)
    am = mask(N, T, device=DEV)
    check_bounded(_cuda_factored(A, G, V, U, am), *_factored_refs(A, G, V, U, am, None), dtype, (N, Q))


@pytest.mark.gpu
def test_factored_many_query_tiles():
    # More than 65535 query tiles (64 queries each): the grid-stride loop over grid.y.
    N, T, Q, S, din, dout = 3, 1, 64 * 65_535 + 70, 1, 2, 2
    dtype = torch.float32
    A, G = rand(N, T, din, dtype=dtype, device=DEV), rand(N, T, dout, dtype=dtype, device=DEV)
    V, U = rand(Q, S, din, dtype=dtype, device=DEV), rand(Q, S, dout, dtype=dtype, device=DEV)
    check_bounded(_cuda_factored(A, G, V, U), *_factored_refs(A, G, V, U, None, None), dtype, (N, Q))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_factored_non_contiguous(dtype):
    N, T, Q, S, din, dout = 9, 6, 5, 4, 10, 12
    A = rand(N, din, T, dtype=dtype, device=DEV).transpose(1, 2)            # strided view
    G = rand(2 * N, T, dout, dtype=dtype, device=DEV)[::2]                  # every other example
    V = rand(Q, S, din + 3, dtype=dtype, device=DEV)[:, :, 1:din + 1]       # sliced features
    U = rand(S, Q, dout, dtype=dtype, device=DEV).permute(1, 0, 2)
    am = mask(T, N, device=DEV).t()
    assert not any(x.is_contiguous() for x in (A, G, V, U, am))
    out = _cuda_factored(A, G, V, U, am)
    check_bounded(out, *_factored_refs(A, G, V, U, am, None), dtype, (N, Q))


@pytest.mark.gpu
@pytest.mark.parametrize("N,Q", [(0, 3), (4, 0), (0, 0)])
def test_factored_empty(N, Q):
    A, G = rand(N, 2, 3, dtype=torch.float32, device=DEV), rand(N, 2, 4, dtype=torch.float32, device=DEV)
    V, U = rand(Q, 5, 3, dtype=torch.float32, device=DEV), rand(Q, 5, 4, dtype=torch.float32, device=DEV)
    out = _cuda_factored(A, G, V, U)
    assert out.shape == (N, Q) and out.dtype == torch.float32


@pytest.mark.gpu
def test_factored_runs_on_callers_stream():
    N, T, Q, S, din, dout = 40, 3, 30, 2, 20, 24
    A, G = rand(N, T, din, dtype=torch.float16, device=DEV), rand(N, T, dout, dtype=torch.float16, device=DEV)
    V, U = rand(Q, S, din, dtype=torch.float16, device=DEV), rand(Q, S, dout, dtype=torch.float16, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = _cuda_factored(A, G, V, U)
    torch.cuda.current_stream().wait_stream(s)
    check_bounded(out, *_factored_refs(A, G, V, U, None, None), torch.float16, (N, Q))
