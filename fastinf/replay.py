"""Block replay: a later gradient pass over the same data recomputes only the blocks that hold
its layers.

Where the query state of all layers does not fit the memory budget, pairwise scoring splits the
layers into groups (:func:`fastinf.scoring.query_batches`) and runs one gradient pass over the
queries and one over the train set per group: every pass a full forward and backward of the
model, though a group holds a few layers of one transformer block. A
:class:`BlockReplay` makes the later passes cheap. On the first pass over a dataset it records,
per batch, what each *block* of the model's main stack received (its arguments, the hidden
states among them) and the gradient of the loss w.r.t. its outputs. A later pass over a group
of layers then runs only the blocks holding those layers, from the recorded arguments, and
backpropagates the recorded output gradients through them: the same operations on the same
numbers as the full pass, so the same ``A`` and ``G``, at the cost of the blocks touched.

The blocks are the children of the ``nn.ModuleList`` / ``nn.Sequential`` (at least two) that
hold the most tracked layers: a transformer's layers (``model.blocks``, GPT-2's
``transformer.h``, Llama's ``model.layers``, ``nn.TransformerEncoder.layers``). Layers outside
them (an LM head) are captured by full passes.

What is checked, so that nothing is silently wrong: each block must be called once per forward,
with arguments that are tensors, numbers, strings, None or containers of these (a key/value
custom object is not; a key/value cache, an object whose class name ends in ``Cache`` as
transformers' ``DynamicCache``, is replayed as None); a tracked layer of a block must be called
only inside that block's call; and every replayed block must run and reproduce its recorded
outputs (a float64 sum and sum of squares per output: a block reading a non-empty cache or any
state that is not an argument does not). Where any of this fails, replay is switched off for
the dataset (one warning says why) and the passes run in full, as without it.

Memory: the recorded tensors of a batch are about ``2 · blocks · B · T · d`` numbers (hidden
states in, gradients out; 100 MB for 256 examples of the d=256, T=48, 4-block transformer of
``bench/peers/transformer.py``), fewer where only some blocks are kept (:meth:`BlockReplay.restrict`:
the blocks no later group replays). Batches are recorded while the total stays within
:func:`replay_memory_bytes` (env ``FASTINF_REPLAY_MEMORY_MB``, default 256); the other batches
are captured by full passes. ``FASTINF_REPLAY_MEMORY_MB=0`` turns replay off.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .capture import collect, recording
from .layers import LayerBatch

log = logging.getLogger("fastinf")

__all__ = ["BlockReplay", "find_blocks", "replay_memory_bytes"]


def replay_memory_bytes() -> int:
    """Bytes one :class:`BlockReplay` may record (env ``FASTINF_REPLAY_MEMORY_MB``, default 256)."""
    return int(float(os.environ.get("FASTINF_REPLAY_MEMORY_MB", "256")) * 2**20)


def find_blocks(model: nn.Module, modules: Dict[str, nn.Module]
                ) -> List[Tuple[str, nn.Module, List[str]]]:
    """``[(name, block, tracked layer names inside)]``: the children of the ``nn.ModuleList`` or
    ``nn.Sequential`` whose children (not tracked layers themselves) hold the most tracked layers,
    where at least two children hold some; ``[]`` if there is none."""
    tracked = {id(m): n for n, m in modules.items()}
    best: List[Tuple[str, nn.Module, List[str]]] = []
    for cname, cont in model.named_modules():
        if not isinstance(cont, (nn.ModuleList, nn.Sequential)):
            continue
        blocks = []
        for child_name, child in cont.named_children():
            if id(child) in tracked:
                continue
            inside = [tracked[id(m)] for m in child.modules() if id(m) in tracked]
            if inside:
                blocks.append((f"{cname}.{child_name}" if cname else child_name, child, inside))
        if len(blocks) >= 2 and sum(len(b[2]) for b in blocks) > sum(len(b[2]) for b in best):
            best = blocks
    return best


class _Unreplayable(Exception):
    pass


_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)


def _freeze(obj, memo: dict):
    """A detached copy of a block argument (tensors cloned once each, shared ones shared)."""
    if isinstance(obj, torch.Tensor):
        k = id(obj)
        if k not in memo:
            memo[k] = obj.detach().clone()
        return memo[k]
    if isinstance(obj, _PLAIN):
        return obj
    if any(c.__name__.endswith("Cache") for c in type(obj).__mro__):
        return None     # a key/value cache (transformers' DynamicCache): filled, not read, by a
        #                 forward that starts empty; a replay without it must reproduce the outputs
    if type(obj) in (tuple, list):
        return type(obj)(_freeze(x, memo) for x in obj)
    if type(obj) is dict:
        return {k: _freeze(v, memo) for k, v in obj.items()}
    raise _Unreplayable(f"an argument of type {type(obj).__name__}")


def _grad_tensors(out) -> List[torch.Tensor]:
    """The tensors of a block's output (nested tuples / lists / dicts) that carry gradient."""
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad else []
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _grad_tensors(x)]
    if isinstance(out, dict):
        return [t for x in out.values() for t in _grad_tensors(x)]
    return []


