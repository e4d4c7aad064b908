"""CUDA kernels on the edges of their tilings (gpu-marked; compared with float64 references).

csrc/cuda/score_engine.cuh stages 64-row operand tiles in K steps of 16 (fp32) / 32 (f16, bf16) with
cp.async when K is a multiple of the 16-byte chunk (4 / 8 elements) and the operand is 16-byte
aligned, element by element otherwise, double-buffered; outputs of blocks with several 64 x 64
chunks (T or S/dout > 64) are stored by the first chunk and added to by the next ones.
ekfac_lambda walks token rows in steps of 16 with 64 x 64 output tiles, folding at each example's
last row, and splits the examples over several blocks per tile (partial sums added in a fixed order)
when the tiles are fewer than 2 per SM and there are >= 512 token rows; kron_project projects 16 tokens at a time onto 64-column tiles of P_in / P_out in K steps
of 16, with 16 // T whole examples per block when T < 16. The cases below hit: one and many K steps (odd and even counts: both stages of the double
buffer), chunk-aligned and unaligned K, operands whose base is not 16-byte aligned, several row and
column chunks, examples straddling 16-row steps, T = 1, ragged output tiles, NaN under masks.
"""
import pytest
import torch

from fastinf import backends
from fastinf.ops import (ekfac_lambda, ekfac_lambda_reference, kron_project,
                         kron_project_reference, score_dense, score_dense_reference,
                         score_factored, score_factored_reference)

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _need_cuda_backend():
    if not backends()["cuda"].available:
        pytest.fail(f"the cuda backend is not available on a GPU machine: {backends()['cuda']}")


def _rand(*shape, dtype, offset=0):
    """Contiguous cuda tensor; offset > 0 shifts its base by `offset` elements (not 16-byte aligned)."""
    n = 1
    for s in shape:
        n *= s
    flat = torch.randn(n + offset, device="cuda").to(dtype)
    return flat[offset:].view(*shape)


def _poison(x, mask):
    """NaN in the excluded tokens, in place (keeps a shifted base)."""
    x[~mask] = float("nan")
    return x


def _bounded(out, ref, bound, tol):
    out, ref, bound = out.double().cpu(), ref.cpu(), bound.cpu()
    assert torch.isfinite(out).all()
    err = (out - ref).abs()
    assert (err <= tol * bound + 1e-30).all(), float(err.max())


