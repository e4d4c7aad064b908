"""ekfac_lambda: every backend against the float64 reference."""
import pytest
import torch

from fastinf import backends
from fastinf.ops import ekfac_lambda, ekfac_lambda_reference

SHAPES = [  # N, T, din, dout
    (3, 1, 5, 4),
    (4, 7, 13, 9),
    (0, 3, 6, 5),
    (5, 33, 17, 70),
    (2, 2, 130, 3),
]
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CPU_BACKENDS = ["torch", "cpp", "triton"]


def _orth(d, dtype=torch.float64):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q.to(dtype)


def _inputs(N, T, din, dout, mask=False, device="cpu"):
    A = torch.randn(N, T, din, dtype=torch.float64, device=device)
    G = torch.randn(N, T, dout, dtype=torch.float64, device=device)
    m = None
    if mask:
        m = torch.rand(N, T, device=device) > 0.4
        if N:
            m[0] = False  # an all-masked example
            A[0] = float("nan")  # masked garbage must not leak
    return A, G, _orth(din).to(device), _orth(dout).to(device), m


def _brute(A, G, QA, QS, m):
    out = torch.zeros(G.shape[2], A.shape[2], dtype=torch.float64)
    for n in range(A.shape[0]):
        a, g = A[n], G[n]
        if m is not None:
            a, g = a[m[n]], g[m[n]]
        D = g.T @ a
        out += (QS.T @ D @ QA) ** 2
    return out


def _check(out, ref, dtype):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-30)
    err = ((out.double() - ref).abs().max() / scale).item()
    assert err <= TOL[dtype], err


