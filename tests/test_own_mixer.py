"""The README's "Write your own mixer" example runs as written, passes the conformance checks and keeps
the rules they hold every mixer to (padding, holes, NaN, float64, state without autograd history)."""

import pathlib
import re
import subprocess
import sys
import types

import pytest
import torch

from mixerzoo import conformance, registry
from mixerzoo.testing import assert_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks() -> list[str]:
    section = README.read_text().split("## Write your own mixer", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def _exec_example() -> types.ModuleType:
    # a real module in sys.modules, as an imported file would be: classes resolve their module by name
    module = types.ModuleType("readme_cum_mean")
    sys.modules[module.__name__] = module
    exec(compile(_blocks()[0], "README.md (write your own mixer)", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def example() -> types.ModuleType:
    return _exec_example()


def _build(dtype=torch.float32, hidden=16):
    torch.manual_seed(0)
    return registry.build("cum_mean", hidden_size=hidden, num_heads=1).to(dtype).eval()


# the compile and gradients checks (a full float64 gradcheck) take 1.3 s of the 1.5 s: the slow run, as in
# tests/conformance/test_registered.py; Inductor's C++ compile of the example takes ~40 s on the CPU: not run
_SLOW_CHECKS = ("compile", "gradients")


def test_readme_example_passes_conformance(example):
    assert registry.spec("cum_mean").cls is example.CumMean
    check_block = _blocks()[1]
    assert 'conformance.check("cum_mean"' in check_block
    skip = ("compile_inductor", *_SLOW_CHECKS)
    times = conformance.check("cum_mean", device="cpu", checks=[c for c in conformance.CHECKS if c not in skip])
    assert "padding[float32]" in times


@pytest.mark.slow
def test_readme_example_passes_the_compile_and_gradients_checks(example):
    times = conformance.check("cum_mean", device="cpu", checks=_SLOW_CHECKS)
    assert "compile[float32]" in times and "gradients[float32]" in times


def test_readme_example_runs_twice(example):
    """Running the example again (a notebook cell, a reload) replaces the registration."""
    again = _exec_example()
    assert again.CumMean is not example.CumMean
    assert registry.spec("cum_mean").cls is again.CumMean
    assert type(registry.build("cum_mean", hidden_size=8, num_heads=1)) is again.CumMean


def test_readme_example_field_docs(example):
    docs = {field: (default, meaning) for field, default, meaning in registry.spec("cum_mean").field_docs()}
    assert docs["value_size"] == ("None", "width of the averaged values (None: hidden_size).")


def _ref(mixer, x):
    """The unpadded sequence alone."""
    return mixer(x)[0]


@pytest.mark.parametrize("left,right", [(3, 0), (0, 4), (2, 3)], ids=["left", "right", "both"])
def test_padding_left_right_both_with_nan(example, left, right):
    mixer = _build()
    T = 9
    x = torch.randn(2, T, 16)
    xp = torch.full((2, left + T + right, 16), float("nan"))
    xp[:, left : left + T] = x
    xp[:, :left] = float("inf")
    mask = torch.zeros(2, left + T + right, dtype=torch.bool)
    mask[:, left : left + T] = True
    y, _ = mixer(xp, attention_mask=mask)
    assert_close("cum_mean padded vs unpadded", _ref(mixer, x), y[:, left : left + T], torch.float32)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    # prefill with the mask, then decode: the padding left nothing in the state
    state = mixer.init_state(2)
    mixer(xp, state, attention_mask=mask)
    nxt = torch.randn(2, 1, 16)
    y_next, _ = mixer(nxt, state)
    assert_close("cum_mean decode after padded prefill", _ref(mixer, torch.cat([x, nxt], 1))[:, -1:], y_next, atol=1e-5)


def test_mask_with_holes_raises(example):
    mixer = _build()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2] = False
    with pytest.raises(ValueError, match="cum_mean: attention_mask"):
        mixer(torch.randn(2, 6, 16), attention_mask=mask)


def test_nan_never_reaches_earlier_outputs(example):
    mixer = _build()
    x = torch.randn(1, 8, 16)
    x[0, 5] = float("nan")
    y, _ = mixer(x)
    assert torch.isfinite(y[0, :5]).all() and torch.isnan(y[0, 5:]).all()


def test_float64_and_gradcheck(example):
    mixer = _build(torch.float64, hidden=4)
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    y, _ = mixer(x)
    assert y.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda inp: mixer(inp)[0], (x,))


def test_decode_in_grad_mode_records_no_history(example):
    mixer = _build().train()
    state = mixer.init_state(2)
    x = torch.randn(2, 4, 16, requires_grad=True)
    y, state = mixer(x, state)
    for _ in range(3):
        y, state = mixer(torch.randn(2, 1, 16, requires_grad=True), state)
    y.sum().backward()  # the step's own graph works
    for name, t in state.tensors().items():
        assert t.grad_fn is None and not t.requires_grad, name


@pytest.mark.slow  # the full run only: the fast run keeps the README example's conformance in-process
def test_conformance_command_line_imports_the_example(example, tmp_path):
    path = tmp_path / "my_cum_mean.py"
    path.write_text(_blocks()[0])
    proc = subprocess.run(
        [sys.executable, "-m", "mixerzoo.conformance", "--import", str(path), "cum_mean", "--device", "cpu"]
        + ["--checks", "contract,padding"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "padding[float32]" in proc.stdout
    assert "cum_mean: 4 checks: 4 ok, 0 skipped, 0 failed in" in proc.stdout
