"""Gradient store: the training-set gradient pass done once, kept on disk, queried many times.

```python
store = fastinf.GradientStore.build(path, method, train, batch_size=64, shard_size=4096)
store = fastinf.GradientStore.open(path)
S   = method.pairwise_scores(query, store)          # a store is accepted wherever `train` is
s   = method.self_scores(store)                     # precomputed at build time
top = method.top_influences(query, store, k=10)     # streams over shards
```

What is stored per example (``method`` = a fitted :class:`~fastinf.EKFAC` or a
:class:`~fastinf.TracIn`), per tracked layer and per checkpoint (TracIn with several checkpoints
keeps one entry per checkpoint):

* **token factors** ``A_n [T_n, din]``, ``G_n [T_n, dout]`` in the model dtype, masked (padding)
  tokens dropped, when ``T·(din + dout) < din·dout`` (T = the most tokens of an example in the
  first batch): ``T·(din+dout)`` numbers instead of ``din·dout``. Scoring then runs the fused
  ops (``score_dense`` against EK-FAC's preconditioned queries, ``score_factored`` /
  ``score_dense`` against TracIn's query factors), ``O(T·din·dout)`` per pair of example and query;
* else the **materialised gradient** ``D_n [dout, din]``: more bytes when T is small relative to
  the layer, but scores become one GEMM ``vec(D_n)·vec(M_q)`` (fastest per query);
* **TracIn with a projection**: the projected gradient (``[k_out·k_in]`` per layer summed over the
  layers for Kronecker, ``[dim]`` for dense JL) — the smallest store, with projected scores.

The trade-off: factors keep the store small for long-sequence-free layers with few tokens
(MLP heads, T=1) and wide layers, dense gradients make scoring cheapest; a projection trades
exactness for a fixed size per example.

On disk (a directory)::

    manifest.json              format version, model fingerprint (tracked module names and
                               shapes + hash of the weights), method kind and settings, dtype,
                               layouts, shards with example ranges, sizes and sha256 checksums
    shard-00000.safetensors    one file per shard of ``shard_size`` examples:
                               ``c<k>/<module>/A``, ``/G`` flat token arrays [ntok, d] and
                               ``/offsets`` [n+1] (factors), or ``c<k>/<module>/D`` [n, dout, din],
                               or ``c<k>/proj`` [n, K]; ``self`` [n] the self-influence

Shards are written to a temporary name, fsync'ed and renamed when complete; the manifest is
rewritten atomically (temp + ``os.replace``) after each shard, so a build killed at any moment
resumes (``resume=True``) with verified shards and ends identical to an uninterrupted build.
Reading needs no lock and works in read-only directories.

Scale-out: under ``torch.distributed`` see :mod:`fastinf.distributed`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed as dist
from .capture import LayerBatch, layer_shape
from .data import _check_batch_size, num_examples

FORMAT = "fastinf.store"
VERSION = 1
MANIFEST = "manifest.json"

__all__ = ["GradientStore", "StoreError", "DenseLayer"]


class StoreError(ValueError):
    """A store is missing, corrupt, incomplete, or does not match the model / method."""


class DenseLayer:
    """A materialised per-example gradient block ``D [B, dout, din]`` read from a store."""
    __slots__ = ("D",)

    def __init__(self, D: torch.Tensor):
        self.D = D


# --------------------------------------------------------------------------- hashing helpers
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def hash_state(sd: Dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            continue
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(_tensor_bytes(v))
    return h.hexdigest()


def model_fingerprint(model, modules) -> dict:
    return {"modules": {n: list(layer_shape(m)) for n, m in modules.items()},
            "weights_sha256": hash_state(model.state_dict())}


# --------------------------------------------------------------------------- data subsets
def subset(data, start: int, stop: int):
    """Examples ``[start, stop)`` of any accepted data form, in the same form."""
    if isinstance(data, torch.Tensor):
        return data[start:stop]
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(t[start:stop] for t in data)
    if isinstance(data, DataLoader):
        return DataLoader(Subset(data.dataset, range(start, stop)), batch_size=data.batch_size,
                          shuffle=False, collate_fn=data.collate_fn, num_workers=data.num_workers)
    return Subset(data, range(start, stop))


# --------------------------------------------------------------------------- layer packing
def pack_factors(lb: LayerBatch, dtype: torch.dtype):
    """``(A_flat [ntok, din], G_flat [ntok, dout], offsets [B+1])``, masked tokens dropped."""
    B, T, din = lb.A.shape
    if lb.mask is None:
        keep = torch.ones(B, T, dtype=torch.bool, device=lb.A.device)
    else:
        keep = lb.mask
    counts = keep.sum(1).cpu().to(torch.int64)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    A = lb.A.detach()[keep].to(dtype).cpu()
    G = lb.G.detach()[keep].to(dtype).cpu()
    return A, G, offsets


def unpack_factors(A: torch.Tensor, G: torch.Tensor, offsets: torch.Tensor, device) -> LayerBatch:
    """Padded ``LayerBatch`` ``[B, Tmax, ·]`` (mask None when every example has Tmax tokens)."""
    counts = offsets[1:] - offsets[:-1]
    B = counts.numel()
    Tm = int(counts.max()) if B else 0
    if B and bool((counts == Tm).all()):
        return LayerBatch(A.reshape(B, Tm, -1).to(device), G.reshape(B, Tm, -1).to(device), None)
    mask = torch.arange(Tm)[None, :] < counts[:, None]
    Ap = A.new_zeros(B, Tm, A.shape[1])
    Gp = G.new_zeros(B, Tm, G.shape[1])
    Ap[mask] = A
    Gp[mask] = G
    return LayerBatch(Ap.to(device), Gp.to(device), mask.to(device))


def choose_layouts(factors: Dict[str, LayerBatch]) -> Dict[str, str]:
    """``"factors"`` where ``T·(din+dout) < din·dout`` (T = most tokens of an example), else
    ``"dense"``."""
    out = {}
    for name, lb in factors.items():
        T = lb.A.shape[1] if lb.mask is None else int(lb.mask.sum(1).max())
        out[name] = "factors" if T * (lb.din + lb.dout) < lb.din * lb.dout else "dense"
    return out


def encode_layer(prefix: str, lb: LayerBatch, layout: str, dtype) -> Dict[str, torch.Tensor]:
    if layout == "factors":
        A, G, off = pack_factors(lb, dtype)
        return {f"{prefix}/A": A, f"{prefix}/G": G, f"{prefix}/offsets": off}
    D = torch.bmm(lb.G.detach().transpose(1, 2), lb.A.detach())
    return {f"{prefix}/D": D.to(dtype).cpu()}


def decode_layer(tensors: Dict[str, torch.Tensor], prefix: str, layout: str, device):
    if layout == "factors":
        return unpack_factors(tensors[f"{prefix}/A"], tensors[f"{prefix}/G"],
                              tensors[f"{prefix}/offsets"], device)
    return DenseLayer(tensors[f"{prefix}/D"].to(device))


def cat_parts(parts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Concatenates the per-batch encodings of one shard (offsets are re-based)."""
    out: Dict[str, List[torch.Tensor]] = {}
    for p in parts:
        for k, v in p.items():
            out.setdefault(k, []).append(v)
    res = {}
    for k, vs in out.items():
        if k.endswith("/offsets"):
            acc, base = [vs[0]], int(vs[0][-1])
            for v in vs[1:]:
                acc.append(v[1:] + base)
                base += int(v[-1])
            res[k] = torch.cat(acc).contiguous()
        else:
            res[k] = torch.cat(vs, 0).contiguous()
    return res


