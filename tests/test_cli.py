"""``python -m mixerzoo list`` and ``python -m mixerzoo demo``."""

import dataclasses
import io
import os
import subprocess
import sys

import torch
from torch import nn

from mixerzoo import registry
from mixerzoo.cli import DEFAULT_PATTERN, Progress, format_table, main
from mixerzoo.mixers.base import MixerConfig, State, TokenMixer, positions_and_pad, state_dataclass, state_field

REAL = [n for n in registry.names() if not n.startswith("_")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class DecayConfig(MixerConfig):
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


def test_list_in_process(capsys):
    assert main(["list", "--fields"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:4] == ["mixer", "aliases", "state", "decode"]
    assert any(line.startswith("_cli_decay ") and " constant " in line for line in out.splitlines())
    assert "_cli_decay: DecayConfig(hidden_size, num_heads, decay)" in out
    for name in REAL:
        assert f"\n{name} " in out


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
    assert main(["demo", "--pattern", "_cli_decay", "--set", "window=3"]) == 2
    assert "'window' taken by no layer" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["demo", "--pattern", "_cli_decay", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    else:
        assert main(["demo", "--pattern", "_cli_decay", "--device", "cuda", "--new-tokens", "3", "--no-compile"]) == 0


def test_demo_default_pattern(capsys):
    """The built-in mixers in the default pattern, on a small size, with the compiled decode step."""
    rc = main(["demo", "--hidden", "64", "--prompt-len", "40", "--new-tokens", "8", "--backend", "aot_eager"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    mixers = [l.split()[1] for l in captured.out.splitlines() if l.split() and l.split()[0].isdigit()]
    assert mixers == ["gdn", "swa_sink", "gdn", "swa_sink", "eviction_swa", "full_attention"], DEFAULT_PATTERN
