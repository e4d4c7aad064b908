"""End to end on a CUDA device: EK-FAC, TracIn and the store give the CPU results (gpu-marked).

TF32 is off in these tests (cuDNN convolutions and matmuls; restored afterwards): with it the
CPU/GPU comparison sits at the edge of its 1e-3 tolerance. The library itself leaves the flags
to the user.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinf

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
    torch.set_float32_matmul_precision(flags[2])


def test_cuda_and_triton_backends_available():
    """On a GPU machine the compiled CUDA kernels and Triton must be there: fail, never skip."""
    b = fastinf.backends()
    assert b["cuda"].available, f"fastinf's CUDA kernels are missing: {b['cuda']} ({fastinf.__file__})"
    assert b["triton"].available, f"triton is not usable: {b['triton']}"


def _setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 5))
    X, y = torch.randn(96, 3, 8, 8), torch.randint(0, 5, (96,))
    return model, X, y


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _rel(a, b):
    return float((a.cpu() - b.cpu()).abs().max() / b.abs().max())


@pytest.mark.parametrize("backend_env", ["default", "cuda-only"])
def test_ekfac_and_tracin_on_cuda_match_cpu(backend_env, monkeypatch, tmp_path):
    if backend_env == "cuda-only":
        # force the CUDA C++ kernels where the ops would otherwise pick Triton
        from fastinf.ops import _common
        monkeypatch.setattr(_common, "default_preference",
                            lambda device: ("cuda", "torch") if device.type == "cuda" else ("cpu", "torch"))
    model, X, y = _setup()
    q = (X[:7], y[:7])
    ek_cpu = fastinf.EKFAC(model, loss_fn, progress=False).fit((X, y), batch_size=32)
    S_cpu, s_cpu = ek_cpu.pairwise_scores(q, (X, y)), ek_cpu.self_scores((X, y))
    # every CPU reference before model.cuda(), which moves the CPU fit's model too (in place)
    S4_cpu = ek_cpu.pairwise_scores(q, (X, y), query_rank=4)
    tr_cpu = fastinf.TracIn(model, loss_fn, progress=False).pairwise_scores(q, (X, y))

    gm = model.cuda()
    gq, gtrain = (X[:7].cuda(), y[:7].cuda()), (X.cuda(), y.cuda())
    ek = fastinf.EKFAC(gm, loss_fn, progress=False).fit(gtrain, batch_size=32)
    assert _rel(ek.pairwise_scores(gq, gtrain), S_cpu) < 1e-3
    assert _rel(ek.self_scores(gtrain), s_cpu) < 1e-3
    assert _rel(ek.pairwise_scores(gq, gtrain, query_rank=4), S4_cpu) < 1e-2
    assert _rel(fastinf.TracIn(gm, loss_fn, progress=False).pairwise_scores(gq, gtrain), tr_cpu) < 1e-3
    store = fastinf.GradientStore.build(tmp_path / "s", ek, gtrain, batch_size=32, progress=False)
    assert _rel(ek.pairwise_scores(gq, store), S_cpu) < 1e-3


def test_bf16_model_runs_on_cuda():
    model, X, y = _setup()
    gm = model.cuda().to(torch.bfloat16)
    gtrain = (X.cuda().to(torch.bfloat16), y.cuda())
    ek = fastinf.EKFAC(gm, loss_fn, progress=False).fit(gtrain, batch_size=32)
    S = ek.pairwise_scores((gtrain[0][:4], gtrain[1][:4]), gtrain)
    assert S.shape == (4, 96) and S.dtype == torch.float32 and torch.isfinite(S).all()
