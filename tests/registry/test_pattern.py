"""The hybrid pattern grammar: layers, overrides, separators, nesting, limits, and errors with a caret."""

import math
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixerzoo.registry import LayerSpec, PatternError, parse_pattern
from mixerzoo.registry import pattern as grammar


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
    """The column (0-based) the caret line points at, checked against ``err.col``; for a short pattern."""
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
        ("swa[=8]", 4, "expected an override key, found '='"),
        ("swa[", 4, "expected an override key, found end of pattern"),
        ("swa[]", 4, "expected an override key, found '\\]'"),
        ("swa[a=1,]", 8, "expected an override key, found '\\]'"),
        ("swa[a", 5, "expected '=' after 'a', found end of pattern"),
        ("swa[a=", 6, "expected a value for 'a', found end of pattern"),
        ("swa[a=,b=1]", 6, "expected a value for 'a', found ','"),
        ("swa[a='x]", 6, "unterminated string value for 'a'"),
        ("swa[a='x' y]", 10, "expected ',' or '\\]' after the value for 'a', found 'y'"),
        ("swa[a=1, b=2, a=3]", 14, "'a' given twice"),
        ("gdn*2*3", 5, "a repeated item takes one '\\*'"),
        ("gdn*2 *3", 6, "a repeated item takes one '\\*'"),
        ("*3", 0, "expected a mixer name or '\\(', found '\\*'"),
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


def _check_round_trip(items, data):
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


@settings(max_examples=15, deadline=None)
@given(st.lists(TREE, min_size=1, max_size=4), st.data())
def test_random_patterns_round_trip(items, data):
    _check_round_trip(items, data)


@pytest.mark.slow  # 60 examples (3 s); the default run draws 15
@settings(max_examples=60, deadline=None)
@given(st.lists(TREE, min_size=1, max_size=4), st.data())
def test_random_patterns_round_trip_60_examples(items, data):
    _check_round_trip(items, data)


# --------------------------------------------------------------------------------------------------
# Limits: each refused with a PatternError that names the limit and the value seen, in milliseconds
# --------------------------------------------------------------------------------------------------


