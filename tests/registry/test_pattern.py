"""The hybrid pattern grammar (SPEC 3): layers, overrides, separators, nesting, and errors with a caret."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixerzoo.registry import LayerSpec, PatternError, parse_pattern


def names(pattern):
    return [layer.name for layer in parse_pattern(pattern)]


def test_alternating_repeat():
    layers = parse_pattern("(gdn eviction_swa)*12")
    assert len(layers) == 24
    assert [l.name for l in layers] == ["gdn", "eviction_swa"] * 12
    assert all(l.overrides == {} for l in layers)


def test_repeat_then_override():
    layers = parse_pattern("gdn*3 nsa[block_count=8]")
    assert layers == [LayerSpec("gdn")] * 3 + [LayerSpec("nsa", {"block_count": 8})]


@pytest.mark.parametrize(
    "pattern",
    ["gdn swa", "gdn,swa", "gdn, swa", "gdn ,swa", "  gdn\t\n swa  ", "gdn , swa", "(gdn)(swa)", "(gdn),(swa)"],
)
def test_separators(pattern):
    assert names(pattern) == ["gdn", "swa"]


def test_nesting_and_spaces_around_star():
    assert names("((a b)*2 c)*2") == ["a", "b", "a", "b", "c"] * 2
    assert names("( a ( b ) ) * 2") == ["a", "b"] * 2
    assert names("a * 3") == ["a"] * 3
    assert names("(((x)))") == ["x"]


def test_override_values_and_repeats():
    (layer,) = parse_pattern("swa[ window_size = 8 , theta=1e4, sink=true, cap=None, backend=sdpa, tag='a b', neg=-3 ]")
    assert layer.overrides == {
        "window_size": 8,
        "theta": 1e4,
        "sink": True,
        "cap": None,
        "backend": "sdpa",
        "tag": "a b",
        "neg": -3,
    }
    assert isinstance(layer.overrides["window_size"], int) and isinstance(layer.overrides["theta"], float)
    layers = parse_pattern("(gdn swa[window_size=8])*2")
    assert layers == [LayerSpec("gdn"), LayerSpec("swa", {"window_size": 8})] * 2


def caret_col(err: PatternError) -> int:
    """The column (0-based) the caret line points at, checked against ``err.col``."""
    _, pattern_line, caret_line = str(err).split("\n")
    assert pattern_line == "  " + err.pattern
    assert caret_line.strip() == "^"
    col = caret_line.index("^") - 2
    assert col == err.col
    assert f"at column {col + 1}" in str(err)
    return col


@pytest.mark.parametrize(
    "pattern,col,msg",
    [
        ("(gdn swa", 0, "unbalanced '\\('"),
        ("gdn (swa (gdn)*2", 4, "unbalanced '\\('"),
        ("gdn swa)", 7, "unbalanced '\\)'"),
        ("(gdn) swa))", 9, "unbalanced '\\)'"),
        ("gdn*", 4, "expected a repeat count"),
        ("gdn*x", 4, "expected a repeat count"),
        ("(gdn swa)* ", 11, "expected a repeat count"),
        ("gdn*0", 4, "repeat count must be >= 1"),
        ("swa[window_size]", 15, "expected '=' after 'window_size'"),
        ("swa[window_size=]", 16, "expected a value for 'window_size'"),
        ("swa[window_size=8", 17, "unclosed '\\['"),
        ("swa[a=1, a=2]", 9, "'a' given twice"),
        ("swa[=8]", 4, "expected a mixer name"),
        ("gdn,,swa", 4, "expected a mixer name or '\\(', found ','"),
        ("()", 1, "found '\\)'"),
        ("gdn swa-x", 7, "found '-'"),
        ("gdn,", 4, "found end of pattern"),
        ("", 0, "empty pattern"),
        ("   ", 0, "empty pattern"),
    ],
)
def test_errors_point_at_the_column(pattern, col, msg):
    with pytest.raises(PatternError, match=msg) as e:
        parse_pattern(pattern)
    assert isinstance(e.value, ValueError)
    assert caret_col(e.value) == col


def test_non_string_pattern():
    with pytest.raises(TypeError, match="pattern must be a str"):
        parse_pattern(["gdn"])


# --------------------------------------------------------------------------------------------------
# Property: random pattern trees render to text that parses back to the expected layers
# --------------------------------------------------------------------------------------------------

IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True)
WORD = st.from_regex(r"[a-z][a-z_]{0,6}", fullmatch=True).filter(
    lambda s: s not in ("true", "false", "none", "inf", "nan", "infinity")
)
VALUE = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    st.none(),
    WORD,
)
SEP = st.sampled_from([" ", ",", ", ", " ,", "\t", "\n ", "  ,  "])
PAD = st.sampled_from(["", " ", "  "])


def render_value(v):
    return repr(v) if isinstance(v, float) else str(v)


@st.composite
def leaf(draw):
    name = draw(IDENT)
    overrides = draw(st.dictionaries(IDENT, VALUE, max_size=3))
    text = name
    if overrides:
        parts = [f"{draw(PAD)}{k}{draw(PAD)}={draw(PAD)}{render_value(v)}{draw(PAD)}" for k, v in overrides.items()]
        text += "[" + ",".join(parts) + "]"
    return text, [LayerSpec(name, overrides)], False


def group(children):
    @st.composite
    def make(draw):
        items = draw(st.lists(children, min_size=1, max_size=3))
        text = items[0][0]
        layers = list(items[0][1])
        for t, l, _ in items[1:]:
            text += draw(SEP) + t
            layers += l
        return f"({draw(PAD)}{text}{draw(PAD)})", layers, False

    return make()


def repeated(children):
    @st.composite
    def make(draw):
        text, layers, is_repeat = draw(children)
        if is_repeat:  # the grammar repeats an atom, so "a*2*3" must be written "(a*2)*3"
            text = f"({text})"
        count = draw(st.integers(1, 3))
        return f"{text}{draw(PAD)}*{draw(PAD)}{count}", layers * count, True

    return make()


TREE = st.recursive(leaf(), lambda children: st.one_of(group(children), repeated(children)), max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(TREE, min_size=1, max_size=4), st.data())
def test_random_patterns_round_trip(items, data):
    text = items[0][0]
    expected = list(items[0][1])
    for t, l, _ in items[1:]:
        text += data.draw(SEP) + t
        expected += l
    text = data.draw(PAD) + text + data.draw(PAD)
    got = parse_pattern(text)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.name == e.name
        assert g.overrides.keys() == e.overrides.keys()
        for k, v in e.overrides.items():
            w = g.overrides[k]
            assert type(w) is type(v) and (w == v or (isinstance(v, float) and math.isclose(w, v))), (k, v, w)
