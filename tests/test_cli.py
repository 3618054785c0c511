"""``python -m mixerzoo list`` and ``python -m mixerzoo demo``."""

import dataclasses
import io
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from mixerzoo import registry
from mixerzoo.cli import DEFAULT_PATTERN, Progress, default_prog, format_table, main
from mixerzoo.mixers.base import MixerConfig, State, TokenMixer, positions_and_pad, state_dataclass, state_field

REAL = [n for n in registry.names() if not n.startswith("_")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class DecayConfig(MixerConfig):
    """_cli_decay settings.

    decay: weight of the previous average, in [0, 1].
    """

    decay: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        self.check_float("decay", low=0.0, high=1.0)


@state_dataclass
class DecayState(State):
    h: torch.Tensor = state_field()  # [B, D] float32 running average


@registry.register("_cli_decay", config=DecayConfig)
class Decay(TokenMixer):
    """Exponential moving average of the valid inputs, h_t = decay * h_{t-1} + (1 - decay) * x_t, then a map."""

    state_class = DecayState

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None, max_seqlen=None):
        return DecayState(
            seen=torch.zeros((), dtype=torch.long, device=device),
            pad=torch.zeros(batch_size, dtype=torch.long, device=device),
            h=torch.zeros(batch_size, self.config.hidden_size, dtype=torch.float32, device=device),
        )

    def mix(self, x, state, attention_mask):
        _, _, valid = positions_and_pad(x, state, attention_mask)
        a = self.config.decay
        h = state.h if state is not None else x.new_zeros(x.shape[0], x.shape[2], dtype=torch.float32)
        ys = []
        for t in range(x.shape[1]):  # T is static: unrolled under torch.compile
            upd = a * h + (1 - a) * x[:, t].float()
            h = torch.where(valid[:, t, None], upd, h)
            ys.append(h)
        if state is not None:
            state.h.copy_(h)
            state.seen.add_(x.shape[1])
        return self.proj(torch.stack(ys, 1).to(x.dtype)), state


def test_format_table():
    text = format_table(["name", "n"], [["a", 1], ["bbb", 22]], footer=["total", 23])
    assert text.split("\n") == [
        "name    n",
        "-----  --",
        "a       1",
        "bbb    22",
        "-----  --",
        "total  23",
    ]


def test_progress_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = Progress(4, "decode", unit="tok", file=out)
    bar.min_interval = 0.0
    for i in range(1, 5):
        bar.update(i)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n")
    assert "decode [" in text and "4/4" in text and "tok/s" in text
    log = io.StringIO()  # not a terminal: only the final line
    with Progress(3, "x", file=log) as bar:
        for i in range(1, 4):
            bar.update(i)
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue() and "3/3" in log.getvalue()
    log = io.StringIO()  # a long run, not on a terminal: a line every log_interval seconds, then the final one
    with Progress(3, "x", file=log) as bar:
        bar.log_interval = 0.0
        for i in range(1, 4):
            bar.update(i)
    lines = log.getvalue().splitlines()
    assert [line.split("] ")[1].split()[0] for line in lines] == ["1/3", "2/3", "3/3"], lines


