"""jl_project: every backend against the float64 reference, one Φ across backends, JL statistics."""
import math

import pytest
import torch

from fastinf._native import available
from fastinf.ops import jl_project, jl_project_reference
from fastinf.ops.jl_project import block_cols, phi_block, seed_key

BACKENDS = ["torch"] + [b for b in ("cpp", "triton") if available(b)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(0, 7, 5), (1, 1, 1), (3, 37, 5), (5, 100, 33), (2, 515, 64)]


def _ref(X, k, seed, kind):
    return jl_project_reference(X.double(), k, seed, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["rademacher", "normal"])
@pytest.mark.parametrize("N,p,k", SHAPES)
def test_backends_match_reference(backend, kind, N, p, k):
    X = torch.randn(N, p)
    y = jl_project(X, k, seed=11, kind=kind, backend=backend)
    r = _ref(X, k, 11, kind)
    assert y.shape == (N, k) and y.dtype == torch.float32
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    torch.testing.assert_close(y.double(), r, atol=1e-5 * scale * math.sqrt(p), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    X = torch.randn(4, 70).to(dtype)
    y = jl_project(X, 9, seed=3, backend=backend)
    r = _ref(X.float(), 9, 3, "rademacher")
    torch.testing.assert_close(y.double(), r, atol=TOL[dtype] * 10, rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    X = torch.randn(40, 6).T  # [6, 40], non-contiguous
    y = jl_project(X, 8, seed=1, backend=backend)
    torch.testing.assert_close(y.double(), _ref(X, 8, 1, "rademacher"), atol=1e-4, rtol=1e-5)


def test_same_phi_across_backends_and_seeds_differ():
    X = torch.eye(50)  # rows of Y are columns of Φ: Y = Φᵀ
    outs = {b: jl_project(X, 16, seed=5, backend=b) for b in BACKENDS}
    for b, y in outs.items():
        torch.testing.assert_close(y, outs["torch"], atol=1e-6, rtol=0)
    other = jl_project(X, 16, seed=6, backend="torch")
    assert (other - outs["torch"]).abs().max() > 0.1
    # large seeds are fine and distinct
    assert seed_key(2**40) != seed_key(0)


def test_rademacher_entries_exact():
    k = 25
    y = jl_project(torch.eye(64), k, seed=9, backend="torch")
    assert torch.equal(y.abs(), torch.full_like(y, 1 / math.sqrt(k)))
    if "cpp" in BACKENDS:
        yc = jl_project(torch.eye(64), k, seed=9, backend="cpp")
        assert torch.equal(yc.abs(), torch.full_like(yc, 1 / math.sqrt(k)))
    # balanced signs
    assert abs((y > 0).float().mean().item() - 0.5) < 0.1


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_norm_preserved_in_expectation(kind):
    X = torch.randn(64, 300)
    k = 256
    y = jl_project(X, k, seed=0, kind=kind)
    ratio = (y.norm(dim=1) ** 2 / X.norm(dim=1) ** 2)
    assert abs(ratio.mean().item() - 1.0) < 0.05           # mean over 64 rows
    assert ratio.std().item() < 3 * math.sqrt(2 / k)        # concentration ~ sqrt(2/k)
    if kind == "normal":
        ph = phi_block(seed_key(0), 0, 64, 0, 512, "normal")
        assert abs(ph.mean().item()) < 0.02 and abs(ph.std().item() - 1) < 0.02


def test_bounded_tiles():
    # 10M-parameter gradients to k=4096: the torch paths' Φ block stays within the workspace
    k, p = 4096, 10_000_000
    bc = block_cols(k)
    from fastinf.ops._common import workspace_bytes
    assert bc * k * 4 <= workspace_bytes() and bc < p
    if "cpp" in BACKENDS:
        from fastinf._native import native
        assert native().jl_project_tile_floats() * 4 < 2**20   # per-thread workspace < 1 MiB


def test_bounded_memory_small_workspace(monkeypatch):
    monkeypatch.setenv("FASTINF_WORKSPACE_MB", "0.05")  # forces many Φ column blocks
    X = torch.randn(3, 2000)
    assert block_cols(64) < 2000
    y = jl_project(X, 64, seed=2, backend="torch")
    torch.testing.assert_close(y.double(), _ref(X, 64, 2, "rademacher"), atol=1e-4, rtol=1e-5)


def test_validation():
    with pytest.raises(ValueError, match="'X' must have 2 dimensions"):
        jl_project(torch.randn(3), 4)
    with pytest.raises(ValueError, match="k must be a positive int"):
        jl_project(torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match="unknown kind"):
        jl_project(torch.randn(3, 4), 2, kind="sparse")
    with pytest.raises(TypeError, match="dtype"):
        jl_project(torch.ones(3, 4, dtype=torch.int32), 2)
    X = torch.randn(3, 4)
    X[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*index 1"):
        jl_project(X, 2)


def test_custom_op_traces():
    y = torch.ops.fastinf.jl_project(torch.randn(2, 5), 3, seed_key(0), "rademacher", "torch")
    assert y.shape == (2, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_gpu(backend, dtype, kind):
    X = torch.randn(37, 1001)
    r = _ref(X.to(dtype).float(), 130, 4, kind)
    y = jl_project(X.to(dtype).cuda(), 130, seed=4, kind=kind, backend=backend)
    torch.testing.assert_close(y.double().cpu(), r, atol=1e-3 * math.sqrt(1001), rtol=1e-4)
