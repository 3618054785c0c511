"""The conformance suite must catch broken mixers: a toy mixer passes, and each planted bug fails its check."""

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
            if self.config.bug != "stale_state":
                state.total.copy_(total[:, -1])
                state.count.copy_(count[:, -1])
            state.seen.add_(x.shape[1])
        y = self.o((total / count.clamp_min(1)[..., None]).to(x.dtype))
        return y, state


register("_toy_mean", config=ToyConfig)(ToyMean)


def test_toy_passes():
    conformance.check("_toy_mean", device="cpu", checks=[c for c in conformance.CHECKS if c != "compile_inductor"])


@pytest.mark.parametrize(
    "bug,check", [("peek", "causality"), ("stale_state", "decode"), ("stale_state", "chunked_prefill")]
)
def test_planted_bug_is_caught(bug, check):
    spec = dataclasses.replace(conformance.checks.core_spec("_toy_mean"), conformance_kwargs={"bug": bug})
    with pytest.raises(AssertionError):
        conformance.CHECKS[check](conformance.Case(spec))


def test_command_line_reports_each_check():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "mixerzoo.conformance", "swa", "--device", "cpu", "--checks", "contract,decode"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "contract[float32]" in out.stdout and "decode[float32]" in out.stdout and "ok" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mixerzoo.conformance", "swa", "--checks", "nonsense"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "nonsense" in bad.stderr
