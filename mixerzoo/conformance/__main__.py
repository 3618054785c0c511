"""python -m mixerzoo.conformance NAME [NAME ...] [--device cpu|cuda] [--checks a,b]"""

import argparse
import sys

from .. import registry
from . import ConformanceError, check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixerzoo.conformance", description=__doc__)
    p.add_argument("names", nargs="*", help="registered mixers (default: all)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--checks", default=None, help="comma-separated subset of checks")
    args = p.parse_args(argv)
    checks = args.checks.split(",") if args.checks else None
    failed = 0
    for name in args.names or registry.names():
        try:
            check(name, device=args.device, checks=checks, verbose=True)
        except ConformanceError as e:
            failed += 1
            print(e, file=sys.stderr)
        except (KeyError, ValueError) as e:  # an unknown mixer or check name: say so, no traceback
            print(f"python -m mixerzoo.conformance: {e.args[0]}", file=sys.stderr)
            return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