def _check(ts: List[torch.Tensor]) -> List[Tuple[int, float, float]]:
    """Per tensor: its size, float64 sum and sum of squares (a recomputation must match)."""
    out = []
    for t in ts:
        x = t.detach().double()
        out.append((t.numel(), float(x.sum()), float(x.square().sum())))
    return out


def _same(a, b, rtol: float = 1e-6) -> bool:
    """Whether two :func:`_check` lists agree (to ``rtol``: a recomputation by the same kernels
    agrees to rounding, a different input does not; NaN never agrees)."""
    if len(a) != len(b):
        return False
    for (n1, s1, q1), (n2, s2, q2) in zip(a, b):
        scale = max(q1, q2)
        if not (n1 == n2 and abs(q1 - q2) <= rtol * scale
                and abs(s1 - s2) <= rtol * (n1 * scale) ** 0.5):
            return False
    return True


def _nbytes(obj, seen: Optional[set] = None) -> int:
    """Bytes of the tensors in ``obj`` (nested containers), each tensor once: the blocks of a
    batch share some arguments (a Llama's rotary embeddings, its attention mask)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(x, seen) for x in obj.values())
    return 0


class _Batch:
    """What one batch's blocks received and the gradients w.r.t. their outputs."""
    __slots__ = ("args", "gouts", "checks")

    def __init__(self):
        self.args: Dict[int, tuple] = {}
        self.gouts: Dict[int, list] = {}
        self.checks: Dict[int, list] = {}


def _batch_bytes(batch: _Batch, blocks=None) -> int:
    """Bytes of one batch's records (of ``blocks`` only, if given), shared tensors once."""
    seen: set = set()
    return sum(_nbytes(d[b], seen) for d in (batch.args, batch.gouts) for b in d
               if blocks is None or b in blocks)