def refused(pattern: str, match: str) -> PatternError:
    """The error parse_pattern raises, which must come fast (milliseconds): the best of two timings is under
    0.5 s, so that one pause of a busy machine (a garbage collection) is not read as a slow parser."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        with pytest.raises(PatternError, match=match) as e:
            parse_pattern(pattern)
        times.append(time.perf_counter() - start)
        if times[-1] < 0.5:
            break
    assert min(times) < 0.5, f"refusing a {len(pattern)}-character pattern took {min(times):.3f} s (best of 2)"
    return e.value


def test_limits_are_the_documented_values():
    assert (grammar.MAX_LAYERS, grammar.MAX_REPEAT, grammar.MAX_DEPTH) == (4096, 4096, 32)
    assert (grammar.MAX_PATTERN_CHARS, grammar.MAX_OVERRIDES) == (10_000, 64)
    assert (grammar.MAX_NAME_CHARS, grammar.MAX_VALUE_CHARS) == (64, 256)
    for name in ("MAX_LAYERS", "MAX_REPEAT", "MAX_DEPTH", "MAX_PATTERN_CHARS", "MAX_OVERRIDES", "MAX_NAME_CHARS"):
        assert name in grammar.__doc__


@pytest.mark.parametrize(
    "pattern,col,seen",
    [
        ("(a*4096)*4096", 9, "16777216 layers"),
        ("(a b)*2049", 6, "4098 layers"),
        ("((a*64)*64)*2", 12, "8192 layers"),
        ("a*4096 b", 7, "reaches 4097 layers"),
        ("(a*2048, b*2048) (c)", 17, "reaches 4097 layers"),
        (" ".join(["(a b)*1024"] * 3), 22, "reaches 6144 layers"),
    ],
)
def test_layer_limit(pattern, col, seen):
    err = refused(pattern, "MAX_LAYERS = 4096")
    assert seen in str(err)
    assert caret_col(err) == col


def test_layer_limit_is_checked_before_expansion(monkeypatch):
    def expand(node, out):
        raise AssertionError("a pattern over MAX_LAYERS was expanded")

    monkeypatch.setattr(grammar, "_expand", expand)
    refused("((swa*4096)*4096)*4096", "MAX_LAYERS")
    refused("a " * 4097, "MAX_LAYERS")


def test_patterns_at_the_layer_limit_parse():
    assert names("a*4096") == ["a"] * 4096
    assert names("(a b)*2048") == ["a", "b"] * 2048
    assert names("((a*64)*32 b*2048)") == ["a"] * 2048 + ["b"] * 2048


@pytest.mark.parametrize(
    "count,seen",
    [
        ("4097", "repeat count 4097 "),
        ("100000", "repeat count 100000 "),
        ("1000000", "repeat count 1000000 "),
        ("9" * 20, f"repeat count {'9' * 20} "),
        ("9" * 9000, "repeat count 999999999999... (9000 digits)"),  # int() alone refuses > 4300 digits
        ("0" * 30 + "4097", "repeat count 000000000000... (34 digits)"),
    ],
)
def test_repeat_count_limit(count, seen):
    err = refused(f"swa*{count}", "MAX_REPEAT = 4096")
    assert seen in str(err)
    assert caret_col(err) == 4 if len(count) < 50 else err.col == 4


def test_repeat_counts_in_range():
    assert names("a*0004") == ["a"] * 4
    assert names("a*" + "0" * 5000 + "3") == ["a"] * 3
    refused("a*" + "0" * 5000, "repeat count must be >= 1")


def test_depth_limit():
    assert names("(" * 32 + "a" + ")" * 32) == ["a"]
    err = refused("(" * 33 + "a" + ")" * 33, "nesting level 33, more than MAX_DEPTH = 32")
    assert caret_col(err) == 32
    for depth in (340, 4000):  # a RecursionError before the limit
        err = refused("(" * depth + "a" + ")" * depth, "MAX_DEPTH = 32")
        assert err.col == 32


def test_pattern_length_limit():
    assert names(" " * 9_999 + "a") == ["a"]
    err = refused("a " * 5_001, "pattern is 10002 characters long, more than MAX_PATTERN_CHARS = 10000")
    assert err.col == 10_000
    err = refused("swa" * 10**7, "pattern is 30000000 characters long")
    assert len(str(err)) < 500


def test_override_count_limit():
    ok = "swa[" + ",".join(f"k{i}={i}" for i in range(64)) + "]"
    assert parse_pattern(ok)[0].overrides == {f"k{i}": i for i in range(64)}
    over = "swa[" + ",".join(f"k{i}={i}" for i in range(65)) + "]"
    err = refused(over, r"'swa' has more than MAX_OVERRIDES = 64 overrides \('k64' is the 65th\)")
    assert err.col == over.index("k64=")


def test_name_length_limit():
    assert names("a" * 64) == ["a" * 64]
    err = refused(
        "gdn " + "a" * 65, "mixer name 'aaaaaaaaaaaa'... is 65 characters long, more than MAX_NAME_CHARS = 64"
    )
    assert caret_col(err) == 4
    err = refused(
        "swa[" + "k" * 100 + "=1]", "override key 'kkkkkkkkkkkk'... is 100 characters long, more than MAX_NAME"
    )
    assert err.col == 4


def test_value_length_limit():
    (layer,) = parse_pattern("swa[tag=" + "v" * 256 + "]")
    assert layer.overrides == {"tag": "v" * 256}
    err = refused(
        "swa[tag=" + "v" * 257 + "]", "value for 'tag' is 257 characters long, more than MAX_VALUE_CHARS = 256"
    )
    assert err.col == 8
    refused("swa[tag='" + "v" * 300 + "']", "value for 'tag' is 302 characters long")
    refused("swa[n=" + "1" * 5000 + "]", "value for 'n' is 5000 characters long")


# --------------------------------------------------------------------------------------------------
# Odd input: every one a PatternError with a caret, never a raw Python error
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["nan", "NaN", "-nan", "inf", "-inf", "+Infinity", "1e400", "-1e999", "1_0e500"])
def test_non_finite_values_are_refused(text):
    err = refused(
        f"swa[window_size=4, theta={text}]", re.escape(f"value for 'theta' is '{text}', which is not a finite number")
    )
    assert caret_col(err) == 25


def test_quoted_values():
    (layer,) = parse_pattern("""swa[a='nan', b="inf", c='x, y]', d = "" , e='1']""")
    assert layer.overrides == {"a": "nan", "b": "inf", "c": "x, y]", "d": "", "e": "1"}
    assert parse_pattern("swa[theta=1e308]")[0].overrides == {"theta": 1e308}


@pytest.mark.parametrize(
    "pattern,col,char",
    [
        ("gdné", 3, "U\\+00E9"),
        ("gdn\x00swa", 3, "U\\+0000"),
        ("gdn\x1cswa", 3, "U\\+001C"),  # str.isspace() says True
        ("gdn\u2028swa", 3, "U\\+2028"),
        ("gdn*²", 4, "U\\+00B2"),  # str.isdigit() says True, int() refuses it
        ("gdn*١٢", 4, "U\\+0661"),  # int() takes these
        ("swa[tag=\U0001f600]", 8, "U\\+1F600"),
    ],
)
def test_non_ascii_and_control_characters(pattern, col, char):
    err = refused(pattern, f"{char}\\) is not allowed: patterns are printable ASCII")
    _, shown, caret = str(err).split("\n")
    assert caret.index("^") == 2 + col
    assert shown[2 + col] == "?" and shown.isascii() and shown.isprintable()


def test_caret_stays_aligned_in_multiline_patterns():
    err = refused("gdn\n\t(swa\r\n", "unbalanced '\\('")
    assert err.col == 5
    _, shown, caret = str(err).split("\n")
    assert shown == "  gdn  (swa  " and caret.index("^") == 2 + 5


def test_long_patterns_show_an_excerpt_around_the_caret():
    pattern = "a " * 2000 + "-" + " b" * 2000
    err = refused(pattern, "found '-' at column 4001\n")
    assert err.pattern == pattern and err.col == 4000
    _, shown, caret = str(err).split("\n")
    assert shown.startswith("  ...") and shown.endswith("...") and len(shown) < 200
    assert shown[caret.index("^")] == "-"


# --------------------------------------------------------------------------------------------------
# Fuzz: any string over the grammar's alphabet parses or raises PatternError, fast
# --------------------------------------------------------------------------------------------------

CHARS = st.text(st.sampled_from(list("ab_09 *()[]=,'\"\t\n.-+e") + ["é", "\x00", "²"]), max_size=80)
TOKENS = st.lists(
    st.sampled_from(
        ["gdn", "swa", "(", ")", "*", "2", "64", "4096", "9" * 30, "[", "]", "k=", "v", "1e400", "nan", ",", " "]
    ),
    max_size=40,
).map("".join)


def _check_fuzz(text):
    start = time.perf_counter()
    try:
        layers = parse_pattern(text)
    except PatternError as e:
        assert 0 <= e.col <= len(text) and e.pattern == text
        assert len(str(e).split("\n")) == 3
    else:
        assert 1 <= len(layers) <= grammar.MAX_LAYERS
        assert all(isinstance(layer, LayerSpec) and layer.name.isascii() for layer in layers)
    # no input makes the parser blow up (a pathological one would take minutes); the bound leaves room for a
    # loaded machine: 0.5 s failed once there on an input that parses in microseconds
    assert time.perf_counter() - start < 5.0


@settings(max_examples=100, deadline=None)
@given(st.one_of(CHARS, TOKENS))
def test_fuzz_parses_or_raises_pattern_error(text):
    _check_fuzz(text)


@pytest.mark.slow  # 300 examples; the default run draws 100
@settings(max_examples=300, deadline=None)
@given(st.one_of(CHARS, TOKENS))
def test_fuzz_parses_or_raises_pattern_error_300_examples(text):
    _check_fuzz(text)
