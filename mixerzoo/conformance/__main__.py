"""python -m mixerzoo.conformance [NAME ...] [--device cpu|cuda] [--checks a,b] [--import MODULE ...]"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import registry
from ..cli import add_import_argument, import_all
from . import CHECKS, check_device, report

PROG = "python -m mixerzoo.conformance"

EPILOG = """\
Each check prints ok, skip (with the reason it does not apply) or FAILED, and each mixer a summary line.

exit status:
  0  every check that ran passed (skipped checks included)
  1  a check failed (the failures are printed on stderr)
  2  usage error: an unknown mixer, check or device (or cuda without a CUDA device), or a failed --import

your own mixers: python -m mixerzoo.conformance --import my_mixers my_mixer   (or --import path/to/file.py)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run the conformance checks on registered mixers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="*", help="registered mixers or aliases (default: all)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--checks", default=None, help=f"comma-separated subset of checks: {', '.join(CHECKS)}")
    add_import_argument(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # every argument is checked before the first check runs: a typo fails in a second, not after an hour
    try:
        device = check_device(args.device)
    except ValueError as e:
        print(f"{PROG}: {str(e).removeprefix('conformance: ')}", file=sys.stderr)
        return 2
    if not import_all(args.imports, PROG):
        return 2
    try:
        names = [registry.spec(n).name for n in args.names] if args.names else registry.names()
        checks = [c.strip() for c in args.checks.split(",") if c.strip()] if args.checks else None
        unknown = sorted(set(checks or ()) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown check(s) {', '.join(unknown)}; available: {', '.join(CHECKS)}")
    except (KeyError, ValueError) as e:
        print(f"{PROG}: {e.args[0]}", file=sys.stderr)
        return 2
    failed = []
    for name in dict.fromkeys(names):
        rep = report(name, device=device, checks=checks, verbose=True)
        if rep.failures:
            failed.append(name)
            print(f"\n{rep.summary()}", file=sys.stderr)
            for key, message in rep.failures.items():
                print(f"  {key}: {message}", file=sys.stderr)
    if failed:
        print(f"{PROG}: checks failed for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