# --------------------------------------------------------------------------- io helpers
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes, *, kill_point: Optional[str] = None) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        if kill_point is not None and _test_kill(kill_point):
            fh.write(data[:len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _test_kill(point: str) -> bool:
    """Test hook: ``FASTINF_STORE_TEST_KILL=<point>`` (e.g. ``mid:1``, ``shard:2``,
    ``manifest:0``) SIGKILLs the process at that point of the build."""
    return os.environ.get("FASTINF_STORE_TEST_KILL") == point


def _maybe_kill(point: str) -> None:
    if _test_kill(point):
        os.kill(os.getpid(), signal.SIGKILL)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _read_manifest(path: str) -> dict:
    mp = os.path.join(path, MANIFEST)
    if not os.path.isfile(mp):
        raise StoreError(f"{path}: no {MANIFEST}; not a fastinf gradient store (or its build "
                         "never wrote a shard)")
    try:
        with open(mp) as fh:
            man = json.load(fh)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{mp}: the manifest is unreadable or truncated ({exc}); rebuild the "
                         "store, or resume its build with resume=True") from exc
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise StoreError(f"{mp}: not a fastinf gradient store manifest")
    if man.get("version") != VERSION:
        raise StoreError(f"{mp}: store format version {man.get('version')} is not supported "
                         f"(expected {VERSION})")
    for key in ("model", "method", "layouts", "shards", "n_examples", "shard_size"):
        if key not in man:
            raise StoreError(f"{mp}: the manifest lacks {key!r}; it is truncated or corrupt")
    return man


def _diff(expected, got, where=""):
    """The first differing key path between two JSON-like values, or None."""
    if isinstance(expected, dict) and isinstance(got, dict):
        for k in sorted(set(expected) | set(got)):
            if k not in expected or k not in got:
                return f"{where}{k}"
            d = _diff(expected[k], got[k], f"{where}{k}.")
            if d:
                return d
        return None
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        if len(expected) != len(got):
            return where.rstrip(".") or "list length"
        for i, (a, b) in enumerate(zip(expected, got)):
            d = _diff(a, b, f"{where}{i}.")
            if d:
                return d
        return None
    if isinstance(expected, float) or isinstance(got, float):
        try:
            if abs(float(expected) - float(got)) <= 1e-12 * max(1.0, abs(float(expected))):
                return None
        except (TypeError, ValueError):
            pass
    return None if expected == got else where.rstrip(".")


# --------------------------------------------------------------------------- the store
class GradientStore:
    """A read-only view of a built store (see the module doc). Use :meth:`build` / :meth:`open`."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.shards = manifest["shards"]
        self.layouts = manifest["layouts"]

    def __len__(self) -> int:
        return int(self.manifest["n_examples"])

    def __repr__(self) -> str:
        return (f"GradientStore({self.path!r}, {len(self)} examples, {len(self.shards)} shards, "
                f"method={self.manifest['method'].get('kind')})")

    @property
    def nbytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.shards)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path, *, verify: bool = True) -> "GradientStore":
        """Opens a complete store; ``verify`` checks every shard's sha256 (else only its size).
        Shards are also verified whenever they are read. Raises :class:`StoreError`."""
        path = os.fspath(path)
        man = _read_manifest(path)
        if not man.get("complete"):
            raise StoreError(f"{path}: the build of this store did not finish; run "
                             "GradientStore.build(..., resume=True) to complete it")
        covered = 0
        for s in sorted(man["shards"], key=lambda s: s["start"]):
            if s["start"] != covered:
                raise StoreError(f"{path}: the manifest's shards do not cover examples "
                                 f"[{covered}, {s['start']}); it is corrupt")
            covered = s["stop"]
            fp = os.path.join(path, s["file"])
            if not os.path.isfile(fp):
                raise StoreError(f"{path}: shard {s['file']} (examples {s['start']}..{s['stop']}) "
                                 "is missing")
            if os.path.getsize(fp) != s["bytes"]:
                raise StoreError(f"{path}: shard {s['file']} has {os.path.getsize(fp)} bytes, the "
                                 f"manifest says {s['bytes']}: truncated or corrupt")
            if verify and _sha256_file(fp) != s["sha256"]:
                raise StoreError(f"{path}: shard {s['file']} fails its sha256 checksum: corrupt")
        if covered != man["n_examples"]:
            raise StoreError(f"{path}: the shards cover {covered} of {man['n_examples']} examples")
        man["shards"] = sorted(man["shards"], key=lambda s: s["start"])
        return cls(path, man)

    def read_shard(self, i: int, device=None) -> Dict[str, torch.Tensor]:
        """The tensors of shard ``i`` (checksum verified)."""
        from safetensors.torch import load

        s = self.shards[i]
        fp = os.path.join(self.path, s["file"])
        try:
            with open(fp, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise StoreError(f"{self.path}: shard {s['file']} cannot be read: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise StoreError(f"{self.path}: shard {s['file']} fails its sha256 checksum: corrupt")
        t = load(data)
        if device is not None:
            t = {k: v.to(device) for k, v in t.items()}
        return t

    def entries(self, tensors: Dict[str, torch.Tensor], n_checkpoints: int, modules, device):
        """Per checkpoint: ``{module: LayerBatch | DenseLayer}`` or the projected ``[n, K]``."""
        out = []
        for ck in range(n_checkpoints):
            if f"c{ck}/proj" in tensors:
                out.append(tensors[f"c{ck}/proj"].to(device))
            else:
                out.append({n: decode_layer(tensors, f"c{ck}/{n}", self.layouts[n], device)
                            for n in modules})
        return out

    def self_scores(self) -> torch.Tensor:
        return torch.cat([self.read_shard(i)["self"] for i in range(len(self.shards))]).float()

    # ------------------------------------------------------------------ compatibility
    def check(self, method) -> None:
        """Raises :class:`StoreError` naming the mismatch if ``method`` (and its model) is not
        the one the store was built with."""
        got_model = model_fingerprint(method.model, method.modules)
        got_method = method._store_spec()
        d = _diff(self.manifest["model"], got_model)
        if d:
            what = "the model's weights differ" if d == "weights_sha256" else \
                f"the tracked modules differ ({d})"
            raise StoreError(f"{self.path}: the store was built with a different model: {what}")
        if self.manifest["method"].get("kind") != got_method.get("kind"):
            raise StoreError(f"{self.path}: the store was built for method kind "
                             f"{self.manifest['method'].get('kind')!r}, not {got_method['kind']!r}")
        d = _diff(self.manifest["method"], got_method)
        if d:
            raise StoreError(f"{self.path}: the store was built with different method settings: "
                             f"{d} is {_get(self.manifest['method'], d)!r} in the store, "
                             f"{_get(got_method, d)!r} now")

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, path, method, train, batch_size: int = 64, shard_size: int = 4096, *,
              resume: bool = True, overwrite: bool = False, progress: bool = True,
              layout: str = "auto") -> "GradientStore":
        """Runs the training-gradient pass of ``method`` over ``train`` once and writes the store.

        ``resume=True`` continues a build of the same store (same model, method, data size, shard
        and batch sizes) that stopped; ``resume=False`` on an existing store raises unless
        ``overwrite=True``. Under ``torch.distributed`` each rank writes the shards
        ``i % world == rank`` and rank 0 writes the final manifest. ``layout``: ``"auto"``
        (factors where ``T·(din+dout) < din·dout``, else dense), ``"factors"`` or ``"dense"``
        (every layer; dense makes each score one GEMM at a higher storage cost).
        """
        if layout not in ("auto", "factors", "dense"):
            raise ValueError(f"layout must be 'auto', 'factors' or 'dense', got {layout!r}")
        _check_batch_size(batch_size)
        _check_batch_size(shard_size, "shard_size")
        path = os.fspath(path)
        n = num_examples(train)
        if n == 0:
            raise ValueError("'train' is empty: nothing to store")
        if hasattr(method, "_require_fit"):
            method._require_fit("GradientStore.build")
        rank, world = dist.rank(), dist.world()
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        first = subset(train, 0, min(batch_size, n))
        layouts = method._store_layouts(first, batch_size)
        if layout != "auto":
            layouts = {k: layout for k in layouts}
        header = dict(format=FORMAT, version=VERSION,
                      model=model_fingerprint(method.model, method.modules),
                      method=method._store_spec(), layouts=layouts,
                      dtype=str(method._store_dtype()).replace("torch.", ""),
                      n_examples=n, shard_size=shard_size, batch_size=batch_size)
        done = cls._prepare(path, header, resume, overwrite, rank)
        dist.barrier()
        n_shards = (n + shard_size - 1) // shard_size
        mine = [i for i in range(n_shards) if i % world == rank]
        partial = MANIFEST if world == 1 else f"manifest.rank{rank}.json"
        from ._pass import progress_bar

        with progress_bar(sum(min(shard_size, n - i * shard_size) for i in mine),
                          "fastinf store", progress) as bar:
            for i in mine:
                if i in done:
                    bar.update(done[i]["stop"] - done[i]["start"])
                    continue
                start, stop = i * shard_size, min(n, (i + 1) * shard_size)
                tensors = method._store_shard(subset(train, start, stop), batch_size, layouts)
                from safetensors.torch import save

                # no metadata: safetensors writes its map in hash order, which would make
                # the bytes of a resumed build differ from an uninterrupted one
                data = save({k: v.contiguous() for k, v in tensors.items()})
                _write_atomic(os.path.join(path, shard_name(i)), data, kill_point=f"mid:{i}")
                _maybe_kill(f"shard:{i}")
                done[i] = dict(index=i, file=shard_name(i), start=start, stop=stop,
                               bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
                mine_done = [done[j] for j in sorted(done) if world == 1 or j % world == rank]
                cls._write_manifest(path, partial, dict(header, shards=mine_done, complete=False))
                _maybe_kill(f"manifest:{i}")
                bar.update(stop - start)
        dist.barrier()
        if rank == 0:
            allshards = dict(done)
            for r in range(1, world):
                rp = os.path.join(path, f"manifest.rank{r}.json")
                with open(rp) as fh:
                    for s in json.load(fh)["shards"]:
                        allshards[s["index"]] = s
            shards = [allshards[i] for i in range(n_shards)]
            cls._write_manifest(path, MANIFEST, dict(header, shards=shards, complete=True))
            for r in range(world if world > 1 else 0):
                try:
                    os.remove(os.path.join(path, f"manifest.rank{r}.json"))
                except FileNotFoundError:
                    pass
        dist.barrier()
        return cls.open(path, verify=False)

    @staticmethod
    def _write_manifest(path, name, man):
        _write_atomic(os.path.join(path, name),
                      json.dumps(man, indent=1, sort_keys=True).encode())

    @classmethod
    def _prepare(cls, path, header, resume, overwrite, rank) -> Dict[int, dict]:
        """Verified shards already built (resume), after clearing what cannot be reused."""
        existing = [f for f in os.listdir(path)
                    if f == MANIFEST or f.startswith("manifest.rank") or f.startswith("shard-")]
        if existing and not resume and not overwrite:
            raise StoreError(f"{path}: a store already exists here; pass resume=True to continue "
                             "its build or overwrite=True to replace it")
        if existing and overwrite and not resume:
            dist.barrier()
            if rank == 0:
                for f in existing:
                    os.remove(os.path.join(path, f))
            dist.barrier()
            return {}
        # temp files of killed writers are never complete
        for f in glob.glob(os.path.join(path, "*.tmp.*")):
            if rank == 0 or f".rank{rank}." in f:
                try:
                    os.remove(f)
                except FileNotFoundError:
                    pass
        entries: Dict[int, dict] = {}
        for mf in [MANIFEST] + sorted(f for f in existing if f.startswith("manifest.rank")
                                      and not ".tmp." in f):
            fp = os.path.join(path, mf)
            if not os.path.isfile(fp):
                continue
            try:
                with open(fp) as fh:
                    man = json.load(fh)
            except (OSError, ValueError):
                continue        # a torn manifest is never produced (atomic), but be lenient
            keys = ("model", "method", "layouts", "n_examples", "shard_size", "batch_size",
                    "dtype", "version")
            d = _diff({k: header.get(k) for k in keys}, {k: man.get(k) for k in keys})
            if d:
                raise StoreError(f"{path}: cannot resume: the existing store differs in {d}; "
                                 "pass overwrite=True (and resume=False) to replace it")
            for s in man.get("shards", []):
                fp2 = os.path.join(path, s["file"])
                if os.path.isfile(fp2) and os.path.getsize(fp2) == s["bytes"] and \
                        _sha256_file(fp2) == s["sha256"]:
                    entries[s["index"]] = s
        return entries


def _get(d, dotted):
    for k in dotted.split("."):
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and k.isdigit() and int(k) < len(d):
            d = d[int(k)]
        else:
            return None
    return d


# --------------------------------------------------------------------------- scoring engine
def _train_blocks(method, qstate, train, batch_size, chunk):
    """Yields ``(offset, scores [Q, B])`` blocks of this rank's part of the train side."""
    if isinstance(train, GradientStore):
        train.check(method)
        for i, s in enumerate(train.shards):
            if dist.mine(i):
                yield s["start"], method._shard_block(qstate, train, train.read_shard(i))
        return
    n = num_examples(train)
    # contiguous split across ranks, aligned to batches, then chunks bound the memory
    per = -(-n // dist.world())
    per = -(-per // batch_size) * batch_size
    lo, hi = min(n, dist.rank() * per), min(n, (dist.rank() + 1) * per)
    chunk = max(batch_size, chunk // batch_size * batch_size)
    for start in range(lo, hi, chunk):
        stop = min(hi, start + chunk)
        data = train if (start, stop) == (0, n) else subset(train, start, stop)
        yield start, method._direct_block(qstate, data, batch_size)


def pairwise(method, query, train, batch_size, qkw) -> torch.Tensor:
    qstate = method._query_state(query, batch_size, **qkw)
    n = num_examples(train)
    Q = method._n_query(qstate)
    out = torch.zeros(Q, n, dtype=torch.float32)
    blocks = [(o, b.float().cpu()) for o, b in
              _train_blocks(method, qstate, train, batch_size, chunk=max(n, 1))]
    for part in dist.all_gather_object(blocks):
        for o, b in part:
            out[:, o:o + b.shape[1]] = b
    return out


def _normalize_indices(train_indices, Q, n):
    if train_indices is None:
        return None
    if isinstance(train_indices, torch.Tensor):
        idx = train_indices.to(torch.int64).reshape(-1)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"train_indices: values must lie in [0, {n}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        m = torch.zeros(n, dtype=torch.bool)
        m[idx] = True
        return m[None]
    if isinstance(train_indices, Sequence):
        if len(train_indices) != Q:
            raise ValueError(f"train_indices: one index tensor per query expected ({Q}), got "
                             f"{len(train_indices)}")
        m = torch.zeros(Q, n, dtype=torch.bool)
        for q, t in enumerate(train_indices):
            t = torch.as_tensor(t, dtype=torch.int64).reshape(-1)
            if t.numel() and (t.min() < 0 or t.max() >= n):
                raise ValueError(f"train_indices[{q}]: values must lie in [0, {n})")
            m[q, t] = True
        return m
    raise TypeError("train_indices must be None, a tensor of indices, or a list of index tensors "
                    "(one per query)")


def top_influences(method, query, train, k, largest, train_indices, batch_size, qkw,
                   chunk: int = 4096):
    """``(values [Q, k], indices [Q, k])`` streamed over shards / chunks of ``train``.

    Memory: the query state, one shard (or chunk) of scores ``[Q, chunk]`` and the running
    top-k. Where a query has fewer than k candidates the tail is ``nan`` / index ``-1``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    qstate = method._query_state(query, batch_size, **qkw)
    Q = method._n_query(qstate)
    n = num_examples(train)
    allowed = _normalize_indices(train_indices, Q, n)     # bool [1|Q, n] (n bits, not n×Q scores)
    fill = float("-inf") if largest else float("inf")
    vals = torch.full((Q, 0), fill)
    idxs = torch.zeros((Q, 0), dtype=torch.int64)
    for off, block in _train_blocks(method, qstate, train, batch_size, chunk):
        block = block.float().cpu()
        B = block.shape[1]
        if allowed is not None:
            block = block.masked_fill(~allowed[:, off:off + B], fill)
        cand_v = torch.cat([vals, block], 1)
        cand_i = torch.cat([idxs, torch.arange(off, off + B).expand(Q, B)], 1)
        kk = min(k, cand_v.shape[1])
        vals, pos = torch.topk(cand_v, kk, dim=1, largest=largest)
        idxs = torch.gather(cand_i, 1, pos)
    parts = dist.all_gather_object((vals, idxs))
    if len(parts) > 1:
        vals = torch.cat([p[0] for p in parts], 1)
        idxs = torch.cat([p[1] for p in parts], 1)
        kk = min(k, vals.shape[1])
        vals, pos = torch.topk(vals, kk, dim=1, largest=largest)
        idxs = torch.gather(idxs, 1, pos)
    if vals.shape[1] < k:
        pad = k - vals.shape[1]
        vals = torch.cat([vals, torch.full((Q, pad), fill)], 1)
        idxs = torch.cat([idxs, torch.full((Q, pad), -1, dtype=torch.int64)], 1)
    invalid = torch.isinf(vals) & (vals == fill)
    vals = vals.masked_fill(invalid, float("nan"))
    idxs = idxs.masked_fill(invalid, -1)
    return vals, idxs


def self_scores_of(method, train, batch_size):
    """Self-influence from a store (precomputed) — None when ``train`` is not a store."""
    if isinstance(train, GradientStore):
        train.check(method)
        return train.self_scores()
    return None
