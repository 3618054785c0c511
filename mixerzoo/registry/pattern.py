"""The hybrid pattern grammar: ``"(gdn eviction_swa)*12"``, ``"gdn*3 nsa[block_count=8]"``.

pattern := item ((',' | whitespace) item)*
item    := atom ('*' INT)?
atom    := NAME ('[' key=value (',' key=value)* ']')?  |  '(' pattern ')'
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["LayerSpec", "PatternError", "parse_pattern"]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a parsed pattern: a mixer name and its per-layer config overrides."""

    name: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


class PatternError(ValueError):
    """A syntax error in a hybrid pattern; the message shows the column with a caret."""

    def __init__(self, pattern: str, col: int, msg: str):
        self.pattern, self.col = pattern, col
        super().__init__(f"{msg} at column {col + 1}\n  {pattern}\n  {' ' * col}^")


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


class _Parser:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def error(self, msg: str, col: int | None = None) -> PatternError:
        return PatternError(self.s, self.i if col is None else col, msg)

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip_space(self) -> None:
        while self.peek().isspace():
            self.i += 1

    def name(self) -> str:
        start = self.i
        while self.peek() and (self.peek().isalnum() or self.peek() == "_"):
            self.i += 1
        if start == self.i:
            found = repr(self.peek()) if self.peek() else "end of pattern"
            raise self.error(f"expected a mixer name or '(', found {found}")
        return self.s[start : self.i]

    def integer(self) -> int:
        self.skip_space()
        start = self.i
        while self.peek().isdigit():
            self.i += 1
        if start == self.i:
            raise self.error("expected a repeat count after '*'")
        n = int(self.s[start : self.i])
        if n < 1:
            raise self.error("repeat count must be >= 1", start)
        return n

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self.i += 1  # '['
        while True:
            self.skip_space()
            key_col = self.i
            key = self.name()
            self.skip_space()
            if self.peek() != "=":
                raise self.error(f"expected '=' after {key!r}")
            self.i += 1
            self.skip_space()
            start = self.i
            while self.peek() and self.peek() not in ",]":
                self.i += 1
            text = self.s[start : self.i].strip()
            if not text:
                raise self.error(f"expected a value for {key!r}")
            if key in out:
                raise self.error(f"{key!r} given twice", key_col)
            out[key] = _value(text)
            if self.peek() == ",":
                self.i += 1
                continue
            if self.peek() == "]":
                self.i += 1
                return out
            raise self.error("unclosed '[': expected ']'")

    def atom(self) -> list[LayerSpec]:
        self.skip_space()
        if self.peek() == "(":
            open_col = self.i
            self.i += 1
            layers = self.pattern(closing=True)
            if self.peek() != ")":
                raise self.error("unbalanced '(': no matching ')'", open_col)
            self.i += 1
            return layers
        name = self.name()
        over = self.overrides() if self.peek() == "[" else {}
        return [LayerSpec(name, over)]

    def item(self) -> list[LayerSpec]:
        layers = self.atom()
        self.skip_space()
        if self.peek() == "*":
            self.i += 1
            layers = layers * self.integer()
        return layers

    def pattern(self, closing: bool = False) -> list[LayerSpec]:
        layers = self.item()
        while True:
            self.skip_space()
            c = self.peek()
            if c == ",":
                self.i += 1
                layers += self.item()
            elif c == "":
                return layers
            elif c == ")":
                if closing:
                    return layers
                raise self.error("unbalanced ')': no matching '('")
            else:
                layers += self.item()


def parse_pattern(pattern: str) -> list[LayerSpec]:
    """Parse a hybrid pattern into one LayerSpec per layer. Raises PatternError on bad syntax."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    if not pattern.strip():
        raise PatternError(pattern, 0, "empty pattern")
    return _Parser(pattern).pattern()
