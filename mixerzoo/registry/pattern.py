"""The hybrid pattern grammar: ``"(gdn eviction_swa)*12"``, ``"gdn*3 nsa[block_count=8]"``.

pattern := item ((',' | whitespace) item)*
item    := atom ('*' INT)?
atom    := NAME ('[' key=value (',' key=value)* ']')?  |  '(' pattern ')'

A value is ``true``/``false``, ``none``, an int, a finite float, a quoted string (``'a, b'``) or a bare word.
Patterns are printable ASCII plus spaces, tabs and newlines.

Limits, each refused with a PatternError before any layer list is built:

- ``MAX_PATTERN_CHARS`` (10,000): characters in the pattern.
- ``MAX_LAYERS`` (4,096): layers in the expansion. Real stacks have tens of layers (a 1.4B LM has 24), so this
  leaves ample room while keeping a typo such as ``swa*100000`` from allocating for minutes. The size is
  computed from the parse tree, so a pattern over the limit is never expanded.
- ``MAX_REPEAT`` (= ``MAX_LAYERS``): a repeat count, checked on its digits before conversion, so a count of
  thousands of digits is refused at once.
- ``MAX_DEPTH`` (32): nesting depth of parentheses.
- ``MAX_OVERRIDES`` (64): ``key=value`` overrides on one atom.
- ``MAX_NAME_CHARS`` (64): characters in a mixer name or an override key.
- ``MAX_VALUE_CHARS`` (256): characters in an override value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "MAX_LAYERS",
    "MAX_NAME_CHARS",
    "MAX_OVERRIDES",
    "MAX_PATTERN_CHARS",
    "MAX_REPEAT",
    "MAX_VALUE_CHARS",
    "LayerSpec",
    "PatternError",
    "parse_pattern",
]

MAX_PATTERN_CHARS = 10_000
MAX_LAYERS = 4096
# A count above MAX_LAYERS always overflows the layer limit (every repeated item has at least one layer).
MAX_REPEAT = MAX_LAYERS
MAX_DEPTH = 32
MAX_OVERRIDES = 64
MAX_NAME_CHARS = 64
MAX_VALUE_CHARS = 256

_SPACE = " \t\n\r"
_DIGITS = "0123456789"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
# Characters of a long pattern shown either side of the caret; the whole of a short one is shown.
_CONTEXT = 60


def _shown(text: str) -> str:
    """``text`` with one printable column per character, so the caret line stays aligned."""
    return "".join(c if " " <= c <= "~" else (" " if c in _SPACE else "?") for c in text)


def _clip(text: str, keep: int = 24) -> str:
    """A short repr of user text for a message (a count or a name may be thousands of characters)."""
    return repr(text) if len(text) <= keep else f"{text[: keep // 2]!r}..."


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a parsed pattern: a mixer name and its per-layer config overrides."""

    name: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


class PatternError(ValueError):
    """A syntax error or an exceeded limit in a hybrid pattern; the message shows the column with a caret."""

    def __init__(self, pattern: str, col: int, msg: str):
        self.pattern, self.col = pattern, col
        lo, hi = 0, len(pattern)
        if hi > 2 * _CONTEXT:
            lo, hi = max(0, col - _CONTEXT), min(hi, col + _CONTEXT)
        head = "..." if lo > 0 else ""
        tail = "..." if hi < len(pattern) else ""
        line = head + _shown(pattern[lo:hi]) + tail
        super().__init__(f"{msg} at column {col + 1}\n  {line}\n  {' ' * (len(head) + col - lo)}^")


# The parse tree. Each node carries its expanded layer count, so the limit is checked before expansion.
@dataclasses.dataclass(frozen=True)
class _Leaf:
    layer: LayerSpec
    size: int = 1


@dataclasses.dataclass(frozen=True)
class _Seq:
    items: tuple[Any, ...]
    size: int


@dataclasses.dataclass(frozen=True)
class _Repeat:
    item: Any
    count: int
    size: int


def _expand(node: Any, out: list[LayerSpec]) -> None:
    if isinstance(node, _Leaf):
        out.append(node.layer)
    elif isinstance(node, _Seq):
        for item in node.items:
            _expand(item, out)
    else:
        start = len(out)
        _expand(node.item, out)
        out.extend(out[start:] * (node.count - 1))


