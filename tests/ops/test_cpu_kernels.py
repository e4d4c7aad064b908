"""C++ (OpenMP) CPU kernels of score_factored / score_dense against the float64 references.

Each case runs twice: through the public op with ``backend="cpu"`` (which may dispatch to the
torch formulation where that measured faster) and straight through the compiled kernel, so the
C++ code is exercised on every adversarial shape whatever the dispatch rule decides.
"""
import importlib

import pytest
import torch

from fastinf import _native
from fastinf.ops import score_dense, score_dense_reference, score_factored, score_factored_reference

sf = importlib.import_module("fastinf.ops.score_factored")
sd = importlib.import_module("fastinf.ops.score_dense")

pytestmark = pytest.mark.skipif(not _native.available("cpu"),
                                reason="compiled module fastinf._C not built")

RTOL = 1e-4  # relative to the largest |score|


def _close(out, ref):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-6)
    err = float((out.double() - ref).abs().max()) if ref.numel() else 0.0
    assert err <= RTOL * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


def _masks(N, T, Q, S, kind):
    if kind is None:
        return None, None
    am = torch.rand(N, T) > 0.4
    vm = torch.rand(Q, S) > 0.4
    if kind == "holes" and N:
        am[0] = False              # an all-masked example
        if Q:
            vm[-1] = False         # an all-masked query
    return am, vm


def _poison(x, m):
    """NaN in the masked tokens: they must not leak into the scores."""
    if m is None:
        return x
    x = x.clone()
    x[~m] = float("nan")
    return x


# (N, T, Q, S, din, dout)
FACTORED_SHAPES = [
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
@pytest.mark.parametrize("shape", FACTORED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_score_factored_cpu(shape, mask):
    N, T, Q, S, din, dout = shape
    A, G = torch.randn(N, T, din), torch.randn(N, T, dout)
    V, U = torch.randn(Q, S, din), torch.randn(Q, S, dout)
    am, vm = _masks(N, T, Q, S, mask)
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double(), am, vm)
    A, G, V, U = _poison(A, am), _poison(G, am), _poison(V, vm), _poison(U, vm)
    out = score_factored(A, G, V, U, a_mask=am, v_mask=vm, backend="cpu", contraction="factored")
    _close(out, ref)
    _close(sf._fused_cpu(A, G, V, U, am, vm), ref)
    if mask == "holes" and N and Q:
        assert (out[0] == 0).all() and (out[:, -1] == 0).all()


def test_score_factored_cpu_noncontiguous():
    N, T, Q, S, din, dout = 6, 7, 5, 3, 19, 11
    A = torch.randn(N, din, T).transpose(1, 2)           # [N, T, din], strided
    G = torch.randn(T, N, dout).transpose(0, 1)          # [N, T, dout]
    V = torch.randn(Q, S, 2 * din)[:, :, ::2]            # [Q, S, din], step 2
    U = torch.randn(Q, 2 * S, dout)[:, 1::2]             # [Q, S, dout]
    am = (torch.rand(T, N) > 0.3).T                      # non-contiguous mask
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double(), am, None)
    _close(score_factored(A, G, V, U, a_mask=am, backend="cpu", contraction="factored"), ref)
    _close(sf._fused_cpu(A, G, V, U, am, None), ref)


def test_score_factored_cpu_deterministic():
    A, G = torch.randn(30, 9, 21), torch.randn(30, 9, 10)
    V, U = torch.randn(20, 7, 21), torch.randn(20, 7, 10)
    a = sf._fused_cpu(A, G, V, U, None, None)
    b = sf._fused_cpu(A, G, V, U, None, None)
    assert torch.equal(a, b)


def test_score_factored_cpu_half_inputs():
    A, G = torch.randn(4, 5, 12), torch.randn(4, 5, 6)
    V, U = torch.randn(3, 2, 12), torch.randn(3, 2, 6)
    A, G, V, U = (x.bfloat16() for x in (A, G, V, U))
    ref = score_factored_reference(A.double(), G.double(), V.double(), U.double())
    _close(score_factored(A, G, V, U, backend="cpu", contraction="factored"), ref)


# (N, T, Q, din, dout)
DENSE_SHAPES = [
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
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_score_dense_cpu(shape, mask):
    N, T, Q, din, dout = shape
    A, G = torch.randn(N, T, din), torch.randn(N, T, dout)
    M = torch.randn(Q, dout, din)
    am, _ = _masks(N, T, 1, 1, mask)
    ref = score_dense_reference(A.double(), G.double(), M.double(), am)
    A, G = _poison(A, am), _poison(G, am)
    out = score_dense(A, G, M, a_mask=am, backend="cpu", contraction="token")
    _close(out, ref)
    _close(sd._fused_cpu(A, G, M, am), ref)
    if mask == "holes" and N and Q:
        assert (out[0] == 0).all()


def test_score_dense_cpu_noncontiguous():
    N, T, Q, din, dout = 5, 4, 3, 14, 9
    A = torch.randn(N, din, T).transpose(1, 2)
    G = torch.randn(N, T, 2 * dout)[:, :, 1::2]
    M = torch.randn(Q, din, dout).transpose(1, 2)        # [Q, dout, din], strided
    ref = score_dense_reference(A.double(), G.double(), M.double())
    _close(score_dense(A, G, M, backend="cpu", contraction="token"), ref)
    _close(sd._fused_cpu(A, G, M, None), ref)
