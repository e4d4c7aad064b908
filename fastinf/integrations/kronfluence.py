"""fastinf as a backend for Kronfluence users: EK-FAC from a Kronfluence ``Task`` or its factors.

* :func:`from_task` turns a Kronfluence ``Task`` (duck-typed: ``compute_train_loss(batch, model,
  sample)``, ``compute_measurement(batch, model)``, ``get_influence_tracked_modules()``,
  ``get_attention_mask(batch)``) into an unfitted :class:`fastinf.EKFAC`;
* :func:`load_factors` imports EK-FAC factors Kronfluence has fitted (its ``factors_<name>``
  directory of safetensors files) so that fastinf's kernels compute the scores.

Kronfluence need not be installed. Conventions are those of Kronfluence (token-averaged
covariances, example-averaged Λ, heuristic damping ``0.1·mean(Λ)``, scores not divided by n_train).

**Per-example losses from a summed loss.** A Kronfluence task returns the *sum* of the batch's
losses, while fastinf's ``loss_fn`` returns one loss per example. fastinf never differentiates
the per-example losses one by one: it differentiates their sum and reads each example's gradient
off the per-token output gradients of the tracked layers (examples do not interact in eval mode).
So any ``[B]`` tensor whose entries sum to the task's loss, with the task's autograd graph, gives
exactly the per-example gradients; the adapter returns ``loss / B`` repeated B times. The one
thing lost is attribution of a non-finite loss: the error names the batch, not the example.
"""
from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..capture import NonFiniteError
from ..data import batch_len
from ..ekfac import EKFAC

__all__ = ["from_task", "load_factors", "TaskEKFAC", "read_safetensors"]

# Kronfluence's factor file names (kronfluence/utils/constants.py).
ACTIVATION_EIGENVECTORS = "activation_eigenvectors"
GRADIENT_EIGENVECTORS = "gradient_eigenvectors"
ACTIVATION_EIGENVALUES = "activation_eigenvalues"
GRADIENT_EIGENVALUES = "gradient_eigenvalues"
LAMBDA_MATRIX = "lambda_matrix"
NUM_LAMBDA_PROCESSED = "num_lambda_processed"
FACTOR_ARGUMENTS = "factor_arguments.json"
FACTOR_PREFIX = "factors_"


class TaskEKFAC(EKFAC):
    """An :class:`fastinf.EKFAC` whose query side defaults to the task's measurement
    (``Task.compute_measurement``), as Kronfluence's pairwise scores do."""

    measurement_fn: Optional[Callable] = None

    def pairwise_scores(self, query, train, batch_size: int = 64, query_rank: Optional[int] = None,
                        measurement_fn: Optional[Callable] = None) -> torch.Tensor:
        return super().pairwise_scores(query, train, batch_size=batch_size, query_rank=query_rank,
                                       measurement_fn=measurement_fn or self.measurement_fn)


# ----------------------------------------------------------------------------- task adapters
def _is_task(obj) -> bool:
    return hasattr(obj, "compute_train_loss") and callable(obj.compute_train_loss)


def _spread(total, batch, what: str) -> torch.Tensor:
    """``[B]`` losses summing to the task's batch loss ``total`` (see the module doc)."""
    if not isinstance(total, torch.Tensor) or total.numel() != 1:
        raise ValueError(f"{what} must return a scalar tensor (the summed loss of the batch), got "
                         f"{getattr(total, 'shape', type(total).__name__)}")
    B = batch_len(batch)
    if B < 1:
        raise TypeError(f"{what}: cannot tell the batch size (the batch holds no tensor)")
    total = total.reshape(())
    if not bool(torch.isfinite(total.detach())):
        raise NonFiniteError(f"{what} returned a non-finite loss ({float(total.detach())}) for a "
                             f"batch of {B} examples; a Kronfluence task returns only the batch "
                             "sum, so the example cannot be named (score the batch's examples one "
                             "by one to find it)")
    return (total / B).expand(B)


def task_loss_fn(task, sample: bool = False) -> Callable:
    """fastinf ``loss_fn(model, batch) -> [B]`` from ``task.compute_train_loss``."""
    what = f"task.compute_train_loss(sample={sample})"

    def loss_fn(model, batch):
        return _spread(task.compute_train_loss(batch, model, sample=sample), batch, what)
    return loss_fn


def task_measurement_fn(task) -> Callable:
    """fastinf ``measurement_fn(model, batch) -> [B]`` from ``task.compute_measurement``."""
    def measurement_fn(model, batch):
        return _spread(task.compute_measurement(batch, model), batch, "task.compute_measurement")
    return measurement_fn


