"""``python -m mixerzoo demo --preset NAME``: the demo's model comes from a HybridLMConfig preset, flags replace
its settings."""

import pytest

from mixerzoo.cli import DEFAULT_PATTERN, build_parser, main
from mixerzoo.models import PRESETS

FAST = ["--prompt-len", "6", "--new-tokens", "3", "--no-compile"]


def _header(out):
    return out.split("\n\n", 1)[0]


def test_default_preset_is_demo():
    args = build_parser("mixerzoo").parse_args(["demo"])
    assert args.preset == "demo" and args.pattern is None and args.window_size is None
    assert DEFAULT_PATTERN == PRESETS["demo"].pattern


def test_demo_runs_the_tiny_preset(capsys):
    assert main(["demo", "--preset", "tiny", *FAST]) == 0
    head = _header(capsys.readouterr().out)
    assert "preset 'tiny', pattern '(gdn swa)*2', 4 layers, hidden 64, heads 4, 0.16M params" in head
    assert "defaults {'window_size': 16}" in head


def test_flags_replace_the_preset(capsys):
    assert main(["demo", "--preset", "tiny", "--hidden", "32", "--heads", "2", "--window-size", "8", *FAST]) == 0
    head = _header(capsys.readouterr().out)
    assert "hidden 32, heads 2" in head and "defaults {'window_size': 8}" in head
    # another pattern keeps only the preset defaults its layers take; --window-size 0: the mixers' own
    assert main(["demo", "--preset", "tiny", "--pattern", "gdn", *FAST]) == 0
    head = _header(capsys.readouterr().out)
    assert "pattern 'gdn', 1 layers" in head and "defaults" not in head
    assert main(["demo", "--preset", "tiny", "--pattern", "swa", "--window-size", "0", *FAST]) == 0
    assert "defaults" not in _header(capsys.readouterr().out)
    assert main(["demo", "--preset", "tiny", "--hidden", "0", *FAST]) == 2
    assert "hidden_size must be an int >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["demo", "--preset", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
