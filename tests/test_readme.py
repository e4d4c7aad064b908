"""The README's Python examples run as written (in order, sharing one namespace)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    ns = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md[python block {i}]", "exec"), ns)
    assert ns["scores"].shape == (8, 200) and ns["approx"].shape == (8, 200)
    assert ns["self_inf"].shape == (200,) and torch.isfinite(ns["self_inf"]).all()
    assert ns["S"].shape == (1000, 8) and ns["S2"].shape == (1000, 8)
