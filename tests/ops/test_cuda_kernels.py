"""CUDA kernels of score_factored / score_dense against the float64 references.

The tiled kernels (csrc/cuda/common.cuh) pad 64 x 64 tiles of token rows x token columns and
reduce them per (example, query); the shapes below straddle every tile boundary they have:
T or S equal to 1, below / at / above 64, not dividing 64, K (din, dout) not a multiple of the
K step, N above the old 65535 grid limit, Q above 65535 query tiles (grid-stride in y).

Errors are bounded elementwise by ``tol * bound`` where ``bound`` is the same score computed on
absolute values (the sum of |terms|), so cancellation in a score cannot make a correct kernel
fail nor hide a wrong one.
"""
import pytest
import torch

import fastinf
from fastinf.ops import (score_dense, score_dense_reference, score_factored,
                         score_factored_reference)

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = list(TOL)

# (N, T, Q, S, din, dout)
FACTORED_SHAPES = [
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
# (N, T, Q, din, dout)
DENSE_SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 1, 5, 7, 9),
    (5, 7, 3, 13, 11),
    (2, 65, 3, 5, 70),         # T, dout > 64
    (130, 3, 67, 40, 1),       # dout = 1: 64 queries per block
    (70, 30, 3, 8, 33),
    (4, 100, 2, 33, 129),
    (3, 2, 2, 100, 64),
]

gpu = pytest.mark.gpu


def _rand(*shape, dtype, device="cuda"):
    return torch.randn(*shape, device=device).to(dtype)


def _mask(*shape, p=0.3, device="cuda"):
    return torch.rand(*shape, device=device) > p


def _poison(x, mask):
    """x with NaN in the excluded tokens (mask False): must not reach the scores."""
    x = x.clone()
    x[~mask] = float("nan")
    return x


def _check(out, ref, bound, dtype, shape):
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert tuple(out.shape) == tuple(shape)
    out = out.double().cpu()
    ref, bound = ref.cpu(), bound.cpu()
    assert torch.isfinite(out).all()
    err = (out - ref).abs()
    lim = TOL[dtype] * bound + 1e-30
    bad = err > lim
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} scores off; worst err "
                           f"{float(err.max()):.3g}, bound there {float(bound.flatten()[err.argmax()]):.3g}")


def _factored_refs(A, G, V, U, am, vm):
    d = [x.double().nan_to_num() for x in (A, G, V, U)]
    ref = score_factored_reference(*d, am, vm)
    bound = score_factored_reference(*(x.abs() for x in d), am, vm)
    return ref, bound


def _dense_refs(A, G, M, am):
    d = [x.double().nan_to_num() for x in (A, G, M)]
    return score_dense_reference(*d, am), score_dense_reference(*(x.abs() for x in d), am)


def _cuda_factored(A, G, V, U, am=None, vm=None):
    return score_factored(A, G, V, U, a_mask=am, v_mask=vm, backend="cuda", contraction="factored")


def _cuda_dense(A, G, M, am=None):
    return score_dense(A, G, M, a_mask=am, backend="cuda", contraction="token")


# --------------------------------------------------------------------------- score_factored
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FACTORED_SHAPES, ids=str)
def test_factored_matches_reference(shape, dtype):
    N, T, Q, S, din, dout = shape
    A, G = _rand(N, T, din, dtype=dtype), _rand(N, T, dout, dtype=dtype)
    V, U = _rand(Q, S, din, dtype=dtype), _rand(Q, S, dout, dtype=dtype)
    out = _cuda_factored(A, G, V, U)
    _check(out, *_factored_refs(A, G, V, U, None, None), dtype, (N, Q))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FACTORED_SHAPES, ids=str)
