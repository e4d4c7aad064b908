"""Package-level behaviour: import, backends report, the compiled module's torch-free ABI."""
import torch

import fastinf


def test_backends_report_says_why():
    rep = fastinf.backends()
    assert set(rep) == {"reference", "torch", "cpu", "triton", "cuda"}
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
