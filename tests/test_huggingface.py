"""docs/huggingface.md: its examples run as written on tiny GPT-2 / Llama / LoRA configs.

transformers and peft are optional (the ``bench`` extra): each test skips with the reason when the
package it needs is not installed. Blocks run in order in one namespace, as a reader would.
"""
import re
from pathlib import Path

import pytest
import torch

import fastinf

DOC = Path(__file__).resolve().parents[1] / "docs" / "huggingface.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
DATA, GPT2, LLAMA, LORA, PER_TOKEN = range(5)

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (optional: pip install '.[bench]')")


def _run(*idx):
    ns = {}
    for i in idx:
        exec(compile(BLOCKS[i], f"docs/huggingface.md[python block {i}]", "exec"), ns)
    return ns


def test_doc_has_the_blocks_this_test_runs():
    assert len(BLOCKS) == 5
    assert "GPT2LMHeadModel" in BLOCKS[GPT2] and "LlamaForCausalLM" in BLOCKS[LLAMA]
    assert "get_peft_model" in BLOCKS[LORA] and "per_token=True" in BLOCKS[PER_TOKEN]


def test_data_block_pads_with_mask_and_ignored_labels():
    ns = _run(DATA)
    ids, mask, labels = ns["train"]
    assert (mask == 0).any() and (mask == 1).any()
    assert ((labels == -100) == (mask == 0)).all()


def test_gpt2_example():
    ns = _run(DATA, GPT2)
    assert ns["scores"].shape == (6, 40) and torch.isfinite(ns["scores"]).all()
    assert ns["self_inf"].shape == (40,) and (ns["self_inf"] > 0).all()
    tracked = list(getattr(ns["ek"], "tracked_modules", None) or ns["ek"].modules)
    assert "lm_head" in tracked


def test_gpt2_conv1d_layers_tracked_by_default():
    ns = _run(DATA, GPT2)
    conv1d = [n for n, m in ns["gpt2"].named_modules() if type(m).__name__ == "Conv1D"]
    tracked = list(ns["ek"].modules)
    assert conv1d and set(conv1d) <= set(tracked)


def test_llama_example_excludes_lm_head_and_padding_matters():
    ns = _run(DATA, LLAMA)
    ek, decoder = ns["ek_llama"], ns["decoder"]
    tracked = list(getattr(ek, "tracked_modules", None) or ek.modules)
    assert "lm_head" not in tracked and tracked == decoder and len(decoder) == 2 * 7
    S = ns["scores_llama"]
    assert S.shape == (6, 40) and torch.isfinite(S).all()
    # the mask is not a no-op: without it the padded tokens enter the factors and change the scores
    unmasked = fastinf.EKFAC(ns["llama"], ns["loss_fn"], modules=decoder, progress=False)
    S0 = unmasked.fit(ns["train"], batch_size=16).pairwise_scores(ns["query"], ns["train"],
                                                                  batch_size=16)
    assert not torch.allclose(S, S0, rtol=1e-3, atol=0)


def test_lora_example_tracks_only_adapters():
    pytest.importorskip("peft", reason="peft is not installed (optional: pip install peft)")
    ns = _run(DATA, LLAMA, LORA)
    adapters, ek = ns["adapters"], ns["ek_lora"]
    tracked = list(getattr(ek, "tracked_modules", None) or ek.modules)
    assert tracked == adapters and len(adapters) == 2 * 2 * 2   # 2 layers × (q, v) × (A, B)
    assert all(".lora_A." in n or ".lora_B." in n for n in tracked)
    S = ns["scores_lora"]
    assert S.shape == (6, 40) and torch.isfinite(S).all() and S.abs().max() > 0
    # the documented claim: the default set on a peft model is the same adapter layers
    default = fastinf.EKFAC(ns["lora"], ns["loss_fn"], progress=False)
    assert list(getattr(default, "tracked_modules", None) or default.modules) == adapters


def test_per_token_example():
    _run(DATA, LLAMA, PER_TOKEN)
