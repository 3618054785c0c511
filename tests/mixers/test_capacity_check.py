"""The per-step checks of an eager decode loop, which remember what they last found while the checked counter stands
still: the KV-cache capacity check of the linear-growth mixers (full_attention, nsa) knows ``seen`` from its previous
check (no device read per step) and still refuses every write past max_seqlen, whatever changed ``seen`` in between;
the open-rows check runs again only after ``pad`` changes."""

from __future__ import annotations

import pytest
import torch

import mixerzoo.mixers.base as base
from mixerzoo import registry

CONFIGS = {
    "full_attention": dict(hidden_size=32, num_heads=4),
    "nsa": dict(hidden_size=32, num_heads=4, head_dim=8, block_size=4, block_count=3, window_size=5),
}


@pytest.fixture(autouse=True)
def record_on(monkeypatch):
    monkeypatch.setattr(base, "_SEEN_HOST_OFF", False)  # a torch.compile elsewhere in the run turns it off


class IntReads:
    """Count host reads of a tensor (int(t)) while active."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = torch.Tensor.__int__

        def counted(t):
            self.n += 1
            return orig(t)

        monkeypatch.setattr(torch.Tensor, "__int__", counted)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_steps_read_seen_once_and_still_stop_at_capacity(name, monkeypatch):
    m = registry.build(name, **CONFIGS[name]).eval()
    state = m.init_state(2, max_seqlen=6)
    reads = IntReads(monkeypatch)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        for _ in range(6):
            m(x, state)
        assert reads.n == 0  # a new state's counter is known (new_state), then each check knows the next value
        with pytest.raises(ValueError, match=f"{name}: decoding 1 tokens at position 6 exceeds max_seqlen=6"):
            m(x, state)
    assert int(state.seen) == 6


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.seen.fill_(5),
        lambda s: s.seen.add_(3),
        lambda s: s.seen.copy_(torch.tensor(5)),
    ],
    ids=["fill", "add", "copy"],
)
def test_any_other_change_of_seen_is_read_again(change):
    m = registry.build("full_attention", **CONFIGS["full_attention"]).eval()
    state = m.init_state(2, max_seqlen=6)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        m(x, state)
        m(x, state)
        change(state)  # seen is now 5: one more token fits, two do not
        m(x, state)
        with pytest.raises(ValueError, match="at position 6 exceeds max_seqlen=6"):
            m(x, state)


def test_a_selected_or_reset_state_is_read_again(monkeypatch):
    m = registry.build("full_attention", **CONFIGS["full_attention"]).eval()
    state = m.init_state(2, max_seqlen=4)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        for _ in range(4):
            m(x, state)
        picked = state.select(torch.tensor([1, 0]))  # new tensors: no record, read on the device
        with pytest.raises(ValueError, match="at position 4 exceeds max_seqlen=4"):
            m(x, picked)
        fresh = m.init_state(2, max_seqlen=4)  # a new counter, noted as 0 (new_state), never as the old one's 4
        reads = IntReads(monkeypatch)
        m(x, fresh)
        assert reads.n == 0 and int(fresh.seen) == 1


def test_a_captured_counter_is_always_read(monkeypatch):
    """A CUDA-graph replay advances seen without a version bump: once a counter was seen during a capture, no
    record is kept for it (simulated here: the capture branch marks it)."""
    m = registry.build("full_attention", **CONFIGS["full_attention"]).eval()
    state = m.init_state(2, max_seqlen=8)
    x = torch.randn(2, 1, 32)
    base._record_seen(state.seen, None, 0)  # what check_capacity does while capturing
    reads = IntReads(monkeypatch)
    with torch.no_grad():
        for _ in range(3):
            m(x, state)
    assert reads.n == 3
    assert base._recorded_seen(state.seen) is None


def test_compiling_a_check_turns_the_record_off():
    class S:
        seen = torch.zeros((), dtype=torch.long)

    def check(s):
        base.check_capacity("full_attention", s, 1, 8)
        return s.seen + 1

    assert not base._SEEN_HOST_OFF
    torch.compile(check, backend="eager", fullgraph=True)(S())
    assert base._SEEN_HOST_OFF


@pytest.mark.parametrize("name", ["swa", "gdn"])
def test_row_open_check_runs_again_only_after_pad_changes(monkeypatch, name):
    """A mask-less step checks that no row was ended by right padding; while ``pad`` stays unchanged the rows stay
    open, so later steps skip the check, and a new state's rows are known open (new_state), so its first steps issue
    none. A masked chunk that ends a row, or any in-place change of ``pad``, brings it back, and the step after a
    row's end still raises."""
    checks = []
    real = base.check_values
    monkeypatch.setattr(base, "check_values", lambda op, ok, msg, **kw: checks.append(msg) or real(op, ok, msg, **kw))
    m = registry.build(name, hidden_size=32, num_heads=4).eval()
    st = m.init_state(2)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        m(x, st)
        m(x, st)
        assert checks == []  # a new state's pad, unchanged: nothing to check
        st.pad.add_(0)  # an in-place change (even of nothing): checked once, then not while it stands still
        m(x, st)
        first = len(checks)
        assert first == 1
        m(x, st)
        m(x, st)
        assert len(checks) == first
        m(torch.randn(2, 2, 32), st, attention_mask=torch.tensor([[True, True], [True, False]]))  # row 1 ends
        with pytest.raises(ValueError, match="hole in the mask"):
            m(x, st)
        st.pad.zero_()  # a user reopens the rows: pad changed, checked again, and it passes
        n = len(checks)
        m(x, st)
        assert len(checks) == n + 1
