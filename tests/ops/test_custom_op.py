"""The ops are torch.library custom ops: they pass opcheck and run inside torch.compile."""
import pytest
import torch

from fastinf.ops import score_dense, score_factored


def _factored_args():
    return (torch.randn(4, 3, 6), torch.randn(4, 3, 5), torch.randn(2, 2, 6), torch.randn(2, 2, 5))


def test_registered():
    assert hasattr(torch.ops.fastinf, "score_factored")
    assert hasattr(torch.ops.fastinf, "score_dense")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    A, G, V, U = _factored_args()
    m = torch.rand(4, 3) > 0.2
    torch.library.opcheck(torch.ops.fastinf.score_factored.default,
                          (A, G, V, U, m, None, backend, "auto"))
    torch.library.opcheck(torch.ops.fastinf.score_dense.default,
                          (A, G, torch.randn(3, 5, 6), None, backend, "token"))


def test_inside_torch_compile():
    A, G, V, U = _factored_args()
    M = torch.randn(3, 5, 6)

    def f(A, G, V, U, M):
        return score_factored(A, G, V, U, backend="cpu") * 2 + score_dense(A, G, M, backend="cpu").sum()

    want = f(A, G, V, U, M)
    got = torch.compile(f, backend="eager", fullgraph=True)(A, G, V, U, M)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- every op
def test_all_ops_registered():
    for op in ("score_factored", "score_dense", "ekfac_lambda", "kron_project", "jl_project"):
        assert hasattr(torch.ops.fastinf, op), op


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck_projection_and_lambda_ops(backend):
    A, G = torch.randn(4, 3, 6), torch.randn(4, 3, 5)
    m = torch.rand(4, 3) > 0.2
    QA = torch.linalg.qr(torch.randn(6, 6))[0].contiguous()
    QS = torch.linalg.qr(torch.randn(5, 5))[0].contiguous()
    torch.library.opcheck(torch.ops.fastinf.ekfac_lambda.default,
                          (A, G, QA, QS, m, backend, "auto"))
    torch.library.opcheck(torch.ops.fastinf.kron_project.default,
                          (A, G, torch.randn(6, 2), torch.randn(5, 3), m, backend, "auto"))
    for kind in ("rademacher", "normal"):
        torch.library.opcheck(torch.ops.fastinf.jl_project.default,
                              (torch.randn(3, 37), 7, 12345, kind, backend))


def test_every_op_inside_torch_compile():
    from fastinf.ops import ekfac_lambda, jl_project, kron_project

    A, G, V, U = _factored_args()
    M = torch.randn(3, 5, 6)
    QA = torch.linalg.qr(torch.randn(6, 6))[0].contiguous()
    QS = torch.linalg.qr(torch.randn(5, 5))[0].contiguous()
    P_in, P_out = torch.randn(6, 2), torch.randn(5, 3)
    X = torch.randn(3, 37)

    def f(A, G, V, U, M, QA, QS, P_in, P_out, X):
        # default backends: their resolution must stay outside the graph
        return (score_factored(A, G, V, U).sum() + score_dense(A, G, M).sum()
                + ekfac_lambda(A, G, QA, QS).sum() + kron_project(A, G, P_in, P_out).sum()
                + jl_project(X, 5, seed=3).sum() + jl_project(X, 4, seed=-1, kind="normal").sum())

    args = (A, G, V, U, M, QA, QS, P_in, P_out, X)
    want = f(*args)
    got = torch.compile(f, backend="eager", fullgraph=True)(*args)
    torch.testing.assert_close(got, want)
