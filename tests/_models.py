"""Small models, losses and token data shared by the method and store tests."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, d=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tok, mask):                     # tok [B, L], mask [B, L]
        h = self.emb(tok)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~mask[:, None, :], -1e9).softmax(-1)
        h = h + self.proj(att @ v)
        h = h + torch.tanh(self.ff(h))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def tf_loss(model, batch):
    tok, mask, y = batch
    return F.cross_entropy(model(tok, mask), y, reduction="none")


def token_data(g, n, L=7):
    """``(tokens [n, L], mask [n, L], labels [n])``: 2..L real tokens per example, 0 = padding."""
    tok = torch.randint(1, 11, (n, L), generator=g)
    lens = torch.randint(2, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None] < lens[:, None]
    return torch.where(mask, tok, 0), mask, torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """For modules running many tiny passes (import it into the module): one intra-op thread
    avoids oversubscription on a shared machine (100x faster on 2 loaded cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
