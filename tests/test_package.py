"""Package-level behaviour: import, backends report, the compiled module's torch-free ABI."""
import torch

import fastinf


def test_backends_report_says_why():
    rep = fastinf.backends()
    assert set(rep) == {"reference", "torch", "cpu", "cpp", "triton", "cuda"}
    assert rep["reference"].available and rep["torch"].available
    assert rep["cpu"].available, rep["cpu"].detail  # the C++ kernels are always built
    for st in rep.values():
        assert st.detail, st
    if not torch.cuda.is_available():
        assert not rep["cuda"].available
        assert "no GPU visible" in rep["cuda"].detail or "not built" in rep["cuda"].detail
    assert "cpu" in str(rep)


def test_compiled_module_has_no_torch_dependency():
    import fastinf._C as C

    # The module is loaded; it must not have been linked against libtorch.
    with open(C.__file__, "rb") as fh:
        blob = fh.read()
    assert b"libtorch" not in blob and b"libc10" not in blob
    assert C.num_threads() >= 1


def test_version():
    assert isinstance(fastinf.__version__, str)


def test_without_triton_installed(monkeypatch):
    """Without the gpu extra, the report says so and the ops still run (cpu/torch backends)."""
    import sys

    from fastinf import _native
    from fastinf.ops import _common, score_factored, score_factored_reference

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    _native._triton_status.cache_clear()
    _common._usable_cached.cache_clear()
    try:
        st = fastinf.backends()["triton"]
        assert not st.available and "triton not installed" in st.detail and "fastinf[gpu]" in st.detail
        A, G, V, U = torch.randn(3, 2, 5), torch.randn(3, 2, 4), torch.randn(2, 2, 5), torch.randn(2, 2, 4)
        want = score_factored_reference(*(t.double() for t in (A, G, V, U)))
        torch.testing.assert_close(score_factored(A, G, V, U).double(), want, rtol=1e-5, atol=1e-5)
    finally:
        _native._triton_status.cache_clear()
        _common._usable_cached.cache_clear()


def test_bench_command_outside_a_checkout(tmp_path, monkeypatch, capsys):
    import fastinf.__main__ as cli
    from fastinf.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site" / "fastinf" / "__main__.py"))
    assert main(["bench", "ops"]) == 1
    assert "run `fastinf bench` from the root of a clone" in capsys.readouterr().err