def task_token_mask_fn(task) -> Optional[Callable]:
    """fastinf ``token_mask_fn`` from ``task.get_attention_mask`` (None if the task has none).

    A batch without a mask gets a ``[B, 0]`` mask, which matches no layer's token count and so
    masks nothing. Per-module mask dicts are not supported (ValueError).
    """
    get = getattr(task, "get_attention_mask", None)
    if get is None:
        return None

    def token_mask_fn(batch):
        m = get(batch)
        if m is None:
            return torch.ones(max(batch_len(batch), 0), 0, dtype=torch.bool)
        if isinstance(m, dict):
            raise ValueError("task.get_attention_mask returned a dict of per-module masks; fastinf "
                             "takes one [B, T] mask (applied to every layer with T tokens)")
        if not isinstance(m, torch.Tensor) or m.dim() != 2:
            raise ValueError("task.get_attention_mask must return None or a [B, T] tensor, got "
                             f"{getattr(m, 'shape', type(m).__name__)}")
        return m != 0
    return token_mask_fn


def _task_kwargs(task, use_empirical_fisher: bool) -> dict:
    return dict(loss_fn=task_loss_fn(task, sample=False),
                fisher_loss_fn=None if use_empirical_fisher else task_loss_fn(task, sample=True),
                token_mask_fn=task_token_mask_fn(task))


def _task_modules(task):
    get = getattr(task, "get_influence_tracked_modules", None)
    return None if get is None else get()


def from_task(model: nn.Module, task, *, damping: Optional[float] = None,
              use_empirical_fisher: bool = False, progress: bool = True,
              modules=None) -> TaskEKFAC:
    """An unfitted :class:`fastinf.EKFAC` for a Kronfluence ``Task``.

    Args:
        model: the (un-prepared) model; do not pass Kronfluence's ``prepare_model`` output.
        task: a Kronfluence ``Task`` or any object with its methods (see the module doc).
        damping: None for the heuristic ``0.1·mean(Λ)`` per layer (Kronfluence's
            ``damping_factor=None``), or a float (Kronfluence's default is ``1e-8``).
        use_empirical_fisher: False (Kronfluence's default) fits the curvature on
            ``compute_train_loss(..., sample=True)`` (labels sampled from the model); True on the
            training loss itself.
        progress: tqdm bars.
        modules: overrides ``task.get_influence_tracked_modules()`` (None there: every
            Linear/Conv2d with a trainable weight).

    The training side of the scores differentiates ``compute_train_loss(sample=False)``, the query
    side ``compute_measurement`` (override per call with ``measurement_fn=``).
    """
    if not _is_task(task):
        raise TypeError(f"task must have compute_train_loss(batch, model, sample), got "
                        f"{type(task).__name__}")
    ek = TaskEKFAC(model, modules=modules if modules is not None else _task_modules(task),
                   damping=damping, progress=progress, **_task_kwargs(task, use_empirical_fisher))
    if hasattr(task, "compute_measurement"):
        ek.measurement_fn = task_measurement_fn(task)
    return ek


