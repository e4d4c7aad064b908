"""kron_project: every backend and contraction against the float64 reference."""
import pytest
import torch

from fastinf._native import available
from fastinf.ops import kron_project, kron_project_reference
from fastinf.ops import flops, plan

BACKENDS = ["torch"] + [b for b in ("cpp", "triton") if available(b)]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# N, T, din, dout, k_in, k_out
SHAPES = [(0, 3, 4, 5, 2, 3), (1, 1, 1, 1, 1, 1), (3, 5, 7, 9, 4, 6), (2, 17, 33, 10, 20, 3)]


def _inputs(N, T, din, dout, k_in, k_out, dtype=torch.float32):
    return (torch.randn(N, T, din, dtype=dtype), torch.randn(N, T, dout, dtype=dtype),
            torch.randn(din, k_in, dtype=dtype), torch.randn(dout, k_out, dtype=dtype))


def _close(y, r, tol):
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    torch.testing.assert_close(y.double(), r, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("contraction", ["project", "materialize"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_backends_match_reference(backend, contraction, shape, masked):
    A, G, Pi, Po = _inputs(*shape)
    m = torch.rand(shape[0], shape[1]) > 0.4 if masked else None
    y = kron_project(A, G, Pi, Po, a_mask=m, backend=backend, contraction=contraction)
    r = kron_project_reference(A.double(), G.double(), Pi.double(), Po.double(), m)
    assert y.shape == (shape[0], shape[5], shape[4]) and y.dtype == torch.float32
    _close(y, r, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_and_nan_under_mask(backend):
    A, G, Pi, Po = _inputs(2, 4, 5, 3, 2, 2)
    m = torch.zeros(2, 4, dtype=torch.bool)
    assert kron_project(A, G, Pi, Po, a_mask=m, backend=backend).abs().max() == 0
    m[:, :2] = True
    A[:, 3] = float("nan")  # excluded tokens may hold anything
    y = kron_project(A, G, Pi, Po, a_mask=m, backend=backend, contraction="project")
    r = kron_project_reference(A[:, :2].double(), G[:, :2].double(), Pi.double(), Po.double())
    _close(y, r, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    A = torch.randn(3, 7, 6).transpose(1, 2)  # [3, 6, 7]
    G = torch.randn(3, 5, 6).transpose(1, 2)  # [3, 6, 5]
    Pi, Po = torch.randn(4, 7).T, torch.randn(3, 5).T
    y = kron_project(A, G, Pi, Po, backend=backend)
    _close(y, kron_project_reference(A.double(), G.double(), Pi.double(), Po.double()), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half(backend, dtype):
    A, G, Pi, Po = _inputs(2, 5, 8, 6, 4, 3, dtype)
    y = kron_project(A, G, Pi, Po, backend=backend)
    r = kron_project_reference(*(x.double() for x in (A, G, Pi, Po)))
    _close(y, r, TOL[dtype])


def test_equals_projected_gradient():
    A, G, Pi, Po = _inputs(2, 3, 4, 5, 3, 2, torch.float64)
    D = G.transpose(1, 2) @ A
    torch.testing.assert_close(kron_project(A, G, Pi, Po, backend="reference"), Po.T @ D @ Pi)


def test_plan():
    dims = dict(N=10, din=100, dout=100, k_in=16, k_out=16)
    assert plan("kron_project", "cpu", T=1, **dims) == "project"
    assert plan("kron_project", "cpu", N=10, T=4096, din=8, dout=8, k_in=8, k_out=8) == "materialize"
    assert set(flops("kron_project", T=1, **dims)) == {"project", "materialize"}


def test_validation():
    A, G, Pi, Po = _inputs(2, 3, 4, 5, 3, 2)
    with pytest.raises(ValueError, match="'P_in'.*din=4"):
        kron_project(A, G, torch.randn(5, 3), Po)
    with pytest.raises(ValueError, match="'G'"):
        kron_project(A, G[:1], Pi, Po)
    with pytest.raises(ValueError, match="a_mask"):
        kron_project(A, G, Pi, Po, a_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="different dtypes"):
        kron_project(A, G.double(), Pi, Po)
    with pytest.raises(ValueError, match="unknown contraction"):
        kron_project(A, G, Pi, Po, contraction="x")
    A[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="'A' has non-finite"):
        kron_project(A, G, Pi, Po)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu(backend, dtype):
    A, G, Pi, Po = _inputs(5, 19, 40, 33, 20, 17, dtype)
    m = torch.rand(5, 19) > 0.3
    y = kron_project(A.cuda(), G.cuda(), Pi.cuda(), Po.cuda(), a_mask=m.cuda(), backend=backend,
                     contraction="project")
    r = kron_project_reference(*(x.double() for x in (A, G, Pi, Po)), m)
    _close(y.cpu(), r, TOL[dtype])
