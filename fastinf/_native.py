"""Loading of the compiled module ``fastinf._C`` and the backend inventory.

The compiled module is torch-free (raw pointers, shapes and stream handles), so it loads with any
torch version. Everything here is cheap and cached; nothing imports triton until it is needed.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "torch", "cpu", "cpp", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def _load_C():
    try:
        return importlib.import_module("fastinf._C"), ""
    except Exception as exc:  # pragma: no cover - only on broken installs
        return None, f"{type(exc).__name__}: {exc}"


def native():
    """The compiled module, or None when it could not be loaded (see :func:`backends`)."""
    return _load_C()[0]


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_status():
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton not installed ({type(exc).__name__}); pip install 'fastinf[gpu]'"
    return True, f"triton {triton.__version__}"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.name:<10} {'yes' if self.available else 'no ':<4} {self.detail}"


class BackendReport(dict):
    """``{name: BackendStatus}``; prints as a table."""

    def __repr__(self) -> str:
        return "\n".join(str(s) for s in self.values())

    __str__ = __repr__


def backends() -> BackendReport:
    """Which backends are usable here and, for each missing one, why.

    Returns a dict ``name -> BackendStatus(name, available, detail)`` for ``reference``, ``torch``,
    ``cpu`` (C++ where measured faster, else torch), ``cpp`` (C++ forced), ``triton`` and
    ``cuda``; printing it gives a table.
    """
    rep = BackendReport()
    rep["reference"] = BackendStatus("reference", True, "pure torch, float64-capable, any device")
    rep["torch"] = BackendStatus("torch", True, f"best torch formulation, torch {torch.__version__}")
    C, err = _load_C()
    if C is None:
        why = f"compiled module fastinf._C failed to load: {err}"
        rep["cpu"], rep["cpp"] = BackendStatus("cpu", False, why), BackendStatus("cpp", False, why)
    else:
        omp = f"OpenMP, {C.num_threads()} threads" if C.openmp else "no OpenMP (1 thread)"
        rep["cpu"] = BackendStatus("cpu", True, "C++ kernels where measured faster, else torch")
        rep["cpp"] = BackendStatus("cpp", True, f"C++ kernels, forced ({omp})")
    gpu = torch.cuda.is_available()
    ok, why = _triton_status()
    if not ok:
        rep["triton"] = BackendStatus("triton", False, why)
    elif gpu:
        rep["triton"] = BackendStatus("triton", True, f"{why} on {torch.cuda.get_device_name()}")
    elif triton_interpret():
        rep["triton"] = BackendStatus("triton", True, f"{why}, interpreter on CPU (TRITON_INTERPRET=1)")
    else:
        rep["triton"] = BackendStatus("triton", False, f"{why} installed, but no GPU visible "
                                      "(set TRITON_INTERPRET=1 to run it on CPU tensors)")
    if C is None:
        rep["cuda"] = BackendStatus("cuda", False, "compiled module not loaded")
    elif not C.cuda_built:
        rep["cuda"] = BackendStatus("cuda", False, "not built (nvcc was not found at install time, "
                                    "or FASTINF_CUDA=off)")
    else:
        n, cerr = C.cuda_device_count()
        rt = C.cuda_runtime_version()
        rt_s = f"CUDA runtime {rt // 1000}.{rt % 1000 // 10}"
        if not gpu:
            rep["cuda"] = BackendStatus("cuda", False, f"built ({rt_s}), but no GPU visible "
                                        "(torch.cuda.is_available() is False)")
        elif n <= 0:
            # torch sees a GPU but our statically linked runtime cannot use it (old driver?)
            rep["cuda"] = BackendStatus("cuda", False, f"built ({rt_s}), but no GPU visible to "
                                        f"it: {cerr or 'no device'}; a driver for {rt_s} or "
                                        "newer is needed")
        else:
            rep["cuda"] = BackendStatus("cuda", True, f"{rt_s}, {n} device(s)")
    return rep


def available(name: str) -> bool:
    return name in BACKENDS and backends()[name].available
