"""fastinf.integrations: Kronfluence tasks and factors, the TRAK projector, the documented examples."""
import copy
import enum
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinf
from fastinf.integrations import kronfluence as kf
from fastinf.integrations.trak import Projector, vectorize
from fastinf.ops import jl_project

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- stand-in tasks
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).eval()


def _data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _native_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class ClsTask:
    """A Kronfluence-style Task (duck-typed): summed losses, optional label sampling."""

    def __init__(self, modules=None):
        self.modules = modules
        self.sample_calls = 0

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            self.sample_calls += 1
            with torch.no_grad():
                y = torch.multinomial(F.softmax(logits, -1), 1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return None


def test_spread_losses_give_the_per_example_gradients():
    """A [B] vector summing to the task's batch loss yields the per-example factors of the
    native per-example loss_fn (capture differentiates the sum only)."""
    model, (X, y) = _mlp(), _data(8)
    mods = fastinf.capture.tracked_modules(model)
    want = fastinf.capture.capture(model, _native_loss, (X, y), mods)
    got = fastinf.capture.capture(model, kf.task_loss_fn(ClsTask()), (X, y), mods)
    for name in mods:
        torch.testing.assert_close(got[name].G, want[name].G)
        torch.testing.assert_close(got[name].A, want[name].A)


def test_from_task_matches_native_api():
    model, (X, y) = _mlp(), _data()
    q = (X[:5], y[:5])
    native = fastinf.EKFAC(model, _native_loss, progress=False).fit((X, y), batch_size=8)
    ek = kf.from_task(model, ClsTask(), use_empirical_fisher=True, progress=False)
    assert isinstance(ek, fastinf.EKFAC)
    ek.fit((X, y), batch_size=8)
    torch.testing.assert_close(ek.pairwise_scores(q, (X, y), batch_size=8),
                               native.pairwise_scores(q, (X, y), batch_size=8), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ek.self_scores((X, y), batch_size=8),
                               native.self_scores((X, y), batch_size=8), rtol=1e-4, atol=1e-5)


def test_from_task_defaults_to_sampled_fisher_and_task_modules():
    model, (X, y) = _mlp(), _data()
    task = ClsTask(modules=["2"])
    ek = kf.from_task(model, task, progress=False)
    assert list(ek.modules) == ["2"]
    ek.fit((X, y), batch_size=8)
    assert task.sample_calls == 3  # one pass of 3 batches, labels sampled (tokens kept for Λ)
    ek.fit((X, y), batch_size=8, token_memory=0)
    assert task.sample_calls == 3 + 2 * 3  # two passes (covariances, Λ), as Kronfluence
    assert kf.from_task(model, ClsTask(), progress=False).modules.keys() == {"0", "2"}


def test_from_task_nonfinite_loss_names_the_batch():
    class Bad(ClsTask):
        def compute_train_loss(self, batch, model, sample=False):
            return super().compute_train_loss(batch, model) * float("nan")

    ek = kf.from_task(_mlp(), Bad(), use_empirical_fisher=True, progress=False)
    with pytest.raises(fastinf.NonFiniteError, match="batch of 8 examples"):
        ek.fit(_data(), batch_size=8)


class SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.emb(x))))


class SeqTask:
    def compute_train_loss(self, batch, model, sample=False):
        x, m = batch
        ce = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
        return (ce * m[:, 1:]).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self):
        return None

    def get_attention_mask(self, batch):
        return batch[1][:, :-1].long()


