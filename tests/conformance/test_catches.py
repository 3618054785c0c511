"""The conformance suite must catch broken mixers: a toy mixer passes, and each planted bug fails its check."""

import re
import sys
from typing import ClassVar

import pytest
import torch
from torch import nn

from mixerzoo import conformance
from mixerzoo.mixers.base import (
    MixerConfig,
    State,
    TokenMixer,
    acc_dtype,
    positions_and_pad,
    state_dataclass,
    state_field,
)
from mixerzoo.registry import register


@state_dataclass
class ToyState(State):
    total: torch.Tensor = state_field()  # [B, D] running sum of v
    count: torch.Tensor = state_field()  # [B] real tokens so far


import dataclasses  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ToyConfig(MixerConfig):
    bug: str = "none"


class ToyMean(TokenMixer):
    """y_t = W_o (mean of W_v x_j over real j <= t): a causal cumulative mean with a constant-size state."""

    state_class = ToyState
    conformance_kwargs: ClassVar[dict] = {}

    def __init__(self, config):
        super().__init__(config)
        self.v = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None, max_seqlen=None):
        D = self.config.hidden_size
        z = lambda *s, dt=torch.float32: torch.zeros(s, device=device, dtype=dt)
        return ToyState(
            seen=z(dt=torch.long),
            pad=z(batch_size, dt=torch.long),
            total=z(batch_size, D),
            count=z(batch_size),
        )

    def mix(self, x, state, attention_mask):
        _, _, valid = positions_and_pad(x, state, attention_mask)
        v = self.v(x).to(acc_dtype(x.dtype)) * valid[..., None]
        total = v.cumsum(1)
        count = valid.to(v.dtype).cumsum(1)
        if self.config.bug == "peek":  # sees the next token: not causal
            total = total + torch.roll(v, -1, dims=1)
        if state is not None:
            total = total + state.total[:, None].to(v.dtype)
            count = count + state.count[:, None].to(v.dtype)
            with torch.no_grad():  # a state holds values, never autograd history
                if self.config.bug != "stale_state":
                    state.total.copy_(total[:, -1])
                    state.count.copy_(count[:, -1])
                state.seen.add_(x.shape[1])
        y = self.o((total / count.clamp_min(1)[..., None]).to(x.dtype))
        return y, state


register("_toy_mean", config=ToyConfig)(ToyMean)


@pytest.mark.slow  # 4 s: every check on the toy; the tests below run the one each bug must fail
def test_toy_passes():
    conformance.check("_toy_mean", device="cpu", checks=[c for c in conformance.CHECKS if c != "compile_inductor"])


@pytest.mark.parametrize(
    "bug,check", [("peek", "causality"), ("stale_state", "decode"), ("stale_state", "chunked_prefill")]
)
def test_planted_bug_is_caught(bug, check):
    spec = dataclasses.replace(conformance.checks.core_spec("_toy_mean"), conformance_kwargs={"bug": bug})
    with pytest.raises(AssertionError):
        conformance.CHECKS[check](conformance.Case(spec))


