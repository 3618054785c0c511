"""``python -m mixerzoo list`` and ``python -m mixerzoo demo``; see mixerzoo.cli."""

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