# ----------------------------------------------------------------------------- factor files
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> Dict[str, torch.Tensor]:
    """``{name: tensor}`` of a safetensors file (the ``safetensors`` package if installed, else a
    small reader of the format: 8-byte little-endian header size, JSON header, raw data)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    if load_file is not None:
        return load_file(str(path), device="cpu")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        b0, b1 = info["data_offsets"]
        buf = bytearray(data[b0:b1])
        t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def _factor_dir(path, factors_name: Optional[str]) -> Path:
    p = Path(path)
    if factors_name is not None:
        cand = [p / f"{FACTOR_PREFIX}{factors_name}", p / factors_name]
        # the Analyzer's output_dir holds <analysis_name>/factors_<name>
        cand += [d / f"{FACTOR_PREFIX}{factors_name}" for d in p.iterdir() if d.is_dir()] \
            if p.is_dir() else []
        for d in cand:
            if (d / f"{LAMBDA_MATRIX}.safetensors").exists():
                return d
        raise FileNotFoundError(f"load_factors: no Kronfluence factors named {factors_name!r} "
                                f"under {p}")
    if not (p / f"{LAMBDA_MATRIX}.safetensors").exists():
        parts = sorted(x.name for x in p.glob(f"{LAMBDA_MATRIX}_data_partition*")) if p.is_dir() else []
        hint = (f"; only partitioned files ({parts[0]}, ...) exist: aggregate them with "
                "Kronfluence first" if parts else
                "; pass the factors_<name> directory (e.g. output_dir/<analysis>/factors_<name>), "
                "fitted with strategy='ekfac'")
        raise FileNotFoundError(f"load_factors: {p / (LAMBDA_MATRIX + '.safetensors')} not found"
                                + hint)
    return p


def read_factors(factors_dir, factors_name: Optional[str] = None) -> "OrderedDict[str, dict]":
    """Kronfluence's EK-FAC factors as ``{module: dict(QA, QS, lam, eigA, eigS)}``, Λ averaged.

    Kronfluence stores Λ *summed* over examples next to ``num_lambda_processed`` (it divides at
    scoring time), and eigenvectors as the columns of ``[d, d]`` matrices (``torch.linalg.eigh``).
    """
    d = _factor_dir(factors_dir, factors_name)
    args_path = d / FACTOR_ARGUMENTS
    if args_path.exists():
        strategy = json.loads(args_path.read_text()).get("strategy", "ekfac")
        if str(strategy).lower() != "ekfac":
            raise ValueError(f"load_factors: the factors in {d} were fitted with strategy="
                             f"{strategy!r}; only 'ekfac' factors can be imported")
    files = {}
    for name in (ACTIVATION_EIGENVECTORS, GRADIENT_EIGENVECTORS, LAMBDA_MATRIX, NUM_LAMBDA_PROCESSED):
        f = d / f"{name}.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"load_factors: {f} not found (an EK-FAC fit writes it)")
        files[name] = read_safetensors(f)
    for name in (ACTIVATION_EIGENVALUES, GRADIENT_EIGENVALUES):
        f = d / f"{name}.safetensors"
        files[name] = read_safetensors(f) if f.exists() else {}
    out = OrderedDict()
    for mod, lam in files[LAMBDA_MATRIX].items():
        missing = [n for n in (ACTIVATION_EIGENVECTORS, GRADIENT_EIGENVECTORS, NUM_LAMBDA_PROCESSED)
                   if mod not in files[n]]
        if missing:
            raise ValueError(f"load_factors: module {mod!r} has a Λ but no {missing} in {d}")
        count = float(files[NUM_LAMBDA_PROCESSED][mod].double().sum())
        entry = dict(QA=files[ACTIVATION_EIGENVECTORS][mod], QS=files[GRADIENT_EIGENVECTORS][mod],
                     lam=lam.double() / max(count, 1.0), n=int(count))
        if mod in files[ACTIVATION_EIGENVALUES]:
            entry["eigA"] = files[ACTIVATION_EIGENVALUES][mod].double()
        if mod in files[GRADIENT_EIGENVALUES]:
            entry["eigS"] = files[GRADIENT_EIGENVALUES][mod].double()
        out[mod] = entry
    if not out:
        raise ValueError(f"load_factors: {d} holds no module factors")
    return out


def load_factors(factors_dir, model: nn.Module, task_or_loss_fn, *,
                 factors_name: Optional[str] = None, damping: Optional[float] = None,
                 measurement_fn: Optional[Callable] = None, progress: bool = True,
                 **kwargs) -> TaskEKFAC:
    """A fitted :class:`fastinf.EKFAC` from factors Kronfluence has fitted (strategy ``"ekfac"``).

    Args:
        factors_dir: Kronfluence's ``factors_<name>`` directory (``output_dir/<analysis_name>/
            factors_<name>``), or a parent of it together with ``factors_name``.
        model: the model the factors were fitted on (un-prepared: module names as in
            ``model.named_modules()``, which are Kronfluence's factor keys).
        task_or_loss_fn: a Kronfluence ``Task`` (train loss, measurement and attention masks
            are taken from it) or a fastinf ``loss_fn(model, batch) -> [B]``.
        damping: None for ``0.1·mean(Λ)`` per layer (Kronfluence's ``damping_factor=None``), or
            a float (pass your ``ScoreArguments.damping_factor``; Kronfluence's default is 1e-8).
        measurement_fn: the query side (default: the task's ``compute_measurement``, else the loss).
        kwargs: further :class:`fastinf.EKFAC` arguments (e.g. ``token_mask_fn``).
    """
    factors = read_factors(factors_dir, factors_name)
    named = dict(model.named_modules())
    for mod in factors:
        m = named.get(mod)
        if m is None:
            raise ValueError(f"load_factors: the model has no module {mod!r} that the Kronfluence "
                             "factors were fitted on")
        if hasattr(m, "original_module"):
            raise ValueError(f"load_factors: module {mod!r} is wrapped by Kronfluence "
                             f"({type(m).__name__}); pass the model before prepare_model()")
    if _is_task(task_or_loss_fn):
        task = task_or_loss_fn
        kw = _task_kwargs(task, use_empirical_fisher=True)  # the fit is done: Fisher unused
        kw.pop("fisher_loss_fn")
        if measurement_fn is None and hasattr(task, "compute_measurement"):
            measurement_fn = task_measurement_fn(task)
        if kwargs.get("token_mask_fn") is not None:
            kw.pop("token_mask_fn")
        kw.update(kwargs)
    elif callable(task_or_loss_fn):
        kw = dict(loss_fn=task_or_loss_fn, **kwargs)
    else:
        raise TypeError("task_or_loss_fn must be a Kronfluence Task (with compute_train_loss) or a "
                        f"fastinf loss_fn(model, batch) -> [B], got {type(task_or_loss_fn).__name__}")
    loss_fn = kw.pop("loss_fn")
    n_fit = max((f.pop("n") for f in factors.values()), default=0)
    ek = TaskEKFAC.from_factors(model, loss_fn, factors, n_fit=n_fit, damping=damping,
                                progress=progress, **kw)
    ek.measurement_fn = measurement_fn
    return ek