def _usable(b, device="cpu"):
    st = backends()[b]
    return st.available


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", [False, True])
def test_reference_matches_brute_force(shape, mask):
    A, G, QA, QS, m = _inputs(*shape, mask=mask)
    ref = ekfac_lambda_reference(A, G, QA, QS, m)
    assert torch.allclose(ref, _brute(A, G, QA, QS, m), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_cpu(backend, shape, mask, dtype):
    if not _usable(backend):
        pytest.skip(f"{backend} not usable here")
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("interpreter: float32 suffices")
    A, G, QA, QS, m = _inputs(*shape, mask=mask)
    A, G = A.to(dtype), G.to(dtype)
    ref = ekfac_lambda_reference(A.double(), G.double(), QA, QS, m)
    out = ekfac_lambda(A, G, QA.float(), QS.float(), a_mask=m, backend=backend, contraction="rotate")
    _check(out, ref, dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_materialize_order(shape):
    A, G, QA, QS, m = _inputs(*shape, mask=True)
    ref = ekfac_lambda_reference(A, G, QA, QS, m)
    out = ekfac_lambda(A.float(), G.float(), QA, QS, a_mask=m, contraction="materialize")
    _check(out, ref, torch.float32)


def test_non_contiguous_and_float64():
    A = torch.randn(6, 9, 4, dtype=torch.float64).transpose(1, 2)  # [6,4,9] non-contiguous
    G = torch.randn(6, 5, 4, dtype=torch.float64).transpose(1, 2)  # [6,4,5]
    QA, QS = _orth(9), _orth(5)
    ref = _brute(A, G, QA, QS, None)
    assert torch.allclose(ekfac_lambda(A, G, QA, QS), ref, rtol=1e-10)
    for b in ("torch", "cpp"):
        _check(ekfac_lambda(A.float(), G.float(), QA.float(), QS.float(), backend=b), ref,
               torch.float32)


def test_validation_names_arguments():
    A, G, QA, QS, _ = _inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match="'QA'"):
        ekfac_lambda(A, G, QS, QS)
    with pytest.raises(ValueError, match="'G'"):
        ekfac_lambda(A, G[:1], QA, QS)
    with pytest.raises(TypeError, match="'a_mask'"):
        ekfac_lambda(A, G, QA, QS, a_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="float64"):
        ekfac_lambda(A, G, QA, QS, backend="cpu")
    with pytest.raises(ValueError, match="'A'.*index 1"):
        A2 = A.float().clone()
        A2[1, 0, 0] = float("inf")
        ekfac_lambda(A2, G.float(), QA, QS)


def test_custom_op_registered():
    A, G, QA, QS, _ = _inputs(2, 3, 4, 5)
    out = torch.ops.fastinf.ekfac_lambda(A.float(), G.float(), QA.float(), QS.float(), None,
                                         "torch", "auto")
    assert out.shape == (5, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backends_cuda(backend, shape, dtype):
    if backend == "cuda" and not backends()["cuda"].available:
        pytest.skip("cuda backend not built")
    A, G, QA, QS, m = _inputs(*shape, mask=True, device="cuda")
    ref = ekfac_lambda_reference(A, G, QA, QS, m).cpu()
    out = ekfac_lambda(A.to(dtype), G.to(dtype), QA.float(), QS.float(), a_mask=m,
                       backend=backend, contraction="rotate")
    _check(out.cpu(), ref, dtype if dtype != torch.float16 else torch.float16)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_rotate_rows_zeroes_masked_rows(device):
    """``ops._common.rotate_rows``: x @ Q with masked rows exactly 0 though they hold NaN (the
    CPU multiplies only the kept rows; other devices zero, then multiply all), no mask, all
    kept, all masked."""
    from fastinf.ops import _common as c
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    Q = torch.randn(4, 6, dtype=torch.float64)
    m = torch.rand(3, 5) > 0.4
    m[1] = False
    x[~m] = float("nan")
    if device == "meta":          # the device branch's shapes (no host sync, no gather)
        y = c.rotate_rows(x.to("meta"), Q.to("meta"), m.to("meta"))
        assert y.shape == (3, 5, 6) and y.device.type == "meta"
        return
    want = torch.where(m[..., None], torch.nan_to_num(x) @ Q, 0.0)
    y = c.rotate_rows(x, Q, m)
    assert y.dtype == torch.float64 and torch.equal(y == 0, ~m[..., None].expand_as(y) | (want == 0))
    assert torch.allclose(y, want, rtol=1e-12, atol=0)
    full = torch.ones(3, 5, dtype=torch.bool)
    x2 = torch.nan_to_num(x)
    assert torch.equal(c.rotate_rows(x2, Q, full), x2 @ Q)
    assert torch.equal(c.rotate_rows(x2, Q, None), x2 @ Q)
    assert torch.equal(c.rotate_rows(x, Q, torch.zeros(3, 5, dtype=torch.bool)),
                       torch.zeros(3, 5, 6, dtype=torch.float64))


# --------------------------------------------------------------------------- the C++ kernel
# Its tiles are TM x TN = 6 x 32 (AVX-512), 6 x 16 (AVX2) or 4 x 8 (baseline), the tile columns
# along din, or along dout where that pads less; examples are summed in chunks of whole
# examples. Shapes: exact multiples of the tiles, one over, one under, transposed or not.
CPP_SHAPES = [  # N, T, din, dout
    (7, 5, 64, 48), (7, 5, 65, 48), (7, 5, 48, 65), (6, 4, 33, 7), (5, 3, 257, 31),
    (4, 6, 31, 257), (3, 9, 1, 1), (9, 2, 17, 96), (2, 1, 96, 17),
]


def _isas():
    C = pytest.importorskip("fastinf._C", reason="the compiled module is not built")
    return {isa: C.ekfac_lambda_cpu_isa(isa) for isa in (1, 2, 3)}


@pytest.mark.parametrize("isa", [1, 2, 3], ids=["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("shape", CPP_SHAPES)
@pytest.mark.parametrize("chunk_rows", [0, 1, 7])
def test_cpp_kernel_isas_tiles_and_chunks(monkeypatch, isa, shape, chunk_rows):
    if not _usable("cpp"):
        pytest.skip("the C++ kernels are not built")
    got = _isas()[isa]
    if got != isa:
        pytest.skip(f"this CPU cannot run instruction set {isa} (the kernel would run {got})")
    import importlib
    mod = importlib.import_module("fastinf.ops.ekfac_lambda")
    monkeypatch.setattr(mod, "CPP_ISA", isa)
    monkeypatch.setattr(mod, "CPP_CHUNK_ROWS", chunk_rows)  # 1: every example its own chunk
    A, G, QA, QS, m = _inputs(*shape, mask=True)
    m[-1, 1:] = False                   # a short example next to full ones
    ref = _brute(A, G, QA, QS, m)
    out = ekfac_lambda(A.float(), G.float(), QA.float(), QS.float(), a_mask=m, backend="cpp")
    _check(out, ref, torch.float32)
    A = torch.nan_to_num(A)             # no mask: the masked example's NaN would be read
    out = ekfac_lambda(A.float(), G.float(), QA.float(), QS.float(), backend="cpp")
    _check(out, _brute(A, G, QA, QS, None), torch.float32)


def test_cpp_kernel_all_masked_and_empty():
    if not _usable("cpp"):
        pytest.skip("the C++ kernels are not built")
    A, G, QA, QS, _ = _inputs(4, 3, 40, 20)
    m = torch.zeros(4, 3, dtype=torch.bool)
    A[:] = float("nan")                 # never read: every token masked
    out = ekfac_lambda(A.float(), G.float(), QA.float(), QS.float(), a_mask=m, backend="cpp")
    assert out.shape == (20, 40) and bool((out == 0).all())
    out = ekfac_lambda(A[:0].float(), G[:0].float(), QA.float(), QS.float(), backend="cpp")
    assert out.shape == (20, 40) and bool((out == 0).all())


def test_kept_rows_offsets():
    import importlib
    mod = importlib.import_module("fastinf.ops.ekfac_lambda")
    A, G, QA, QS, m = _inputs(5, 4, 6, 3, mask=True)
    A2, G2, offs = mod.kept_rows(A, G, m)
    assert offs.tolist() == [0] + m.sum(1).cumsum(0).tolist()
    assert torch.equal(A2, A[m]) and torch.equal(G2, G[m])
    A2, G2, offs = mod.kept_rows(A, G, None)
    assert offs.tolist() == list(range(0, 21, 4)) and A2.shape == (20, 6)
    assert A2.data_ptr() == A.data_ptr()            # unmasked: a view, no copy
    A2, _, offs = mod.kept_rows(A, G, torch.ones(5, 4, dtype=torch.bool))
    assert offs.tolist() == list(range(0, 21, 4)) and A2.data_ptr() == A.data_ptr()


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("shape", SHAPES)
def test_offsets_form_equals_masked_form(backend, shape):
    """``offsets=``: the kept tokens as rows (what the EK-FAC fit keeps) give the masked form's Λ."""
    if backend != "reference" and not _usable(backend):
        pytest.skip(f"{backend} not usable here")
    import importlib
    mod = importlib.import_module("fastinf.ops.ekfac_lambda")
    A, G, QA, QS, m = _inputs(*shape, mask=True)
    A2, G2, offs = mod.kept_rows(A, G, m)
    assert A2.shape[0] == int(m.sum()) and bool(torch.isfinite(A2).all())  # masked NaN dropped
    dt = torch.float64 if backend == "reference" else torch.float32
    out = ekfac_lambda(A2.to(dt), G2.to(dt), QA.to(dt), QS.to(dt), offsets=offs, backend=backend)
    _check(out.float(), _brute(A, G, QA, QS, m), torch.float32)
    A3, G3, m3 = mod.padded(A2, G2, offs)      # and back
    assert torch.equal(m3.sum(1), m.sum(1)) and torch.equal(A3[m3], A2)


def test_offsets_form_validation():
    A, G, QA, QS, m = _inputs(3, 4, 5, 6, mask=True)
    import importlib
    mod = importlib.import_module("fastinf.ops.ekfac_lambda")
    A2, G2, offs = mod.kept_rows(A.float(), G.float(), m)
    QA, QS = QA.float(), QS.float()
    with pytest.raises(ValueError, match="either 'a_mask'.*or 'offsets'"):
        ekfac_lambda(A2, G2, QA, QS, offsets=offs, a_mask=m)
    with pytest.raises(TypeError, match="'offsets'.*int64"):
        ekfac_lambda(A2, G2, QA, QS, offsets=offs.float())
    with pytest.raises(ValueError, match="'offsets' must rise from 0 to the row count"):
        ekfac_lambda(A2, G2, QA, QS, offsets=offs + 1)
    with pytest.raises(ValueError, match="'A' must have 2 dimensions"):
        ekfac_lambda(A.float(), G.float(), QA, QS, offsets=offs)
    with pytest.raises(ValueError, match="'G'"):
        ekfac_lambda(A2, G2[1:], QA, QS, offsets=offs)
    with pytest.raises(ValueError, match="'QS'"):
        ekfac_lambda(A2, G2, QA, QA, offsets=offs)
    A2[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'A'.*non-finite"):
        ekfac_lambda(A2, G2, QA, QS, offsets=offs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_offsets_form_cuda(backend):
    """The rows form on a GPU (what the EK-FAC fit passes there): padded back, then the kernel."""
    if backend == "cuda" and not backends()["cuda"].available:
        pytest.skip("cuda backend not built")
    import importlib
    mod = importlib.import_module("fastinf.ops.ekfac_lambda")
    A, G, QA, QS, m = _inputs(5, 33, 17, 70, mask=True, device="cuda")
    A2, G2, offs = mod.kept_rows(A, G, m)
    out = ekfac_lambda(A2.float(), G2.float(), QA.float(), QS.float(), offsets=offs,
                       backend=backend)
    _check(out.cpu(), ekfac_lambda_reference(A, G, QA, QS, m).cpu(), torch.float32)