# (N, T, Q, S, din, dout): K steps fp32/f16 for din | dout in the comments
FACTORED = [
    (3, 5, 4, 3, 96, 72),      # din: 6 / 3 steps, dout: 5 (odd) / 3 steps, chunk-aligned
    (2, 130, 3, 70, 64, 40),   # 3 row chunks x 2 column chunks (stored, then added twice)
    (5, 17, 6, 9, 36, 44),     # 36, 44: fp32 cp.async, f16 element-wise (not multiples of 8)
    (4, 1, 130, 1, 8, 8),      # T = S = 1, one K step, 3 query tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FACTORED)
@pytest.mark.parametrize("offset", [0, 1])
def test_score_factored_tiles(shape, dtype, offset):
    N, T, Q, S, din, dout = shape
    A, G = _rand(N, T, din, dtype=dtype, offset=offset), _rand(N, T, dout, dtype=dtype)
    V, U = _rand(Q, S, din, dtype=dtype), _rand(Q, S, dout, dtype=dtype, offset=offset)
    am = torch.rand(N, T, device="cuda") > 0.3
    vm = torch.rand(Q, S, device="cuda") > 0.3
    A, U = _poison(A, am), _poison(U, vm)
    out = score_factored(A, G, V, U, a_mask=am, v_mask=vm, backend="cuda", contraction="factored")
    d = [x.double().nan_to_num() for x in (A, G, V, U)]
    ref = score_factored_reference(*d, am, vm)
    bound = score_factored_reference(*(x.abs() for x in d), am, vm)
    _bounded(out, ref, bound, TOL[dtype])


# (N, T, Q, din, dout)
DENSE = [
    (3, 70, 2, 96, 130),       # 2 row chunks x 3 column chunks, 6 / 3 K steps
    (6, 9, 5, 44, 20),         # 44: fp32 cp.async, f16 element-wise; 3 queries per block
    (2, 3, 4, 200, 64),        # 13 (odd) / 7 K steps
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DENSE)
@pytest.mark.parametrize("offset", [0, 1])
def test_score_dense_tiles(shape, dtype, offset):
    N, T, Q, din, dout = shape
    A, G = _rand(N, T, din, dtype=dtype, offset=offset), _rand(N, T, dout, dtype=dtype)
    M = _rand(Q, dout, din, dtype=dtype, offset=offset)
    am = torch.rand(N, T, device="cuda") > 0.3
    A = _poison(A, am)
    out = score_dense(A, G, M, a_mask=am, backend="cuda", contraction="token")
    d = [x.double().nan_to_num() for x in (A, G, M)]
    _bounded(out, score_dense_reference(*d, am),
             score_dense_reference(*(x.abs() for x in d), am), TOL[dtype])


def _orth(d):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q.cuda()


# (N, T, din, dout)
EKFAC = [
    (37, 1, 70, 65),    # T = 1: every row ends an example; ragged 64-tiles, not multiples of 4
    (5, 17, 128, 96),   # examples straddle 16-row steps; cp.async path; 6 steps
    (3, 40, 9, 130),    # 120 rows = 7.5 steps; din < 4 chunks of a row
    (300, 7, 33, 20),   # 2100 rows on one tile: examples split over up to 8 blocks, summed after
    (130, 5, 70, 66),   # 650 rows on 4 tiles: 2 splits of 65 examples
]


@pytest.mark.parametrize("shape", EKFAC)
def test_ekfac_lambda_tiles(shape):
    N, T, din, dout = shape
    A = torch.randn(N, T, din, dtype=torch.float64, device="cuda")
    G = torch.randn(N, T, dout, dtype=torch.float64, device="cuda")
    QA, QS = _orth(din), _orth(dout)
    m = torch.rand(N, T, device="cuda") > 0.3
    m[0] = False
    A[0] = float("nan")  # an all-masked example holding garbage
    ref = ekfac_lambda_reference(A, G, QA, QS, m).cpu()
    out = ekfac_lambda(A.float(), G.float(), QA.float(), QS.float(), a_mask=m, backend="cuda",
                       contraction="rotate")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert err <= 2e-5, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ekfac_lambda_half_kernels(dtype):
    """The f16/bf16 instantiations (the op passes float32 rotated factors; called directly here)."""
    from fastinf.ops import _common as c

    C = c.require_native("ekfac_lambda")
    N, T, din, dout = 4, 19, 72, 66
    At = torch.randn(N, T, din, device="cuda").to(dtype)
    Gt = torch.randn(N, T, dout, device="cuda").to(dtype)
    m = torch.rand(N, T, device="cuda") > 0.3
    out = torch.full((dout, din), float("nan"), device="cuda")
    C.ekfac_lambda_cuda(At.data_ptr(), Gt.data_ptr(), m.data_ptr(), out.data_ptr(), N, T, din,
                        dout, c.CUDA_DTYPE_CODES[dtype], c.cuda_stream(At.device))
    a, g = At.double() * m[..., None], Gt.double() * m[..., None]
    ref = (torch.einsum("nto,nti->noi", g, a) ** 2).sum(0)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, err  # same rounded inputs, fp32 accumulation


# (N, T, din, dout, k_in, k_out)
KRON = [
    (3, 37, 50, 23, 70, 130),   # 2 x 3 Y tiles (ragged), 3 token steps, K not multiple of 16
    (2, 16, 64, 128, 64, 64),   # exactly one tile and one token step
    (4, 1, 7, 300, 5, 3),       # T = 1: 16 examples per block (4 here), 19 K steps over dout
    (11, 3, 20, 9, 66, 7),      # T = 3: 5 examples per block, last block holds 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KRON)
def test_kron_project_tiles(shape, dtype):
    N, T, din, dout, k_in, k_out = shape
    A, G = torch.randn(N, T, din).to(dtype), torch.randn(N, T, dout).to(dtype)
    Pi, Po = torch.randn(din, k_in).to(dtype), torch.randn(dout, k_out).to(dtype)
    m = torch.rand(N, T) > 0.3
    m[0] = False
    A[0] = float("nan")  # an all-masked example holding garbage: its Y must be exactly 0
    y = kron_project(A.cuda(), G.cuda(), Pi.cuda(), Po.cuda(), a_mask=m.cuda(), backend="cuda",
                     contraction="project").cpu()
    d = [x.double().nan_to_num() for x in (A, G, Pi, Po)]
    ref = kron_project_reference(*d, m)
    bound = kron_project_reference(*(x.abs() for x in d), m)
    assert y.shape == (N, k_out, k_in) and y.dtype == torch.float32
    assert (y[0] == 0).all()
    _bounded(y, ref, bound, TOL[dtype])
