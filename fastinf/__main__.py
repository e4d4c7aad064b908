"""The ``fastinf`` command line (also ``python -m fastinf``)."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import platform

    import torch

    import fastinf

    print(f"fastinf {fastinf.__version__}  |  torch {torch.__version__}  |  Python "
          f"{platform.python_version()}")
    print("backends:")
    for st in fastinf.backends().values():
        print("  " + str(st))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastinf", description="Fast TracIn and EK-FAC "
                                     "influence scores.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="version, torch version, usable backends and why others are not")
    p.set_defaults(func=_info)
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