class _Parser:
    def __init__(self, text: str):
        self.s, self.i, self.depth = text, 0, 0

    def error(self, msg: str, col: int | None = None) -> PatternError:
        return PatternError(self.s, self.i if col is None else col, msg)

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def found(self) -> str:
        return repr(self.peek()) if self.peek() else "end of pattern"

    def skip_space(self) -> None:
        while self.peek() in _SPACE and self.peek():
            self.i += 1

    def name(self, what: str) -> str:
        start = self.i
        while self.peek() in _NAME_CHARS:
            self.i += 1
        if start == self.i:
            expected = "a mixer name or '('" if what == "mixer name" else f"an {what}"
            raise self.error(f"expected {expected}, found {self.found()}")
        if self.i - start > MAX_NAME_CHARS:
            raise self.error(
                f"{what} {_clip(self.s[start : self.i])} is {self.i - start} characters long, "
                f"more than MAX_NAME_CHARS = {MAX_NAME_CHARS}",
                start,
            )
        return self.s[start : self.i]

    def integer(self) -> int:
        self.skip_space()
        start = self.i
        while self.peek() in _DIGITS and self.peek():
            self.i += 1
        if start == self.i:
            raise self.error(f"expected a repeat count after '*', found {self.found()}")
        text = self.s[start : self.i]
        # Compared as text first: int() of a huge digit string is slow, or refused beyond 4300 digits.
        digits = text.lstrip("0")
        if len(digits) > len(str(MAX_REPEAT)) or (digits and int(digits) > MAX_REPEAT):
            shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"
            raise self.error(f"repeat count {shown} is more than MAX_REPEAT = {MAX_REPEAT}", start)
        if not digits:
            raise self.error(f"repeat count must be >= 1, got {_clip(text)}", start)
        return int(digits)

    def value(self, key: str) -> Any:
        start = self.i
        quote = self.peek()
        if quote in ("'", '"'):
            end = self.s.find(quote, start + 1)
            if end < 0:
                raise self.error(f"unterminated string value for {key!r}: no closing {quote}", start)
            self.i = end + 1
            self.skip_space()
            if self.peek() not in (",", "]"):
                raise self.error(f"expected ',' or ']' after the value for {key!r}, found {self.found()}")
        else:
            while self.peek() and self.peek() not in ",]":
                self.i += 1
        text = self.s[start : self.i].rstrip(_SPACE)
        if not text:
            raise self.error(f"expected a value for {key!r}, found {self.found()}")
        if len(text) > MAX_VALUE_CHARS:
            raise self.error(
                f"value for {key!r} is {len(text)} characters long, more than MAX_VALUE_CHARS = {MAX_VALUE_CHARS}",
                start,
            )
        if quote in ("'", '"'):
            return text[1:-1]
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low == "none":
            return None
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return text
        if not math.isfinite(number):
            raise self.error(
                f"value for {key!r} is {_clip(text)}, which is not a finite number (quote it for a string)", start
            )
        return number

    def overrides(self, mixer: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self.i += 1  # '['
        while True:
            self.skip_space()
            key_col = self.i
            key = self.name("override key")
            if key in out:
                raise self.error(f"{key!r} given twice", key_col)
            if len(out) == MAX_OVERRIDES:
                raise self.error(
                    f"{mixer!r} has more than MAX_OVERRIDES = {MAX_OVERRIDES} overrides ({key!r} is the "
                    f"{MAX_OVERRIDES + 1}th)",
                    key_col,
                )
            self.skip_space()
            if self.peek() != "=":
                raise self.error(f"expected '=' after {key!r}, found {self.found()}")
            self.i += 1
            self.skip_space()
            out[key] = self.value(key)
            if self.peek() == ",":
                self.i += 1
                continue
            if self.peek() == "]":
                self.i += 1
                return out
            raise self.error("unclosed '[': expected ']'")

    def atom(self) -> Any:
        self.skip_space()
        if self.peek() == "(":
            open_col = self.i
            if self.depth == MAX_DEPTH:
                raise self.error(
                    f"this '(' opens nesting level {MAX_DEPTH + 1}, more than MAX_DEPTH = {MAX_DEPTH}", open_col
                )
            self.depth += 1
            self.i += 1
            node = self.pattern(closing=True)
            if self.peek() != ")":
                raise self.error("unbalanced '(': no matching ')'", open_col)
            self.i += 1
            self.depth -= 1
            return node
        name = self.name("mixer name")
        over = self.overrides(name) if self.peek() == "[" else {}
        return _Leaf(LayerSpec(name, over))

    def item(self) -> Any:
        node = self.atom()
        self.skip_space()
        if self.peek() == "*":
            self.i += 1
            self.skip_space()
            col = self.i
            count = self.integer()
            size = node.size * count
            if size > MAX_LAYERS:
                raise self.error(f"this repeat makes {size} layers, more than MAX_LAYERS = {MAX_LAYERS}", col)
            node = _Repeat(node, count, size)
            self.skip_space()
            if self.peek() == "*":
                raise self.error(
                    "a repeated item takes one '*': wrap it in parentheses to repeat it again, e.g. '(a*2)*3'"
                )
        return node

    def pattern(self, closing: bool = False) -> Any:
        items = [self.item()]
        size = items[0].size
        while True:
            self.skip_space()
            c = self.peek()
            if c == "":
                return _Seq(tuple(items), size)
            if c == ")":
                if closing:
                    return _Seq(tuple(items), size)
                raise self.error("unbalanced ')': no matching '('")
            if c == ",":
                self.i += 1
                self.skip_space()
            col = self.i
            items.append(self.item())
            size += items[-1].size
            if size > MAX_LAYERS:
                raise self.error(f"the pattern reaches {size} layers here, more than MAX_LAYERS = {MAX_LAYERS}", col)


def parse_pattern(pattern: str) -> list[LayerSpec]:
    """Parse a hybrid pattern into one LayerSpec per layer. Raises PatternError on bad syntax or a pattern
    over one of the module's limits (see the module docstring)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(
            pattern,
            MAX_PATTERN_CHARS,
            f"pattern is {len(pattern)} characters long, more than MAX_PATTERN_CHARS = {MAX_PATTERN_CHARS}",
        )
    for col, c in enumerate(pattern):
        if not (" " <= c <= "~" or c in _SPACE):
            raise PatternError(
                pattern,
                col,
                f"character {c!r} (U+{ord(c):04X}) is not allowed: patterns are printable ASCII, spaces, "
                "tabs and newlines",
            )
    if not pattern.strip(_SPACE):
        raise PatternError(pattern, 0, "empty pattern")
    layers: list[LayerSpec] = []
    _expand(_Parser(pattern).pattern(), layers)
    return layers
