"""The ``fastinf`` command line (also ``python -m fastinf``)."""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import __version__, backends, demo


def _info(args) -> int:
    print(f"fastinf {__version__}  |  torch {torch.__version__}  |  Python "
          f"{platform.python_version()}")
    print("backends:")
    for st in backends().values():
        print("  " + str(st))
    return 0


def _demo(args) -> int:
    report = demo.run(method=args.method, noise=args.noise, out=args.out, device=args.device,
                      seed=args.seed, progress=not args.quiet)
    print(demo.format_report(report, args.out))
    return 0


def _bench_dir():
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "bench" / "ops").is_dir():
            return root / "bench"
    raise FileNotFoundError("the benchmark scripts live in the bench/ folder of a fastinf source "
                            "checkout; run `fastinf bench` from the root of a clone")


def _bench(args) -> int:
    bench = _bench_dir()
    groups = {"ops": ["ops"], "peers": ["peers"], "all": ["ops", "peers"]}[args.which]
    failed = 0
    for g in groups:
        for script in sorted((bench / g).glob("[a-z]*.py")):
            print(f"=== {script.relative_to(bench.parent)}", flush=True)
            extra = ["--quick"] if args.quick and g == "ops" else []
            rc = subprocess.call([sys.executable, str(script), *extra], cwd=bench.parent)
            failed += rc != 0
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastinf", description="Fast TracIn and EK-FAC "
                                     "influence scores.")
    parser.add_argument("--version", action="version", version=f"fastinf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="version, torch version, usable backends and why others are not")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="influence on the bundled digits data: mislabel detection, "
                       "proponents/opponents, report.json and plots")
    p.add_argument("--method", default="both", help="ekfac, tracin or both (default)")
    p.add_argument("--noise", type=float, default=0.1, help="fraction of training labels flipped")
    p.add_argument("--out", default="fastinf_demo", help="output folder (default fastinf_demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)
    p = sub.add_parser("bench", help="run the benchmark scripts of bench/ and print their tables")
    p.add_argument("which", nargs="?", default="ops", choices=["ops", "peers", "all"])
    p.add_argument("--quick", action="store_true", help="small op grids (smoke run)")
    p.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"fastinf: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
