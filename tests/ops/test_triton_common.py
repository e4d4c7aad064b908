"""fastinf.triton._common and what every Triton launcher shares: device guard, int64 offsets,
no specialisation of the JL key, runtime N/T in ekfac_lambda, tensor-core dots, sqrt_rn.

Two kinds of checks run on CPU:
* under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1): guards, offsets,
  the key equal to 1 through the public API;
* ahead of time for sm_90 (no GPU needed, only triton's bundled ptxas): this file run as a script
  in a subprocess without the interpreter binds the arguments exactly as the JIT does on a GPU,
  compiles the kernels and reports their specialisation and PTX (what the interpreter cannot
  show: a constexpr key, an approximate sqrt, fp32-only dots).
The ``gpu`` tests repeat the decisive ones on a GPU.
"""
import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastinf.triton import _common  # noqa: E402

LAUNCHERS = ["score_factored", "score_dense", "ekfac_lambda", "kron_project", "jl_project"]


def _launch(op, dtype=torch.float32, device="cpu"):
    """Calls ``<op>_triton`` on small inputs; returns its output."""
    import importlib

    mod = importlib.import_module(f"fastinf.triton.{op}")
    r = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    fn = getattr(mod, f"{op}_triton")
    if op == "score_factored":
        return fn(r(3, 2, 5), r(3, 2, 4), r(2, 3, 5), r(2, 3, 4))
    if op == "score_dense":
        return fn(r(3, 2, 5), r(3, 2, 4), r(2, 4, 5))
    if op == "ekfac_lambda":
        return fn(r(3, 2, 5), r(3, 2, 4))
    if op == "kron_project":
        return fn(r(3, 2, 5), r(3, 2, 4), r(5, 3), r(4, 2))
    return fn(r(3, 20), 7, 5, 0)


def _kernel_of(mod):
    return next(v for k, v in vars(mod).items() if k.endswith("_kernel") and hasattr(v, "run"))


