"""Register / spill / shared-memory report of the CUDA kernels, from `nvcc -Xptxas -v` (no GPU needed).

Compiles every csrc/cuda/*.cu for one architecture with the CMakeLists flags (-O3 -lineinfo,
C++17) and parses ptxas' per-kernel lines into a CSV with columns
kernel,config,registers,spill_stores,spill_loads,smem (spills and smem in bytes).
`config` is the element type (float, __half, __nv_bfloat16) and, for the score engine, /mode.
Baseline of another commit: extract its csrc/ next to a copy of this script and run that copy
(the script compiles the csrc/ two levels above itself).
Exits non-zero when any kernel spills, so it can gate a change.
Usage: python bench/ops/ptxas_report.py [--arch sm_90] [--out bench/results/ptxas_sm90.csv]
"""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers.*?(?:, (\d+) bytes smem)?,")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def split_name(pretty):
    """'void fastinf::cuda::gram::gram_tiles<__half, 0>(...)' -> ('gram_tiles', '__half,0')."""
    head = pretty.replace("(anonymous namespace)::", "").split("(")[0].replace("void ", "")
    m = re.match(r"(.*?)<(.*)>$", head)
    name, targs = (m.group(1), m.group(2)) if m else (head, "")
    name = name.split("::")[-1]
    targs = targs.replace(" ", "").replace("(fastinf::cuda::gram::Mode)", "")
    if name == "gram_tiles":
        e, mode = targs.rsplit(",", 1)
        targs = f"{e}/{'factored' if mode in ('0', 'factored') else 'dense'}"
    return name, targs


def parse(text):
    rows, cur = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            cur = {"mangled": m.group(1), "spill_stores": 0, "spill_loads": 0}
        elif cur is not None and (m := SPILL.search(line)):
            cur["spill_stores"], cur["spill_loads"] = int(m.group(1)), int(m.group(2))
        elif cur is not None and "Used" in line and "registers" in line:
            cur["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(sm.group(1)) if sm else 0
            rows.append(cur)
            cur = None
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/ptxas_<arch>.csv)")
    ap.add_argument("--nvcc", default="nvcc")
    args = ap.parse_args()
    out = Path(args.out or ROOT / "bench" / "results" / f"ptxas_{args.arch.replace('_', '')}.csv")
    rows = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [args.nvcc, f"-arch={args.arch}", "-O3", "-lineinfo", "-std=c++17",
                   "-Xptxas", "-v", "-c", str(cu), "-I", str(ROOT / "csrc"), "-o",
                   str(Path(tmp) / "x.o")]
            res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{cu.name}: nvcc failed\n{res.stderr}")
        rows += [dict(r, file=cu.name) for r in parse(res.stderr)]
    names = demangle([r["mangled"] for r in rows])
    table = []
    for r in rows:
        kernel, config = split_name(names[r["mangled"]])
        table.append({"kernel": kernel, "config": config, "registers": r["registers"],
                      "spill_stores": r["spill_stores"], "spill_loads": r["spill_loads"],
                      "smem": r["smem"]})
    table.sort(key=lambda t: (t["kernel"], t["config"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    for t in table:
        print(",".join(str(v) for v in t.values()))
    print(f"wrote {out}")
    spilled = [t for t in table if t["spill_stores"] or t["spill_loads"]]
    if spilled:
        sys.exit(f"{len(spilled)} kernel configuration(s) spill registers")


if __name__ == "__main__":
    main()
