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