# --------------------------------------------------------------------------- device guard
def test_device_guard_enters_the_tensors_device(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())

    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 1)

    with _common.device_guard(FakeCuda()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.device_guard(torch.zeros(1)):       # CPU tensors: no CUDA call at all
        pass
    assert len(entered) == 1


@pytest.mark.parametrize("op", LAUNCHERS)
def test_every_launcher_launches_inside_the_device_guard(op, monkeypatch):
    import importlib

    mod = importlib.import_module(f"fastinf.triton.{op}")
    state = {"inside": False, "guarded": [], "launches": 0}

    @contextlib.contextmanager
    def guard(x):
        state["guarded"].append(x.device)
        state["inside"] = True
        try:
            yield
        finally:
            state["inside"] = False

    kernel = _kernel_of(mod)
    run = kernel.run

    def checked_run(*a, **k):
        assert state["inside"], f"{op}: kernel launched outside the device guard"
        state["launches"] += 1
        return run(*a, **k)

    monkeypatch.setattr(mod, "device_guard", guard)
    monkeypatch.setattr(kernel, "run", checked_run)
    _launch(op)
    assert state["guarded"] == [torch.device("cpu")] and state["launches"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("op", LAUNCHERS)
def test_launchers_on_second_gpu(op):
    with torch.cuda.device(0):
        out = _launch(op, device="cuda:1")
    assert out.device == torch.device("cuda", 1) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- int64 offsets
@triton.jit
def _offset_probe(Out, stride, NAIVE: tl.constexpr):
    idx = tl.arange(0, 4) + tl.program_id(0)        # int32 indices 0..3
    if NAIVE:
        off = idx * stride
    else:
        off = _common.offsets64(idx, stride)
    tl.store(Out + tl.arange(0, 4), off.to(tl.int64))


def test_offsets64_does_not_wrap_past_2_31():
    stride = 2**30 + 3                                 # fits int32; 2*stride and 3*stride do not
    want = torch.arange(4, dtype=torch.int64) * stride
    out = torch.zeros(4, dtype=torch.int64)
    _offset_probe[(1,)](out, stride, NAIVE=False)
    assert torch.equal(out, want)
    if _common.INTERPRET:
        # the interpreter computes int32 products in int32, as a GPU does: the naive product
        # wraps, so this test would catch an int32 offset
        _offset_probe[(1,)](out, stride, NAIVE=True)
        assert not torch.equal(out, want) and out[3] == want[3] - 2**32


def test_grid_limit_is_a_clear_error():
    assert _common.grid_1d("op", 5) == (5,)
    with pytest.raises(ValueError, match="op: 2147483648 Triton programs exceed the grid limit"):
        _common.grid_1d("op", 2**31)


@pytest.mark.parametrize("op", ["jl_project", "kron_project", "ekfac_lambda"])
def test_large_outputs_use_one_dimensional_grids(op, monkeypatch):
    """Grid axes 1 and 2 hold 65535 programs: jl_project's k tiles passed them at k ≈ 2.1 M."""
    import importlib

    mod = importlib.import_module(f"fastinf.triton.{op}")
    kernel = _kernel_of(mod)
    grids = []
    monkeypatch.setattr(kernel, "run", lambda *a, grid, **k: grids.append(grid))
    meta = {"BN": 16, "BK": 32, "BO": 16, "BI": 16}
    if op == "jl_project":
        mod.jl_project_triton(torch.zeros(1, 1), 2_200_000, 3, 0)
        want = -(-2_200_000 // 32)
    elif op == "kron_project":
        mod.kron_project_triton(torch.zeros(2, 1, 1), torch.zeros(2, 1, 1), torch.zeros(1, 1_100_000),
                                torch.zeros(1, 17))
        want = 2 * 2 * -(-1_100_000 // 16)
    else:
        mod.ekfac_lambda_triton(torch.zeros(1, 1, 1_100_000), torch.zeros(1, 1, 17))
        want = 2 * -(-1_100_000 // 16)
    (grid,) = grids
    assert grid(meta) == (want,)


# --------------------------------------------------------------------------- jl_project key
def _inv_fmix32(h):
    """Inverse of murmur3's fmix32 (so a seed whose key is any value can be built)."""
    M = 0xFFFFFFFF

    def unxorshift(x, s):
        y = x
        for _ in range(32 // s + 1):
            y = x ^ (y >> s)
        return y & M

    h = unxorshift(h, 16)
    h = (h * pow(0xC2B2AE35, -1, 2**32)) & M
    h = unxorshift(h, 13)
    h = (h * pow(0x85EBCA6B, -1, 2**32)) & M
    return unxorshift(h, 16)


def _seed_with_key(key):
    # seed_key(s) = fmix32(fmix32(lo) ^ (hi + 0x6A09E667)) for s = hi·2³² + lo; take hi = 0
    return _inv_fmix32(_inv_fmix32(key) ^ 0x6A09E667)


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_jl_project_seed_with_key_one(kind):
    from fastinf.ops import jl_project
    from fastinf.ops.jl_project import seed_key

    seed = _seed_with_key(1)
    assert seed_key(seed) == 1
    X = torch.randn(3, 37)
    y = jl_project(X, 5, seed=seed, kind=kind, backend="triton")
    r = jl_project(X, 5, seed=seed, kind=kind, backend="torch")
    torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- ahead of time
def _aot_report():
    """Runs WITHOUT the interpreter: binds and compiles kernels for sm_90 as the JIT would."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    from fastinf.triton import ekfac_lambda, jl_project, kron_project

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)

    def bind(kernel, *args, **kw):
        fn = kernel.fn                                  # under the autotuner
        cfg = kernel.configs[0]
        kw = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **kw}
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kw)
        return fn, kw, bound, spec, opts

    def build(kernel, *args, **kw):
        fn, kw, bound, spec, opts = bind(kernel, *args, **kw)
        options, sig, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        k = compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options.__dict__)
        return sig, k.asm["ptx"]

    def mma(ptx, t):
        return bool(re.search(rf"\b(wgmma|mma)\.[\w.]*\.{t}\b", ptx))

    rep = {}
    b = lambda *s: torch.empty(*s, dtype=torch.bfloat16)  # noqa: E731
    f = lambda *s: torch.empty(*s, dtype=torch.float32)  # noqa: E731
    out = f(4, 4)
    jl = dict(KIND=1, PRECISION="ieee", UPCAST=False)
    sig, ptx = build(jl_project._jl_kernel, b(3, 37), out, 3, 37, 5, 1, 0.5, 8, 64, **jl)
    rep["jl_key_type"] = sig["key"]
    rep["jl_sqrt"] = sorted(set(re.findall(r"\bsqrt\.[\w.]+", ptx)))
    rep["jl_approx_transcendental"] = bool(re.search(r"\b(lg2|ex2|sin|cos)\.approx", ptx))
    jl0 = dict(jl, KIND=0)
    rep["jl_bf16_mma"] = mma(build(jl_project._jl_kernel, b(3, 37), out, 3, 37, 5, 7, 0.5, 8, 64,
                                   **jl0)[1], "bf16")
    kr = dict(HAS_MASK=False, PRECISION="ieee", PRECISION32="ieee", UPCAST=False)
    rep["kron_bf16_mma"] = mma(build(kron_project._kron_kernel, b(2, 3, 40), b(2, 3, 24), b(40, 8),
                                     b(24, 8), b(2, 3, 40), out, 3, 40, 24, 8, 8, **kr)[1], "bf16")
    ek = dict(HAS_MASK=False, PRECISION="ieee", UPCAST=False)
    rep["ekfac_bf16_mma"] = mma(build(ekfac_lambda._ekfac_lambda_kernel, b(2, 3, 40), b(2, 3, 24),
                                      b(2, 3, 40), out, 3, 5, 40, 24, 8, **ek)[1], "bf16")
    rep["ekfac_tf32_mma"] = mma(build(ekfac_lambda._ekfac_lambda_kernel, f(2, 3, 40), f(2, 3, 24),
                                      f(2, 3, 40), out, 3, 5, 40, 24, 8,
                                      **dict(ek, PRECISION="tf32"))[1], "tf32")
    # one compiled variant for two batch shapes (N, T): the specialisation keys are equal
    specs = [bind(ekfac_lambda._ekfac_lambda_kernel, f(2, 3, 40), f(2, 3, 24), f(2, 3, 40), out,
                  n, t, 40, 24, 8, **ek)[3] for n, t in ((3, 5), (70, 7))]
    rep["ekfac_same_variant_for_N_T"] = str(specs[0]) == str(specs[1])
    return rep


@pytest.fixture(scope="module")
def aot():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import make_backend
        make_backend(GPUTarget("cuda", 90, 32))
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton cannot compile for sm_90 here ({type(exc).__name__}: {exc})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    res = subprocess.run([sys.executable, __file__, "--aot"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_aot_jl_key_is_not_specialised(aot):
    # Triton turns an int argument equal to 1 into a constexpr (then `key.to` fails to compile)
    assert aot["jl_key_type"] in ("i32", "u32")


def test_aot_jl_normal_uses_correctly_rounded_sqrt(aot):
    # tl.sqrt is sqrt.approx.ftz.f32 on NVIDIA; CUDA's sqrtf (no fast math) is sqrt.rn.f32
    assert aot["jl_sqrt"] == ["sqrt.rn.f32"]
    assert not aot["jl_approx_transcendental"]          # logf/cosf from libdevice, as in CUDA


def test_aot_half_inputs_use_tensor_cores(aot):
    assert aot["jl_bf16_mma"] and aot["kron_bf16_mma"] and aot["ekfac_bf16_mma"]


def test_aot_tf32_when_allowed(aot):
    assert aot["ekfac_tf32_mma"]


def test_aot_ekfac_lambda_one_variant_for_all_batch_shapes(aot):
    assert aot["ekfac_same_variant_for_N_T"]


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_jl_normal_phi_bit_identical_triton_cuda():
    from fastinf.ops import jl_project

    X = torch.eye(300, device="cuda")
    a = jl_project(X, 130, seed=_seed_with_key(1), kind="normal", backend="triton")
    b = jl_project(X, 130, seed=_seed_with_key(1), kind="normal", backend="cuda")
    assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} entries differ"


@pytest.mark.gpu
def test_ekfac_lambda_compiles_once_for_many_batch_shapes():
    from fastinf.triton.ekfac_lambda import _ekfac_lambda_kernel, ekfac_lambda_triton

    def variants():
        return sum(len(c[0]) for c in _ekfac_lambda_kernel.fn.device_caches.values())

    ekfac_lambda_triton(torch.randn(3, 5, 40, device="cuda"), torch.randn(3, 5, 24, device="cuda"))
    before = variants()
    for n, t in ((6, 7), (70, 3), (9, 6)):
        ekfac_lambda_triton(torch.randn(n, t, 40, device="cuda"),
                            torch.randn(n, t, 24, device="cuda"))
    assert variants() == before


if __name__ == "__main__" and sys.argv[1:] == ["--aot"]:
    print(json.dumps(_aot_report()))
