"""score_factored: every backend and contraction order against the float64 reference."""
import pytest
import torch

from fastinf.ops import score_factored, score_factored_reference
from fastinf.ops import flops, plan

from _cases import (BACKENDS, DTYPES, assert_close, make, masks_with_holes, poison,
                    random_mask, skip_unusable)

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


@pytest.mark.parametrize("backend", ["cpu", "cpp"])
@pytest.mark.parametrize("mask", [None, "random", "holes"])
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_shapes(shape, mask, backend):
    """The C++ kernel's tiling edges (6x16 micro-tiles, blocks, tasks), with NaN in masked tokens."""
    skip_unusable(backend, "cpu")
    N, T, Q, S, din, dout = shape
    A, G = torch.randn(N, T, din), torch.randn(N, T, dout)
    V, U = torch.randn(Q, S, din), torch.randn(Q, S, dout)
    am, vm = masks_with_holes(N, T, Q, S, mask)
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double(), am, vm)
    A, G, V, U = poison(A, am), poison(G, am), poison(V, vm), poison(U, vm)
    out = score_factored(A, G, V, U, a_mask=am, v_mask=vm, backend=backend, contraction="factored")
    assert_close(out, ref, 1e-4)
    if mask == "holes" and N and Q:
        assert (out[0] == 0).all() and (out[:, -1] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "cpp"])
def test_cpu_kernel_noncontiguous(backend):
    skip_unusable(backend, "cpu")
    N, T, Q, S, din, dout = 6, 7, 5, 3, 19, 11
    A = torch.randn(N, din, T).transpose(1, 2)           # [N, T, din], strided
    G = torch.randn(T, N, dout).transpose(0, 1)          # [N, T, dout]
    V = torch.randn(Q, S, 2 * din)[:, :, ::2]            # [Q, S, din], step 2
    U = torch.randn(Q, 2 * S, dout)[:, 1::2]             # [Q, S, dout]
    am = (torch.rand(T, N) > 0.3).T                      # non-contiguous mask
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double(), am, None)
    assert_close(score_factored(A, G, V, U, a_mask=am, backend=backend, contraction="factored"),
                 ref, 1e-4)


def test_cpp_kernel_deterministic():
    skip_unusable("cpp", "cpu")
    A, G = torch.randn(30, 9, 21), torch.randn(30, 9, 10)
    V, U = torch.randn(20, 7, 21), torch.randn(20, 7, 10)
    a = score_factored(A, G, V, U, backend="cpp", contraction="factored")
    b = score_factored(A, G, V, U, backend="cpp", contraction="factored")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "cpp"])
def test_cpu_kernel_half_inputs(backend):
    skip_unusable(backend, "cpu")
    A, G = torch.randn(4, 5, 12), torch.randn(4, 5, 6)
    V, U = torch.randn(3, 2, 12), torch.randn(3, 2, 6)
    A, G, V, U = (x.bfloat16() for x in (A, G, V, U))
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double())
    assert_close(score_factored(A, G, V, U, backend=backend, contraction="factored"), ref, 1e-4)
