"""Appending benchmark rows to bench/results/*.csv (shared helper of the bench scripts)."""
from __future__ import annotations

import csv
import datetime
import os
import platform

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def append(name: str, rows: list, fields: list) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    new = not os.path.exists(path)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date"] + fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(dict(r, date=stamp))
    return path