class BlockRecorder:
    """Records the blocks of one batch during a full pass (:func:`fastinf.capture.capture`'s
    ``record``): :meth:`watch` around the forward, :meth:`outputs` to differentiate with the
    tracked outputs, :meth:`keep` with their gradients."""

    def __init__(self, replay: "BlockReplay", key: int):
        self.replay, self.key = replay, key
        self.batch = _Batch()
        self.outs: Dict[int, List[torch.Tensor]] = {}
        self.calls: Dict[int, int] = {}
        self.memo: dict = {}
        self.problem: Optional[str] = None
        self.current: List[int] = []

    @contextlib.contextmanager
    def watch(self):
        r = self.replay
        handles = []

        def pre(b):
            def hook(mod, args, kwargs):
                self.calls[b] = self.calls.get(b, 0) + 1
                self.current.append(b)
                if self.problem is None and torch.is_grad_enabled():
                    try:
                        self.batch.args[b] = (_freeze(args, self.memo), _freeze(kwargs, self.memo))
                    except _Unreplayable as e:
                        self.problem = f"block {r.names[b]!r} received {e}"
            return hook

        def post(b):
            def hook(mod, args, kwargs, out):
                if self.current and self.current[-1] == b:
                    self.current.pop()
                ts = _grad_tensors(out)
                self.outs[b] = ts
                self.batch.checks[b] = _check(ts)
            return hook

        def layer(name):
            def hook(mod, args):
                if r.block_of[name] not in self.current and self.problem is None:
                    self.problem = (f"tracked layer {name!r} is called outside its block "
                                    f"{r.names[r.block_of[name]]!r}")
            return hook

        try:
            # only the blocks kept (BlockReplay.restrict), and their layers, are watched
            for b, blk in enumerate(r.blocks):
                if r.keeps(b):
                    handles.append(blk.register_forward_pre_hook(pre(b), with_kwargs=True))
                    handles.append(blk.register_forward_hook(post(b), with_kwargs=True))
            for name, m in r.layers.items():
                if r.keeps(r.block_of[name]):
                    handles.append(m.register_forward_pre_hook(layer(name)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def outputs(self) -> List[torch.Tensor]:
        return [t for b in sorted(self.outs) for t in self.outs[b]]

    def keep(self, grads) -> None:
        r = self.replay
        if self.problem is None:
            twice = [b for b, n in self.calls.items() if n != 1]
            missing = [b for b in range(len(r.blocks)) if b not in self.batch.args and r.keeps(b)]
            if twice:
                self.problem = (f"block {r.names[twice[0]]!r} is called {self.calls[twice[0]]} "
                                "times per forward")
            elif missing:
                self.problem = f"block {r.names[missing[0]]!r} is not called under grad"
        if self.problem is not None:
            r.disable(self.problem)
            return
        k = 0
        for b in sorted(self.outs):
            gs = []
            for _ in self.outs[b]:
                g = grads[k]
                k += 1
                gs.append(None if g is None else g.detach())
            self.batch.gouts[b] = gs
        r.add(self.key, self.batch)


class BlockReplay:
    """The recorded blocks of one dataset (one model state), keyed by batch offset; see the
    module docstring. ``capture`` returns None where it cannot replay (the caller runs a full
    pass, recording through :meth:`recorder`)."""

    def __init__(self, model: nn.Module, modules: Dict[str, nn.Module], budget: Optional[int] = None,
                 what: str = "data", keep=None):
        found = find_blocks(model, modules)
        self.names = [n for n, _, _ in found]
        self.blocks = [b for _, b, _ in found]
        self.block_of = {layer: i for i, (_, _, inside) in enumerate(found) for layer in inside}
        self.layers = {n: modules[n] for n in self.block_of}
        self.budget = replay_memory_bytes() if budget is None else budget
        self.what = what
        self.kept = None if keep is None else frozenset(keep)   # blocks recorded (None: all)
        self.records: Dict[int, _Batch] = {}
        self.bytes = 0
        self.full = False
        self.reason: Optional[str] = None if found else "no stack of blocks"
        if self.budget <= 0:
            self.reason = "FASTINF_REPLAY_MEMORY_MB=0"

    @property
    def active(self) -> bool:
        return self.reason is None

    def keeps(self, b: int) -> bool:
        """Whether block ``b`` is recorded (:meth:`restrict`)."""
        return self.kept is None or b in self.kept

    def covers(self, names) -> bool:
        return self.active and all(n in self.block_of and self.keeps(self.block_of[n])
                                   for n in names)

    def restrict(self, blocks) -> None:
        """Records only ``blocks`` from now on and drops the other blocks' records: the passes
        that replay come after a first group of layers whose passes are full, so a block none of
        the later groups touches is never replayed."""
        self.kept = frozenset(blocks)
        for rec in self.records.values():
            for d in (rec.args, rec.gouts, rec.checks):
                for b in [b for b in d if b not in self.kept]:
                    del d[b]
        self.bytes = sum(_batch_bytes(rec) for rec in self.records.values())

    def block_bytes(self, blocks) -> int:
        """Bytes the records held so far keep for ``blocks``."""
        return sum(_batch_bytes(rec, blocks) for rec in self.records.values())

    def disable(self, reason: str) -> None:
        if self.reason is None:
            log.warning("fastinf: block replay is off for the %s passes (%s); each group of layers "
                        "runs a full gradient pass instead", self.what, reason)
            self.reason = reason
        self.records.clear()
        self.bytes = 0

    def recorder(self, key: int) -> Optional[BlockRecorder]:
        if not self.active or self.full or key in self.records:
            return None
        return BlockRecorder(self, key)

    def add(self, key: int, batch: _Batch) -> None:
        size = _batch_bytes(batch)
        if self.bytes + size > self.budget:
            self.full = True        # later batches: full passes
            return
        self.records[key] = batch
        self.bytes += size

    def capture(self, key: int, modules: Dict[str, nn.Module], token_mask, what: str
                ) -> Optional[Dict[str, LayerBatch]]:
        rec = self.records.get(key)
        if rec is None or not self.covers(modules):
            return None
        touched = sorted({self.block_of[n] for n in modules})
        outs: List[torch.Tensor] = []
        gouts: List[torch.Tensor] = []
        with recording(modules) as (inputs, outputs):
            with torch.enable_grad():
                for b in touched:
                    args, kwargs = rec.args[b]
                    try:
                        ts = _grad_tensors(self.blocks[b](*args, **kwargs))
                    except Exception as e:     # noqa: BLE001 (reported, then full passes)
                        self.disable(f"replaying block {self.names[b]!r} raised "
                                     f"{type(e).__name__}: {e}")
                        return None
                    if not _same(_check(ts), rec.checks[b]):
                        self.disable(f"block {self.names[b]!r} did not reproduce its recorded "
                                     "outputs from its recorded arguments (it reads state that is "
                                     "not an argument, or a non-empty cache)")
                        return None
                    for t, g in zip(ts, rec.gouts[b]):
                        if g is not None:
                            outs.append(t)
                            gouts.append(g)
        names = [n for n in modules if outputs[n]]
        flat = [o for n in names for o in outputs[n]]
        grads = torch.autograd.grad(outs, flat, grad_outputs=gouts, allow_unused=True) \
            if outs else [None] * len(flat)
        return collect(modules, names, inputs, outputs, grads, token_mask, key, what)
