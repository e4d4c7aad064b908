"""score_factored: every backend and contraction order against the float64 reference."""
import pytest
import torch

from fastinf.ops import score_factored, score_factored_reference
from fastinf.ops.score_factored import flops, plan

from _cases import BACKENDS, DTYPES, assert_close, make, random_mask, skip_unusable

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
    assert plan(100, 1, 100, 1, 512, 512) == "factored"
    assert plan(100, 512, 100, 512, 768, 768) == "materialize"
    f = flops(100, 512, 100, 512, 768, 768)
    assert f["materialize"] < f["factored"]


def test_default_backend_on_cpu_matches_reference():
    A, G, V, U = _inputs((6, 3, 5, 2, 10, 4), torch.float32, "cpu")
    assert_close(score_factored(A, G, V, U), _ref(A, G, V, U), 2e-5)
    out64 = score_factored(*(t.double() for t in (A, G, V, U)))
    assert out64.dtype == torch.float64
