"""Model and data builders shared by the transformer peer benchmark (and usable from docs/tests).

Three causal language models on the same padded token data (right padding, labels -100 on padding):

- ``transformer``: a pre-LN causal transformer made of ``nn.Linear`` projections (no transformers needed);
- ``gpt2`` / ``llama``: Hugging Face ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` built from configs with
  random weights (needs ``transformers``, the optional ``bench`` extra).

Everything is seeded: a model built twice from the same shapes has the same weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

CASES = ("transformer", "gpt2", "llama")
HF_CASES = ("gpt2", "llama")


@dataclass(frozen=True)
class Shapes:
    n_train: int = 256
    n_query: int = 256
    T: int = 48
    d: int = 256
    layers: int = 4
    heads: int = 4
    vocab: int = 384
    mlp: int = 1024          # 4·d for the pre-LN transformer and GPT-2
    llama_mlp: int = 688     # Llama's intermediate size
    batch_size: int = 32

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def shapes(small: bool) -> Shapes:
    if small:
        return Shapes(n_train=48, n_query=24, T=16, d=64, layers=2, heads=2, vocab=96, mlp=256,
                      llama_mlp=172, batch_size=16)
    return Shapes()


# ----------------------------------------------------------------------------- pre-LN transformer
class Block(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x, key_mask):
        B, T, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None] & key_mask[:, None, None, :]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device)  # padded rows: no NaN
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CausalLM(nn.Module):
    """Pre-LN causal transformer: token + position embeddings, blocks, final LayerNorm, LM head."""

    def __init__(self, s: Shapes):
        super().__init__()
        self.tok = nn.Embedding(s.vocab, s.d)
        self.pos = nn.Embedding(s.T, s.d)
        self.blocks = nn.ModuleList(Block(s.d, s.heads, s.mlp) for _ in range(s.layers))
        self.ln = nn.LayerNorm(s.d)
        self.lm_head = nn.Linear(s.d, s.vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        T = input_ids.shape[1]
        key_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask.bool())
        x = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        for b in self.blocks:
            x = b(x, key_mask)
        return self.lm_head(self.ln(x))


# ----------------------------------------------------------------------------- builders
def build_model(case: str, s: Shapes) -> nn.Module:
    """The model of ``case`` with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    if case == "transformer":
        return CausalLM(s).eval()
    import transformers
    transformers.logging.set_verbosity_error()
    if case == "gpt2":
        cfg = transformers.GPT2Config(n_embd=s.d, n_layer=s.layers, n_head=s.heads, n_inner=s.mlp,
                                      vocab_size=s.vocab, n_positions=s.T, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if case == "llama":
        cfg = transformers.LlamaConfig(hidden_size=s.d, num_hidden_layers=s.layers,
                                       num_attention_heads=s.heads, num_key_value_heads=s.heads,
                                       intermediate_size=s.llama_mlp, vocab_size=s.vocab,
                                       max_position_embeddings=s.T, bos_token_id=0, eos_token_id=0,
                                       pad_token_id=0)
        return transformers.LlamaForCausalLM(cfg).eval()
    raise ValueError(f"case must be one of {CASES}, got {case!r}")


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replaces every transformers ``Conv1D`` (weight ``[in, out]``) by the equivalent ``nn.Linear``
    under the same name, in place (Kronfluence tracks only nn.Linear / nn.Conv2d)."""
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ != "Conv1D":
            continue
        din, dout = mod.weight.shape
        lin = nn.Linear(din, dout, bias=mod.bias is not None).to(mod.weight)
        with torch.no_grad():
            lin.weight.copy_(mod.weight.T)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    return model


def make_tokens(n: int, s: Shapes, seed: int):
    """``(input_ids, attention_mask, labels)``: a learnable next-token rule with noise; a third of
    the examples right-padded to a random length (mask 0, labels -100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, s.vocab, (n, s.T), generator=g)
    follow = (ids[:, :-1] * 7 + 3) % (s.vocab - 1) + 1
    keep = torch.rand(n, s.T - 1, generator=g) < 0.7
    ids[:, 1:] = torch.where(keep, follow, ids[:, 1:])
    lengths = torch.full((n,), s.T)
    padded = torch.rand(n, generator=g) < 1 / 3
    lengths[padded] = torch.randint(s.T // 4, s.T, (int(padded.sum()),), generator=g)
    mask = (torch.arange(s.T)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def loss_fn(model, batch):
    """Per-example summed next-token cross-entropy; labels of -100 are ignored."""
    ids, mask, labels = batch
    out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                           reduction="none").sum(1)


def token_mask_fn(batch):
    return batch[1].bool()


def train_briefly(model: nn.Module, data, steps: int, batch_size: int) -> nn.Module:
    """A few Adam steps so the weights are not at their symmetric initialisation."""
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    n = data[0].shape[0]
    for i in range(steps):
        lo = (i * batch_size) % n
        b = tuple(t[lo:lo + batch_size] for t in data)
        opt.zero_grad()
        loss_fn(model, b).mean().backward()
        opt.step()
    return model.eval()


def fastinf_score_step(ek, step: str, query, train, batch_size: int, rank: int):
    """``(scores, seconds)`` of one fastinf scoring step of a fitted EK-FAC: ``"self"``,
    ``"pairwise"`` (exact) or ``"pairwise_rank32"`` (``query_rank=rank``)."""
    t0 = time.perf_counter()
    if step == "self":
        S = ek.self_scores(train, batch_size=batch_size)
    else:
        S = ek.pairwise_scores(query, train, batch_size=batch_size,
                               query_rank=rank if step == "pairwise_rank32" else None)
    return S, time.perf_counter() - t0


def kronfluence_step(model, names, train, query, step: str, batch_size: int, rank: int,
                     work, scores_path, before=lambda: None):
    """One Kronfluence step (EK-FAC, empirical Fisher, damping heuristic) on ``model`` tracking
    ``names``: ``"fit"`` (factors "f" under ``work/kronfluence``), ``"pairwise"``,
    ``"pairwise_rank32"`` (``query_gradient_low_rank=rank``) or ``"self"`` (scores saved to
    ``scores_path``). ``before()`` runs right before the timed call (e.g. to read the setup RSS).
    Returns ``(seconds, before())``. Shared by bench/peers/transformer.py and
    bench/e2e/ekfac_cost.py; kronfluence is imported here, when a step runs."""
    import logging
    from pathlib import Path

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    from torch.utils.data import TensorDataset

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            assert not sample  # empirical Fisher
            return loss_fn(model, batch).sum()

        def compute_measurement(self, batch, model):
            return loss_fn(model, batch).sum()

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch[1]

    task = LMTask()
    an = Analyzer(analysis_name="lm", model=prepare_model(model, task), task=task, cpu=True,
                  disable_tqdm=True, output_dir=str(Path(work) / "kronfluence"),
                  log_level=logging.WARNING)
    dl = DataLoaderKwargs(num_workers=0)
    tds, qds = TensorDataset(*train), TensorDataset(*query)
    bs = batch_size
    sargs = ScoreArguments(damping_factor=None,
                           query_gradient_low_rank=rank if step == "pairwise_rank32" else None)
    mark = before()
    t0 = time.perf_counter()
    if step == "fit":
        an.fit_all_factors("f", tds, per_device_batch_size=bs, dataloader_kwargs=dl,
                           factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
                           overwrite_output_dir=True)
    elif step == "self":
        an.compute_self_scores(step, "f", tds, per_device_train_batch_size=bs, dataloader_kwargs=dl,
                               score_args=sargs, overwrite_output_dir=True)
    else:
        an.compute_pairwise_scores(step, "f", qds, tds, per_device_query_batch_size=bs,
                                   per_device_train_batch_size=bs, dataloader_kwargs=dl,
                                   score_args=sargs, overwrite_output_dir=True)
    dt = time.perf_counter() - t0
    if step == "self":
        torch.save(an.load_self_scores(step)["all_modules"].float(), scores_path)
    elif step != "fit":
        torch.save(an.load_pairwise_scores(step)["all_modules"].float(), scores_path)
    return dt, mark
