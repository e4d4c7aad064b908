"""Gradient store on disk: format, atomic and resumable writes, verified reads.

The training-set gradient pass done once, kept on disk, queried many times.

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
A build holds ``build.lock`` (pid, host, start time; :func:`build_lock`), so two builds of one
store never run at once. Reading needs no lock and works in read-only directories.

This module is the file format and its IO only: what goes into a shard comes from
:mod:`fastinf.layers` (encoding) and :mod:`fastinf.scoring` (the build loop, which defines the
public :class:`fastinf.GradientStore` with ``build``). Scale-out: under ``torch.distributed``
see :mod:`fastinf.distributed`.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import socket
import time
from typing import Dict, Optional

import safetensors.torch
import torch

from . import distributed as dist

FORMAT = "fastinf.store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = "build.lock"

__all__ = ["Store", "StoreWriter", "StoreError", "hash_state", "build_lock"]


class StoreError(ValueError):
    """A store is missing, corrupt, incomplete, or does not match the model / method."""


def hash_state(sd: Dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors (sorted)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            continue
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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


def _get(d, dotted):
    for k in dotted.split("."):
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and k.isdigit() and int(k) < len(d):
            d = d[int(k)]
        else:
            return None
    return d


# --------------------------------------------------------------------------- build lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's live process
        return True
    return True


def _read_lock(fp: str) -> dict:
    try:
        with open(fp) as fh:
            d = json.load(fh)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}                # torn by a kill between create and write: stale


def _take_lock(path: str, recover: bool) -> str:
    """Creates ``path/build.lock`` (pid, host, start time) exclusively; returns its content.

    A lock held by a live build (or by a process on another host, which cannot be checked) is a
    :class:`StoreError` naming the holder; a stale one (its pid no longer runs on this host) is
    replaced when ``recover``, else an error saying to pass ``resume=True``."""
    fp = os.path.join(path, LOCK)
    host = socket.gethostname()
    mine = json.dumps({"pid": os.getpid(), "host": host,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    for _ in range(3):
        try:
            fd = os.open(fp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(fp)
            pid, where = held.get("pid"), held.get("host")
            since = f" since {held['started']}" if held.get("started") else ""
            if where is not None and (where != host or (isinstance(pid, int) and _pid_alive(pid))):
                raise StoreError(f"{path}: the store is being built by pid {pid} on host "
                                 f"{where}{since}; wait for that build to finish (if it is dead, "
                                 f"delete {fp} and resume)")
            if not recover:
                raise StoreError(f"{path}: a build of this store (pid {pid} on host {where}"
                                 f"{since}) no longer runs and left its lock {fp}; pass "
                                 "resume=True to recover it and continue the build (or "
                                 "overwrite=True to replace it)")
            with contextlib.suppress(FileNotFoundError):
                os.remove(fp)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(mine)
            fh.flush()
            os.fsync(fh.fileno())
        return mine
    raise StoreError(f"{path}: could not take the build lock {fp}: another build keeps taking it")


def _cannot_write(path: str, exc: OSError) -> StoreError:
    return StoreError(f"{path}: cannot write a store here: {exc.strerror or exc}"
                      + (f" ({exc.filename})" if exc.filename and exc.filename != path else ""))


@contextlib.contextmanager
def build_lock(path, recover: bool):
    """Held for the whole build of the store at ``path``: creates the directory, checks that it
    is writable (before any gradient pass) and takes ``build.lock``. Under ``torch.distributed``
    rank 0 holds the lock for all ranks of the build and every rank checks it can write."""
    path = os.fspath(path)
    err, held = None, None
    try:
        os.makedirs(path, exist_ok=True)
        if dist.rank() == 0:
            held = _take_lock(path, recover)
        else:
            probe = os.path.join(path, f".probe.rank{dist.rank()}.{os.getpid()}")
            os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644))
            os.remove(probe)
    except StoreError as exc:
        err = str(exc)
    except OSError as exc:
        err = str(_cannot_write(path, exc))
    errs = [e for e in dist.all_gather_object(err) if e]
    try:
        if errs:
            raise StoreError(errs[0])
        yield
    finally:
        fp = os.path.join(path, LOCK)
        if held is not None and _read_lock(fp) == json.loads(held):
            with contextlib.suppress(FileNotFoundError):
                os.remove(fp)


# --------------------------------------------------------------------------- reading
class Store:
    """A read-only view of a built store (see the module doc); :class:`fastinf.GradientStore`
    adds ``build`` and ``check(method)``. Use ``open``."""

    def __init__(self, path: str, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.shards = manifest["shards"]
        self.layouts = manifest["layouts"]

    def __len__(self) -> int:
        return int(self.manifest["n_examples"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, {len(self)} examples, "
                f"{len(self.shards)} shards, method={self.manifest['method'].get('kind')})")

    @property
    def nbytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.shards)

    @classmethod
    def open(cls, path, *, verify: bool = True):
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
        s = self.shards[i]
        fp = os.path.join(self.path, s["file"])
        try:
            with open(fp, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise StoreError(f"{self.path}: shard {s['file']} cannot be read: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise StoreError(f"{self.path}: shard {s['file']} fails its sha256 checksum: corrupt")
        t = safetensors.torch.load(data)
        if device is not None:
            t = {k: v.to(device) for k, v in t.items()}
        return t

    def self_scores(self) -> torch.Tensor:
        """``[n]`` float32 self-influence, precomputed at build time (CPU)."""
        return torch.cat([self.read_shard(i)["self"] for i in range(len(self.shards))]).float()

    def check_match(self, model: dict, method: dict) -> None:
        """Raises :class:`StoreError` naming the first difference between the store's model
        fingerprint / method settings and the ones given (as written by :class:`StoreWriter`)."""
        d = _diff(self.manifest["model"], model)
        if d:
            what = "the model's weights differ" if d == "weights_sha256" else \
                f"the tracked modules differ ({d})"
            raise StoreError(f"{self.path}: the store was built with a different model: {what}")
        if self.manifest["method"].get("kind") != method.get("kind"):
            raise StoreError(f"{self.path}: the store was built for method kind "
                             f"{self.manifest['method'].get('kind')!r}, not {method['kind']!r}")
        d = _diff(self.manifest["method"], method)
        if d:
            raise StoreError(f"{self.path}: the store was built with different method settings: "
                             f"{d} is {_get(self.manifest['method'], d)!r} in the store, "
                             f"{_get(method, d)!r} now")


# --------------------------------------------------------------------------- writing
class StoreWriter:
    """Writes the shards and the manifest of a store, atomically and resumably.

    Under ``torch.distributed`` every rank creates one writer for the same store and writes the
    shards ``i % world == rank`` (recording them in ``manifest.rank<r>.json``); :meth:`finish`
    has rank 0 merge them into ``manifest.json``. ``done`` maps the indices of the shards
    already built and verified (resume) to their manifest entries.
    """

    def __init__(self, path, *, model: dict, method: dict, layouts: Dict[str, str],
                 dtype: torch.dtype, n_examples: int, shard_size: int, batch_size: int,
                 resume: bool, overwrite: bool):
        self.path = os.fspath(path)
        self.rank, self.world = dist.rank(), dist.world()
        self.header = dict(format=FORMAT, version=VERSION, model=model, method=method,
                           layouts=layouts, dtype=str(dtype).replace("torch.", ""),
                           n_examples=n_examples, shard_size=shard_size, batch_size=batch_size)
        if self.rank == 0:
            os.makedirs(self.path, exist_ok=True)
        dist.barrier()
        self.done = self._prepare(resume, overwrite)
        dist.barrier()
        self._partial = MANIFEST if self.world == 1 else f"manifest.rank{self.rank}.json"

    def write(self, i: int, start: int, stop: int, tensors: Dict[str, torch.Tensor]) -> None:
        """Writes shard ``i`` (examples ``[start, stop)``) and records it in the manifest."""
        # no metadata: safetensors writes its map in hash order, which would make the bytes of
        # a resumed build differ from an uninterrupted one
        data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
        _write_atomic(os.path.join(self.path, shard_name(i)), data, kill_point=f"mid:{i}")
        _maybe_kill(f"shard:{i}")
        self.done[i] = dict(index=i, file=shard_name(i), start=start, stop=stop,
                            bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        mine = [self.done[j] for j in sorted(self.done)
                if self.world == 1 or j % self.world == self.rank]
        self._write_manifest(self._partial, dict(self.header, shards=mine, complete=False))
        _maybe_kill(f"manifest:{i}")

    def finish(self, n_shards: int) -> None:
        """After every rank wrote its shards: the complete manifest (rank 0)."""
        dist.barrier()
        if self.rank == 0:
            allshards = dict(self.done)
            for r in range(1, self.world):
                with open(os.path.join(self.path, f"manifest.rank{r}.json")) as fh:
                    for s in json.load(fh)["shards"]:
                        allshards[s["index"]] = s
            shards = [allshards[i] for i in range(n_shards)]
            self._write_manifest(MANIFEST, dict(self.header, shards=shards, complete=True))
            for r in range(self.world if self.world > 1 else 0):
                try:
                    os.remove(os.path.join(self.path, f"manifest.rank{r}.json"))
                except FileNotFoundError:
                    pass
        dist.barrier()

    def _write_manifest(self, name, man):
        _write_atomic(os.path.join(self.path, name),
                      json.dumps(man, indent=1, sort_keys=True).encode())

    def _prepare(self, resume, overwrite) -> Dict[int, dict]:
        """Verified shards already built (resume), after clearing what cannot be reused."""
        path, rank = self.path, self.rank
        existing = [f for f in os.listdir(path)
                    if f == MANIFEST or f.startswith("manifest.rank") or f.startswith("shard-")]
        if existing and not resume and not overwrite:
            raise StoreError(f"{path}: a store already exists here; pass resume=True to continue "
                             "its build or overwrite=True to replace it")
        if existing and overwrite:
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
                                      and ".tmp." not in f):
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
            d = _diff({k: self.header.get(k) for k in keys}, {k: man.get(k) for k in keys})
            if d:
                raise StoreError(f"{path}: cannot resume: the existing store differs in {d}; "
                                 "pass overwrite=True to replace it")
            for s in man.get("shards", []):
                fp2 = os.path.join(path, s["file"])
                if os.path.isfile(fp2) and os.path.getsize(fp2) == s["bytes"] and \
                        _sha256_file(fp2) == s["sha256"]:
                    entries[s["index"]] = s
        return entries