def test_list_in_process(capsys):
    assert main(["list", "--fields"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:4] == ["mixer", "aliases", "state", "decode"]
    assert any(line.startswith("_cli_decay ") and " constant " in line for line in out.splitlines())
    for name in REAL:
        assert f"\n{name} " in out


def _field_lines(out: str, name: str) -> dict[str, str]:
    """The ``--fields`` block of one mixer: {'field=default' or 'field (required)': meaning}."""
    block = out.split(f"\n{name} (", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in block)


def test_list_fields_shows_defaults_and_meanings(capsys):
    assert main(["list", "--fields"]) == 0
    out = capsys.readouterr().out
    assert f"\n_cli_decay ({__name__}.DecayConfig):\n" in out
    fields = _field_lines(out, "_cli_decay")
    assert fields == {
        "hidden_size (required)": "model width D, the last dim of x.",
        "num_heads=None": fields["num_heads=None"],
        "decay=0.9": "weight of the previous average, in [0, 1].",
    }
    assert fields["num_heads=None"].startswith("attention or state heads")
    if "eviction_swa" in REAL:
        fields = _field_lines(out, "eviction_swa")
        assert fields["capacity=512"].startswith("C, buffer slots per KV head")
        assert fields["window_size=512"].startswith("W, query t sees keys")


def test_prog_names_the_console_script(monkeypatch, capsys):
    assert default_prog("/usr/local/bin/mixerzoo") == "mixerzoo"
    assert default_prog("C:\\Python\\Scripts\\mixerzoo.exe".replace("\\", "/")) == "mixerzoo"
    assert default_prog("/src/mixerzoo/__main__.py") == "python -m mixerzoo"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mixerzoo", "--help"])  # as the installed script runs
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: mixerzoo ")
    assert "exit status: 0 success" in out and "2 usage error" in out
    monkeypatch.setattr(sys, "argv", ["/src/mixerzoo/__main__.py", "list", "--bogus"])  # python -m mixerzoo
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and capsys.readouterr().err.startswith("usage: python -m mixerzoo ")


def test_list_and_demo_import_user_modules(tmp_path, capsys):
    path = tmp_path / "_cli_user_mixers.py"
    path.write_text(
        textwrap.dedent(
            """
            import dataclasses
            from mixerzoo import MixerConfig, TokenMixer, register


            @dataclasses.dataclass(frozen=True)
            class IdConfig(MixerConfig):
                \"\"\"scale: factor on the input.\"\"\"

                scale: float = 2.0


            @register("_cli_user_id", config=IdConfig)
            class Id(TokenMixer):
                supports_decode = False

                def mix(self, x, state, attention_mask):
                    return x * self.config.scale, None
            """
        )
    )
    try:
        assert main(["list", "--fields", "--import", str(path)]) == 0
        out = capsys.readouterr().out
        assert "\n_cli_user_id " in out and _field_lines(out, "_cli_user_id")["scale=2.0"] == "factor on the input."
    finally:
        sys.modules.pop("_cli_user_mixers", None)
    assert main(["list", "--import", "_cli_no_such_module"]) == 2
    err = capsys.readouterr().err
    assert "--import _cli_no_such_module failed: ModuleNotFoundError: No module named '_cli_no_such_module'" in err
    broken = tmp_path / "_cli_broken.py"
    broken.write_text("import torch\n\nraise ValueError('a bug on line 3')\n")
    assert main(["demo", "--import", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "--import " + str(broken) + " failed: ValueError: a bug on line 3" in err
    assert "line 3, in <module>" in err  # the traceback shows where in the user's file


@pytest.mark.slow
def test_installed_plugin_is_listed_and_a_broken_one_named(tmp_path):
    """End to end, in a fresh interpreter: an installed distribution's entry points load on the registry's
    first lookup; one that fails to import is named with its error, and the rest of the library works."""
    info = tmp_path / "cli_fake_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cli-fake-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[mixerzoo.mixers]\n_cli_plugin = _cli_plugin_mod\n_cli_broken = _cli_broken_mod\n"
    )
    (tmp_path / "_cli_plugin_mod.py").write_text(
        "import dataclasses\n"
        "from mixerzoo import MixerConfig, TokenMixer, register\n\n\n"
        "@dataclasses.dataclass(frozen=True)\nclass C(MixerConfig):\n    pass\n\n\n"
        "@register('_cli_plugin', config=C)\nclass M(TokenMixer):\n    supports_decode = False\n"
    )
    (tmp_path / "_cli_broken_mod.py").write_text("import _cli_missing_dependency\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    proc = subprocess.run(
        [sys.executable, "-m", "mixerzoo", "list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "\n_cli_plugin " in proc.stdout and "\nswa " in proc.stdout
    assert "RuntimeWarning" in proc.stderr
    assert "'_cli_broken' = '_cli_broken_mod' of the distribution cli-fake-plugins 0.1 failed to import" in proc.stderr
    assert "No module named '_cli_missing_dependency'" in proc.stderr


@pytest.mark.slow
def test_python_m_mixerzoo_list():
    proc = subprocess.run(
        [sys.executable, "-m", "mixerzoo", "list"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    if not REAL:
        assert proc.stdout == "no mixers registered\n"
        return
    assert proc.stdout.splitlines()[0].split()[:2] == ["mixer", "aliases"]
    for name in REAL:
        assert f"\n{name} " in proc.stdout


@pytest.mark.slow
def test_demo_toy_compiled(capsys):
    rc = main(
        [
            "demo",
            "--pattern",
            "_cli_decay*2",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--prompt-len",
            "9",
            "--new-tokens",
            "12",
            "--vocab",
            "50",
            "--batch",
            "2",
            "--backend",
            "aot_eager",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = captured.out
    assert "torch.compile(fullgraph=True, backend='aot_eager')" in out
    # each parameter count says what it counts: 2 mixers of 32*32, MLPs and norms, a 50x32 tied embedding
    assert "M params in all (mixers 0.00M, MLPs and norms 0.02M, embedding 0.00M, tied to the output head)" in out
    assert re.search(r"^layer\s+mixer\s+state\s+mixer params\s+state bytes", out, re.M)
    assert re.search(r"^total\s+2048\s", out, re.M)
    layer_lines = [l for l in out.splitlines() if l.split()[:2] in (["0", "_cli_decay"], ["1", "_cli_decay"])]
    assert len(layer_lines) == 2 and all(l.split()[4] == "280" for l in layer_lines)  # 8 + 16 + 2*32*4 bytes
    assert "prefill" in out and "tokens/s" in out and "max |error|" in out
    assert "window_size" not in out  # no layer has a window: the --window-size default is not passed
    assert "compiling the decode step" in captured.err and "11/11" in captured.err


def test_demo_errors(capsys):
    assert main(["demo", "--pattern", "_cli_decy"]) == 2
    assert "did you mean '_cli_decay'" in capsys.readouterr().err
    assert main(["demo", "--pattern", "(_cli_decay"]) == 2
    assert "unbalanced '('" in capsys.readouterr().err
    assert main(["demo", "--pattern", "_cli_decay", "--set", "decay=2.0"]) == 2
    assert "decay must be in [0.0, 1.0], got 2.0" in capsys.readouterr().err
    assert main(["demo", "--pattern", "_cli_decay", "--set", "decay=inf"]) == 2
    assert "--set decay=inf: value for 'decay' is 'inf', which is not a finite number" in capsys.readouterr().err
    assert main(["demo", "--pattern", "_cli_decay", "--set", "window=3"]) == 2
    assert "'window' taken by no layer" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["demo", "--pattern", "_cli_decay", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    else:
        assert main(["demo", "--pattern", "_cli_decay", "--device", "cuda", "--new-tokens", "3", "--no-compile"]) == 0


@pytest.mark.slow
def test_demo_default_pattern(capsys):
    """The built-in mixers in the default pattern, on a small size, with the compiled decode step."""
    rc = main(["demo", "--hidden", "64", "--prompt-len", "40", "--new-tokens", "8", "--backend", "aot_eager"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    mixers = [l.split()[1] for l in captured.out.splitlines() if l.split() and l.split()[0].isdigit()]
    assert mixers == ["gdn", "swa_sink", "gdn", "swa_sink", "eviction_swa", "full_attention"], DEFAULT_PATTERN
