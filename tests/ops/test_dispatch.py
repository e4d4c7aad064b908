"""The dispatch table: every backend forced through the public API, the CPU rules, the planner
interface (``fastinf.ops.flops`` / ``plan``) and the finite check's device policy."""
import sys

import pytest
import torch

import fastinf

from fastinf.ops import (BACKENDS, ekfac_lambda, flops, jl_project, kron_project, plan,
                         score_dense, score_factored)
from fastinf.ops import _common, _dispatch

from _cases import skip_unusable

r = torch.randn
# op -> (call with backend, fused contraction forced) on small CPU inputs
CALLS = {
    "score_factored": lambda b, t=3: score_factored(r(2, t, 5), r(2, t, 4), r(3, t, 5), r(3, t, 4),
                                                    backend=b, contraction="factored"),
    "score_dense": lambda b, t=3: score_dense(r(2, t, 5), r(2, t, 4), r(3, 4, 5), backend=b,
                                              contraction="token"),
    "kron_project": lambda b, t=3: kron_project(r(2, t, 5), r(2, t, 4), r(5, 3), r(4, 2),
                                                backend=b, contraction="project"),
    "ekfac_lambda": lambda b, t=3: ekfac_lambda(r(2, t, 5), r(2, t, 4), torch.eye(5), torch.eye(4),
                                                backend=b, contraction="rotate"),
    "jl_project": lambda b, t=3: jl_project(r(2, 7), 3, backend=b),
}


def _spy(monkeypatch, op):
    """Records which implementation of ``op`` runs (the names of the dispatch table)."""
    impl = sys.modules[f"fastinf.ops.{op}"]._IMPL
    ran = []
    for name, fn in list(impl.items()):
        monkeypatch.setitem(impl, name, lambda *a, _n=name, _f=fn: ran.append(_n) or _f(*a))
    return ran


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("cpu", "cuda")])
@pytest.mark.parametrize("op", sorted(CALLS))
def test_each_backend_can_be_forced(op, backend, monkeypatch):
    skip_unusable(backend, "cpu")
    ran = _spy(monkeypatch, op)
    CALLS[op](backend)
    assert ran == [backend]


@pytest.mark.parametrize("op", sorted(CALLS))
def test_cpu_backend_follows_the_cpu_rule(op, monkeypatch):
    skip_unusable("cpu", "cpu")
    for want in (True, False):
        monkeypatch.setitem(_dispatch.CPU_RULES, op, lambda dtype, _w=want, **dims: _w)
        ran = _spy(monkeypatch, op)
        CALLS[op]("cpu")
        assert ran == ["cpp" if want else "torch"]


def test_cpu_rules_as_measured():
    f32 = torch.float32
    assert _dispatch.cpu_uses_cpp("ekfac_lambda", f32, N=8, T=48, din=8, dout=8)
    assert not _dispatch.cpu_uses_cpp("ekfac_lambda", f32, N=8, T=49, din=8, dout=8)
    kp = dict(N=4, T=2, din=8, dout=8, k_in=32, k_out=32)
    assert _dispatch.cpu_uses_cpp("kron_project", f32, **kp)
    assert not _dispatch.cpu_uses_cpp("kron_project", torch.bfloat16, **kp)
    assert not _dispatch.cpu_uses_cpp("kron_project", f32, **{**kp, "k_in": 64, "k_out": 64})
    assert _dispatch.cpu_uses_cpp("score_dense", f32, N=1, T=1, Q=1, din=511, dout=8)
    assert not _dispatch.cpu_uses_cpp("score_dense", f32, N=1, T=1, Q=1, din=512, dout=8)
    sf = dict(N=1, Q=1, din=512, dout=512)
    assert _dispatch.cpu_uses_cpp("score_factored", f32, T=64, S=64, **sf)       # T·S >= 4096
    assert not _dispatch.cpu_uses_cpp("score_factored", f32, T=1, S=1, **sf)     # wide layer


def test_default_backend_on_cpu_tensors():
    """backend=None: the CPU rule on CPU tensors, so ekfac_lambda's C++ kernel only for T <= 48."""
    skip_unusable("cpu", "cpu")
    assert _common.resolve_backend("x", None, torch.device("cpu"), torch.float32) == "cpu"
    assert _common.resolve_backend("x", None, torch.device("cpu"), torch.float64) == "reference"
    assert _dispatch.implementation("ekfac_lambda", "cpu", "auto", "cpu", torch.float32,
                                    N=4, T=64, din=128, dout=128) == "torch"
    assert _dispatch.implementation("ekfac_lambda", "cpu", "auto", "cpu", torch.float32,
                                    N=4, T=48, din=128, dout=128) == "cpp"


def test_planner_interface():
    """What the layers above call: FLOPs per contraction, the order chosen per device type."""
    f = flops("score_factored", N=100, T=1, Q=100, S=1, din=512, dout=512)
    assert set(f) == {"factored", "materialize"} and f["factored"] < f["materialize"]
    assert plan("score_factored", "cpu", N=100, T=1, Q=100, S=1, din=512, dout=512) == "factored"
    assert plan("ekfac_lambda", "cuda", N=4, T=4096, din=8, dout=8) == "materialize"
    assert plan("jl_project", "cpu", N=3, p=100, k=8) == "project"
    with pytest.raises(TypeError):
        flops("score_dense", N=1, T=1)  # missing dimensions are an error, not a guess


def test_cuda_plan_picks_what_measured_fastest_on_the_h200():
    """score_dense's order on CUDA at the shapes of the first H200 run (bench/results/ops.csv,
    2026-11-27, bf16): token at T=1 (Triton 36 ms, materialize 300 ms), materialize where it
    needs far fewer FLOPs (58-234x faster than the torch token order)."""
    p = lambda N, T, Q, din, dout: plan("score_dense", "cuda", N=N, T=T, Q=Q, din=din, dout=dout)
    assert p(8192, 1, 256, 2048, 2048) == "token"
    for shape in [(1024, 128, 64, 1024, 1024), (512, 256, 16, 128, 64), (256, 512, 64, 768, 768)]:
        assert p(*shape) == "materialize", shape


def test_finite_check_policy():
    """None checks CPU results only: on a GPU the check would synchronise every op call."""
    bad = torch.tensor([1.0, float("nan")])
    assert _common.has_nonfinite(bad, None) and _common.has_nonfinite(bad, True)
    assert not _common.has_nonfinite(bad, False)
    off_cpu = torch.empty(2, device="meta")  # stands for a CUDA tensor: nothing is read
    assert not _common.has_nonfinite(off_cpu, None)
    with pytest.raises(ValueError, match="'A' has non-finite"):
        score_dense(torch.full((2, 1, 3), float("inf")), r(2, 1, 2), r(1, 2, 3))


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