def test_from_task_attention_mask_matches_native_token_mask():
    torch.manual_seed(3)
    x = torch.randint(0, 11, (12, 7))
    m = torch.ones(12, 7)
    m[::2, 5:] = 0
    model = SeqModel().eval()

    def loss(model, b):
        ce = F.cross_entropy(model(b[0][:, :-1]).transpose(1, 2), b[0][:, 1:], reduction="none")
        return (ce * b[1][:, 1:]).sum(1)

    native = fastinf.EKFAC(model, loss, progress=False,
                           token_mask_fn=lambda b: b[1][:, :-1] > 0).fit((x, m), batch_size=4)
    ek = kf.from_task(model, SeqTask(), use_empirical_fisher=True, progress=False).fit((x, m), 4)
    for name in native.factors:
        torch.testing.assert_close(ek.factors[name]["lam"], native.factors[name]["lam"])
    torch.testing.assert_close(ek.pairwise_scores((x[:3], m[:3]), (x, m), batch_size=4),
                               native.pairwise_scores((x[:3], m[:3]), (x, m), batch_size=4),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- factor files
def _write_kronfluence_layout(d: Path, ek, n, scale_lambda=True):
    """Writes fastinf factors in Kronfluence's safetensors layout (Λ summed + count)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    f = ek.factors
    save_file({k: v["QA"].contiguous() for k, v in f.items()}, d / "activation_eigenvectors.safetensors")
    save_file({k: v["QS"].contiguous() for k, v in f.items()}, d / "gradient_eigenvectors.safetensors")
    save_file({k: (v["lam"] * n).contiguous() for k, v in f.items()}, d / "lambda_matrix.safetensors")
    save_file({k: torch.tensor(n, dtype=torch.int64) for k in f}, d / "num_lambda_processed.safetensors")
    (d / "factor_arguments.json").write_text('{"strategy": "ekfac"}')


def test_load_factors_layout_roundtrip(tmp_path):
    pytest.importorskip("safetensors")
    model, (X, y) = _mlp(), _data()
    ek = fastinf.EKFAC(model, _native_loss, progress=False).fit((X, y), batch_size=8)
    _write_kronfluence_layout(tmp_path / "analysis" / "factors_f", ek, len(X))
    for args in ((tmp_path / "analysis" / "factors_f",), (tmp_path, "f")):
        kw = {"factors_name": args[1]} if len(args) > 1 else {}
        loaded = kf.load_factors(args[0], model, ClsTask(), progress=False, **kw)
        torch.testing.assert_close(loaded.pairwise_scores((X[:4], y[:4]), (X, y)),
                                   ek.pairwise_scores((X[:4], y[:4]), (X, y)), rtol=1e-4, atol=1e-5)
    loaded = kf.load_factors(tmp_path / "analysis" / "factors_f", model, _native_loss, progress=False)
    torch.testing.assert_close(loaded.self_scores((X, y)), ek.self_scores((X, y)), rtol=1e-4, atol=1e-5)
    # the fallback reader agrees with the safetensors package
    p = tmp_path / "analysis" / "factors_f" / "lambda_matrix.safetensors"
    import builtins
    real_import = builtins.__import__

    def no_st(name, *a, **k):
        if name.startswith("safetensors"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    want = kf.read_safetensors(p)
    builtins.__import__ = no_st
    try:
        got = kf.read_safetensors(p)
    finally:
        builtins.__import__ = real_import
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_load_factors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="lambda_matrix"):
        kf.load_factors(tmp_path, _mlp(), _native_loss)
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "lambda_matrix.safetensors").write_bytes(b"")
    (tmp_path / "k" / "factor_arguments.json").write_text('{"strategy": "kfac"}')
    with pytest.raises(ValueError, match="strategy='kfac'"):
        kf.load_factors(tmp_path / "k", _mlp(), _native_loss)


# ----------------------------------------------------------------------------- Kronfluence itself
def test_load_factors_and_from_task_match_kronfluence(tmp_path):
    pytest.importorskip("kronfluence", reason="kronfluence not installed; duck-typed paths are "
                        "tested with stand-in tasks above")
    from scipy.stats import spearmanr
    from torch.utils.data import TensorDataset
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class KTask(ClsTask, Task):
        def __init__(self):
            Task.__init__(self)
            ClsTask.__init__(self)

    model, (X, y) = _mlp(), _data(48)
    q = (X[:6], y[:6])
    kmodel = prepare_model(copy.deepcopy(model), KTask())
    an = Analyzer(analysis_name="a", model=kmodel, task=KTask(), cpu=True, disable_tqdm=True,
                  disable_model_save=True, output_dir=str(tmp_path), log_level=logging.WARNING)
    dl = DataLoaderKwargs(num_workers=0)
    an.fit_all_factors("f", TensorDataset(X, y), per_device_batch_size=16, dataloader_kwargs=dl,
                       factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
                       overwrite_output_dir=True)
    an.compute_pairwise_scores("p", "f", TensorDataset(*q), TensorDataset(X, y),
                               per_device_query_batch_size=6, per_device_train_batch_size=16,
                               dataloader_kwargs=dl, score_args=ScoreArguments(damping_factor=None),
                               overwrite_output_dir=True)
    Sk = an.load_pairwise_scores("p")["all_modules"].float()

    loaded = kf.load_factors(tmp_path / "a" / "factors_f", model, ClsTask(), progress=False)
    S = loaded.pairwise_scores(q, (X, y), batch_size=16)
    rho = spearmanr(S.flatten().numpy(), Sk.flatten().numpy())[0]
    assert rho >= 0.99, rho
    torch.testing.assert_close(S, Sk, rtol=1e-3, atol=1e-3 * float(Sk.abs().max()))

    ek = kf.from_task(model, ClsTask(), use_empirical_fisher=True, progress=False)
    S2 = ek.fit((X, y), batch_size=16).pairwise_scores(q, (X, y), batch_size=16)
    rho2 = spearmanr(S2.flatten().numpy(), Sk.flatten().numpy())[0]
    assert rho2 >= 0.99, rho2


# ----------------------------------------------------------------------------- TRAK projector
class ProjectionType(str, enum.Enum):  # TRAK's enum, re-declared (trak is not a dependency)
    normal: str = "normal"
    rademacher: str = "rademacher"


@pytest.mark.parametrize("proj_type", ["rademacher", "normal", ProjectionType.normal,
                                       ProjectionType.rademacher])
def test_projector_matches_jl_project(proj_type):
    g = torch.randn(5, 300)
    P = Projector(grad_dim=300, proj_dim=100, seed=7, proj_type=proj_type, device="cpu")
    kind = getattr(proj_type, "value", proj_type)
    want = jl_project(g, 100, seed=7, kind=kind) * 10.0  # TRAK's unnormalised scale: √proj_dim
    torch.testing.assert_close(P.project(g, model_id=0), want)
    torch.testing.assert_close(P.project(g, 3), jl_project(g, 100, seed=P.seed_for(3), kind=kind) * 10)
    Pn = Projector(300, 100, 7, proj_type, "cpu", normalize=True)
    torch.testing.assert_close(Pn.project(g, 0), want / 10)


def test_projector_semantics():
    g = torch.randn(4, 1000)
    P = Projector(1000, 333, 1, "rademacher", "cpu", block_size=64, dtype=torch.float16,
                  max_batch_size=8)  # proj_dim not a multiple of 512
    a = P.project(g, 0)
    assert a.shape == (4, 333) and a.dtype == torch.float32
    torch.testing.assert_close(P.project(g, 0), a)          # deterministic
    assert not torch.allclose(P.project(g, 1), a)          # another checkpoint, another matrix
    assert not torch.allclose(Projector(1000, 333, 2, "rademacher", "cpu").project(g, 0), a)
    P.free_memory()
    torch.testing.assert_close(P.project(g, 0), a)          # free_memory breaks nothing
    # TRAK's scale: E‖Φg‖² = proj_dim ‖g‖²
    ratio = float((a.norm(dim=1) ** 2 / (333 * g.norm(dim=1) ** 2)).mean())
    assert 0.7 < ratio < 1.3
    assert P.project(g[0], 0).shape == (1, 333)
    assert P.project(g.double(), 0).dtype == torch.float32
    assert P.project(g.half(), 0).dtype == torch.float16
    with pytest.raises(ValueError, match="grad_dim=1000"):
        P.project(torch.randn(2, 999), 0)
    with pytest.raises(ValueError, match="not recognized"):
        Projector(10, 5, 0, "sparse", "cpu")


def test_projector_dict_grads():
    grads = {"w": torch.randn(3, 4, 5), "b": torch.randn(3, 4), "s": torch.randn(3)}
    flat = torch.cat([grads["w"].reshape(3, -1), grads["b"], grads["s"][:, None]], 1)
    torch.testing.assert_close(vectorize(grads), flat)
    P = Projector(25, 9, 0, "normal", device="cuda")  # TRAK's default device; no GPU -> grads' device
    torch.testing.assert_close(P.project(grads, 2), P.project(flat, 2))


# ----------------------------------------------------------------------------- documented examples
def _doc_blocks():
    text = (ROOT / "docs" / "integrations.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_has_examples():
    assert len(_doc_blocks()) >= 3


@pytest.mark.parametrize("i", range(len(_doc_blocks())))
def test_documented_examples_run(i, tmp_path, monkeypatch):
    code = _doc_blocks()[i]
    if re.search(r"^\s*(from|import) kronfluence", code, flags=re.M):
        pytest.importorskip("kronfluence")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/integrations.md[{i}]", "exec"), {"__name__": "__doc_example__"})
