"""Shared helpers of the benchmark scripts: timing, device names, CSV results.

Benchmarks measure their baselines in the same run and report ratios; results are appended to
``bench/results/<name>.csv`` with the device name so runs on different machines can be told apart.
"""
from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable, device: str, *, min_time: float = 0.2, max_reps: int = 50,
           warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    total = 0.0
    while len(times) < max_reps and (total < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return statistics.median(times)


def best_time(fn: Callable, reps: int = 3) -> float:
    """Fastest of ``reps`` timed calls after one warm-up (CUDA synchronised when present)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        sync("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        fn()
        sync("cuda" if torch.cuda.is_available() else "cpu")
        best = min(best, time.perf_counter() - t0)
    return best


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Returns the C heap's free memory to the OS (glibc ``malloc_trim``; elsewhere nothing), so
    the RSS growth of a block counts what it allocates, not only what the heap lacked: without it
    a block measured after a larger one showed 0 MiB (its memory came from the heap the earlier
    one freed)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or sampled RSS above the start on CPU
    (the C heap trimmed first, see :func:`_trim_heap`)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _trim_heap()
            self.base = _rss()
            self._stop = False
            self._max = self.base

            def watch():
                while not self._stop:
                    self._max = max(self._max, _rss())
                    time.sleep(0.002)
            self._t = threading.Thread(target=watch, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop = True
            self._t.join()
            self.peak = max(self._max, _rss()) - self.base


def timed(fn, device):
    """``(result, seconds, peak_bytes)`` of one call."""
    with PeakMemory(device) as pm:
        sync(str(device))
        t0 = time.perf_counter()
        out = fn()
        sync(str(device))
        dt = time.perf_counter() - t0
    return out, dt, pm.peak


def append_rows(name: str, rows: List[Dict]) -> Path:
    """Appends ``rows`` to ``bench/results/<name>.csv`` with a ``time`` column.

    Benchmarks of different ops share a file with different columns: when new columns appear,
    the file is rewritten with the union of the headers (earlier rows kept, new cells empty).
    """
    if not rows:
        return RESULTS / f"{name}.csv"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    new_fields = ["time"] + [k for r in rows for k in r]
    old_rows: List[Dict] = []
    fields: List[str] = []
    if path.exists():
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            old_rows = list(reader)
    union = fields + [f for f in dict.fromkeys(new_fields) if f not in fields]
    mode = "a" if union == fields else "w"
    with open(path, mode, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=union, extrasaction="ignore")
        if mode == "w":
            w.writeheader()
            w.writerows(old_rows)
        for r in rows:
            w.writerow({"time": stamp, **r})
    print(f"appended {len(rows)} rows to {path}")
    return path


def print_table(rows: List[Dict], cols: List[str]):
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def gemm_tflops(device: str, dtype=torch.bfloat16, n: int = 8192) -> float:
    """TFLOP/s of a square GEMM in ``dtype`` measured now on ``device`` (the roofline reference)."""
    if not device.startswith("cuda"):
        n = 1024
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timeit(lambda: a @ b, device)
    return 2 * n**3 / t / 1e12


def env_device(default: str = "cpu") -> str:
    return os.environ.get("FASTINF_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else default)
