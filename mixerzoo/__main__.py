"""``mixerzoo list`` and ``mixerzoo demo`` (the console script, or ``python -m mixerzoo``); see mixerzoo.cli."""

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