def test_factored_masks_with_nan_in_excluded_tokens(shape, dtype):
    N, T, Q, S, din, dout = shape
    am, vm = _mask(N, T), _mask(Q, S)
    am[0] = False            # an example with no token
    vm[-1] = False           # a query with no token
    A = _poison(_rand(N, T, din, dtype=dtype), am)
    G = _poison(_rand(N, T, dout, dtype=dtype), am)
    V = _poison(_rand(Q, S, din, dtype=dtype), vm)
    U = _poison(_rand(Q, S, dout, dtype=dtype), vm)
    out = _cuda_factored(A, G, V, U, am, vm)
    _check(out, *_factored_refs(A, G, V, U, am, vm), dtype, (N, Q))
    assert (out[0] == 0).all() and (out[:, -1] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_factored_only_one_mask(dtype):
    N, T, Q, S, din, dout = 6, 5, 4, 3, 9, 7
    A, G = _rand(N, T, din, dtype=dtype), _rand(N, T, dout, dtype=dtype)
    V, U = _rand(Q, S, din, dtype=dtype), _rand(Q, S, dout, dtype=dtype)
    am, vm = _mask(N, T), _mask(Q, S)
    _check(_cuda_factored(A, G, V, U, am, None), *_factored_refs(A, G, V, U, am, None), dtype, (N, Q))
    _check(_cuda_factored(A, G, V, U, None, vm), *_factored_refs(A, G, V, U, None, vm), dtype, (N, Q))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_factored_many_examples(dtype):
    # N > 65535 (the old grid limit) with tiny other dimensions; T = 2 -> 32 examples per block.
    N, T, Q, S, din, dout = 70_001, 2, 3, 2, 5, 4
    A, G = _rand(N, T, din, dtype=dtype), _rand(N, T, dout, dtype=dtype)
    V, U = _rand(Q, S, din, dtype=dtype), _rand(Q, S, dout, dtype=dtype)
    am = _mask(N, T)
    _check(_cuda_factored(A, G, V, U, am), *_factored_refs(A, G, V, U, am, None), dtype, (N, Q))


@gpu
def test_factored_many_query_tiles():
    # More than 65535 query tiles (64 queries each): the grid-stride loop over grid.y.
    N, T, Q, S, din, dout = 3, 1, 64 * 65_535 + 70, 1, 2, 2
    dtype = torch.float32
    A, G = _rand(N, T, din, dtype=dtype), _rand(N, T, dout, dtype=dtype)
    V, U = _rand(Q, S, din, dtype=dtype), _rand(Q, S, dout, dtype=dtype)
    _check(_cuda_factored(A, G, V, U), *_factored_refs(A, G, V, U, None, None), dtype, (N, Q))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_factored_non_contiguous(dtype):
    N, T, Q, S, din, dout = 9, 6, 5, 4, 10, 12
    A = _rand(N, din, T, dtype=dtype).transpose(1, 2)            # strided view
    G = _rand(2 * N, T, dout, dtype=dtype)[::2]                  # every other example
    V = _rand(Q, S, din + 3, dtype=dtype)[:, :, 1:din + 1]       # sliced features
    U = _rand(S, Q, dout, dtype=dtype).permute(1, 0, 2)
    am = _mask(T, N).t()
    assert not any(x.is_contiguous() for x in (A, G, V, U, am))
    out = _cuda_factored(A, G, V, U, am)
    _check(out, *_factored_refs(A, G, V, U, am, None), dtype, (N, Q))


@gpu
@pytest.mark.parametrize("N,Q", [(0, 3), (4, 0), (0, 0)])
def test_factored_empty(N, Q):
    A, G = _rand(N, 2, 3, dtype=torch.float32), _rand(N, 2, 4, dtype=torch.float32)
    V, U = _rand(Q, 5, 3, dtype=torch.float32), _rand(Q, 5, 4, dtype=torch.float32)
    out = _cuda_factored(A, G, V, U)
    assert out.shape == (N, Q) and out.dtype == torch.float32


@gpu
def test_factored_runs_on_callers_stream():
    N, T, Q, S, din, dout = 40, 3, 30, 2, 20, 24
    A, G = _rand(N, T, din, dtype=torch.float16), _rand(N, T, dout, dtype=torch.float16)
    V, U = _rand(Q, S, din, dtype=torch.float16), _rand(Q, S, dout, dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = _cuda_factored(A, G, V, U)
    torch.cuda.current_stream().wait_stream(s)
    _check(out, *_factored_refs(A, G, V, U, None, None), torch.float16, (N, Q))


# --------------------------------------------------------------------------- score_dense
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
def test_dense_matches_reference(shape, dtype):
    N, T, Q, din, dout = shape
    A, G, M = _rand(N, T, din, dtype=dtype), _rand(N, T, dout, dtype=dtype), _rand(Q, dout, din, dtype=dtype)
    out = _cuda_dense(A, G, M)
    _check(out, *_dense_refs(A, G, M, None), dtype, (N, Q))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
def test_dense_masks_with_nan_in_excluded_tokens(shape, dtype):
    N, T, Q, din, dout = shape
    am = _mask(N, T)
    am[-1] = False
    A = _poison(_rand(N, T, din, dtype=dtype), am)
    G = _poison(_rand(N, T, dout, dtype=dtype), am)
    M = _rand(Q, dout, din, dtype=dtype)
    out = _cuda_dense(A, G, M, am)
    _check(out, *_dense_refs(A, G, M, am), dtype, (N, Q))
    assert (out[-1] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_many_examples(dtype):
    N, T, Q, din, dout = 66_000, 1, 2, 3, 5
    A, G, M = _rand(N, T, din, dtype=dtype), _rand(N, T, dout, dtype=dtype), _rand(Q, dout, din, dtype=dtype)
    am = _mask(N, T)
    _check(_cuda_dense(A, G, M, am), *_dense_refs(A, G, M, am), dtype, (N, Q))


@gpu
def test_dense_many_query_tiles():
    N, T, Q, din, dout = 2, 3, 64 * 65_535 + 5, 2, 1
    A = _rand(N, T, din, dtype=torch.float32)
    G = _rand(N, T, dout, dtype=torch.float32)
    M = _rand(Q, dout, din, dtype=torch.float32)
    _check(_cuda_dense(A, G, M), *_dense_refs(A, G, M, None), torch.float32, (N, Q))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_non_contiguous(dtype):
    N, T, Q, din, dout = 7, 5, 4, 11, 9
    A = _rand(N, din, T, dtype=dtype).transpose(1, 2)
    G = _rand(N, T, dout + 2, dtype=dtype)[:, :, 2:]
    M = _rand(Q, din, dout, dtype=dtype).transpose(1, 2)
    am = _mask(T, N).t()
    out = _cuda_dense(A, G, M, am)
    _check(out, *_dense_refs(A, G, M, am), dtype, (N, Q))


@gpu
@pytest.mark.parametrize("N,Q", [(0, 3), (4, 0), (0, 0)])
def test_dense_empty(N, Q):
    A, G, M = (_rand(N, 2, 3, dtype=torch.float32), _rand(N, 2, 4, dtype=torch.float32),
               _rand(Q, 4, 3, dtype=torch.float32))
    out = _cuda_dense(A, G, M)
    assert out.shape == (N, Q) and out.dtype == torch.float32


# --------------------------------------------------------------------------- without a GPU
def test_cuda_module_surface_and_backend_report():
    C = fastinf._native.native()
    if C is None or not C.cuda_built:
        pytest.skip("fastinf._C was built without the CUDA kernels")
    assert callable(C.score_factored_cuda) and callable(C.score_dense_cuda)
    st = fastinf.backends()["cuda"]
    if torch.cuda.is_available():
        assert st.available, st.detail
    else:
        assert not st.available
        assert "no GPU visible" in st.detail, st.detail