@pytest.mark.slow
def test_command_line_reports_each_check():
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "mixerzoo.conformance", "swa", "--device", "cpu", "--checks", "contract,decode"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "contract[float32]" in out.stdout and "decode[float32]" in out.stdout and "ok" in out.stdout
    assert re.search(r"^swa: 4 checks: 4 ok, 0 skipped, 0 failed in \d+\.\d s$", out.stdout, re.M)
    bad = subprocess.run(
        [sys.executable, "-m", "mixerzoo.conformance", "swa", "--checks", "nonsense"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "nonsense" in bad.stderr


class ToyMeanNoPad(ToyMean):
    """ToyMean declaring that it takes no mask and must not be compiled: those checks are skipped."""

    supports_padding = False
    compile_safe = False


class ToyPeek(ToyMean):
    conformance_kwargs: ClassVar[dict] = {"bug": "peek"}


# each mixer has its own config class: the registry names the mixer in errors through it
register("_toy_nopad", config=dataclasses.dataclass(frozen=True)(type("NoPadConfig", (ToyConfig,), {})))(ToyMeanNoPad)
register("_toy_peek", config=dataclasses.dataclass(frozen=True)(type("PeekConfig", (ToyConfig,), {})))(ToyPeek)


def test_report_shows_skips_with_reasons(capsys):
    rep = conformance.report("_toy_nopad", device="cpu", checks=["contract", "padding", "compile"], verbose=True)
    status = {r.key: (r.status, r.message) for r in rep.results}
    assert status["padding[float32]"] == ("skip", "the mixer declares supports_padding=False")
    assert status["compile[float32]"] == ("skip", "the mixer declares compile_safe=False")
    assert status["contract[bfloat16]"] == ("ok", "")
    out = capsys.readouterr().out
    assert re.search(r"padding\[float32\]\s+skip\s+\d+\.\d\d s  \(the mixer declares supports_padding=False\)", out)
    assert re.search(r"compile\[float32\]\s+skip .*\(the mixer declares compile_safe=False\)", out)
    assert re.search(r"^_toy_nopad: 5 checks: 3 ok, 2 skipped, 0 failed in \d+\.\d s$", out, re.M)
    assert rep.summary() in out and not rep.failures
    # check() keeps its contract: seconds of the checks that ran, no error for a skip
    times = conformance.check("_toy_nopad", device="cpu", checks=["contract", "padding", "compile"])
    assert set(times) == {"contract[float32]", "contract[bfloat16]", "contract[float16]", "padding[float32]"}
    assert [c for c, _ in conformance.plan("_toy_nopad") if c.startswith("compile")] == []


def test_failures_are_reported_and_raised():
    rep = conformance.report("_toy_peek", device="cpu", checks=["causality", "contract"])
    assert rep.failures.keys() == {"causality[float32]"} and "causality" in rep.failures["causality[float32]"]
    assert rep.summary().startswith("_toy_peek: 4 checks: 3 ok, 0 skipped, 1 failed in ")
    with pytest.raises(conformance.ConformanceError, match="_toy_peek: 1 conformance check") as e:
        conformance.check("_toy_peek", device="cpu", checks=["causality"])
    assert list(e.value.failures) == ["causality[float32]"]


def test_bad_device_refused_before_any_work(monkeypatch):
    ran = []
    monkeypatch.setitem(conformance.CHECKS, "contract", lambda case: ran.append(case))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' asked for, but torch sees no CUDA device"):
            conformance.check("_toy_mean", device="cuda", checks=["contract"])
    with pytest.raises(ValueError, match="device 'gpu0' is not a torch device; use cpu, cuda or cuda:N"):
        conformance.report("_toy_mean", device="gpu0")
    with pytest.raises(ValueError, match="device 'meta' is not supported; use cpu or cuda"):
        conformance.report("_toy_mean", device="meta")
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['nonsense'\]"):
        conformance.report("_toy_mean", device="cpu", checks=["nonsense"])
    assert ran == []


def test_command_line_exit_codes_and_messages(capsys, monkeypatch, tmp_path):
    from mixerzoo.conformance.__main__ import main

    ran = []
    monkeypatch.setitem(conformance.CHECKS, "bad_input", lambda case: ran.append(case.name))
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "exit status:" in out
    assert "0  every check that ran passed" in out and "1  a check failed" in out and "2  usage error" in out

    if not torch.cuda.is_available():
        assert main(["_toy_mean", "--device", "cuda"]) == 2
        assert "device 'cuda' asked for, but torch sees no CUDA device" in capsys.readouterr().err
    assert main(["_toy_mean", "--device", "tpu9"]) == 2
    assert "device 'tpu9' is not a torch device" in capsys.readouterr().err
    # every name is looked up before the first check: a typo in the second name runs nothing
    assert main(["_toy_mean", "_toy_maen", "--device", "cpu", "--checks", "bad_input"]) == 2
    assert "unknown mixer '_toy_maen'; did you mean '_toy_mean'" in capsys.readouterr().err
    assert main(["_toy_mean", "--checks", "bad_input,nonsense", "--device", "cpu"]) == 2
    assert "unknown check(s) nonsense" in capsys.readouterr().err
    assert main(["--import", "_toy_no_such_module", "_toy_mean"]) == 2
    assert "--import _toy_no_such_module failed: ModuleNotFoundError" in capsys.readouterr().err
    assert ran == []

    assert main(["_toy_mean", "--device", "cpu", "--checks", "bad_input"]) == 0
    assert ran == ["_toy_mean"] and "_toy_mean: 1 checks: 1 ok, 0 skipped, 0 failed" in capsys.readouterr().out
    assert main(["_toy_peek", "--device", "cpu", "--checks", "causality"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "_toy_peek: 1 checks: 0 ok, 0 skipped, 1 failed" in captured.out
    assert "causality[float32]:" in captured.err and "checks failed for _toy_peek" in captured.err


def test_command_line_imports_a_mixer_file(capsys, tmp_path):
    from mixerzoo.conformance.__main__ import main

    path = tmp_path / "_toy_user_file.py"
    path.write_text(
        "from mixerzoo.registry import register\n"
        "from mixerzoo.mixers.base import TokenMixer\n"
        f"from {__name__} import ToyConfig, ToyMean\n\n"
        "import dataclasses\n\n\n"
        "@dataclasses.dataclass(frozen=True)\nclass FileConfig(ToyConfig):\n    pass\n\n\n"
        "register('_toy_from_file', config=FileConfig)(type('FromFile', (ToyMean,), {}))\n"
    )
    try:
        assert main(["--import", str(path), "--import", str(path), "_toy_from_file", "--checks", "contract"]) == 0
    finally:
        sys.modules.pop("_toy_user_file", None)
    assert "_toy_from_file: 3 checks: 3 ok, 0 skipped, 0 failed" in capsys.readouterr().out
