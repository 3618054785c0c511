"""CPU benchmark suite with regression tracking (pytest-benchmark), run by CI:

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-json .benchmarks/cpu.json
    python -m pytest benchmarks/test_bench_cpu.py --update-baseline      # refresh benchmarks/baseline-cpu.json

Times what a CPU runner can time: building a mixer from the registry, parsing a pattern, the reference forward
and one decode step of a small layer of every registered mixer, saving and loading a state. Each figure is the
fastest of its rounds (the least disturbed by other processes), divided by a calibration workload timed in the
same run (pure torch for tensor work, pure Python for the registry), so that a faster or slower machine moves
both alike. The last test compares each ratio with the committed baseline and fails when one is more than
THRESHOLD times its baseline; a figure past it is timed again with its calibration (up to RETRIES times) and
judged by its best ratio, since a preempted measurement is rarely preempted twice: a 2x slowdown of one
function fails every time, the run-to-run spread of a quiet 2-core machine (single figures up to about 2x
once in a while) does not.
"""

from __future__ import annotations

import json
import pathlib
import time

import pytest
import torch
from safetensors.torch import load, save

from mixerzoo import registry

BASELINE = pathlib.Path(__file__).resolve().parent / "baseline-cpu.json"
THRESHOLD = 1.6
ROUNDS = 20
ROUND_S = 0.001  # iterations per round: a round lasts about this long (short rounds are rarely preempted)
D, H, T, B = 64, 4, 64, 2

RESULTS: dict[str, tuple[float, str]] = {}  # benchmark -> (seconds per call, calibration it is divided by)
TIMED: dict[str, tuple[object, int]] = {}  # benchmark -> (function, iterations per round), for the re-timing
RETRIES = 2  # a figure past THRESHOLD is timed again, with its calibration, up to this many times


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy machine a parallel op waits for its slowest thread, a time slice at a
    time, which swamps small workloads; one thread keeps the figures comparable from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timed(benchmark, name: str, fn, kind: str) -> None:
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    iterations = max(1, int(ROUND_S / max(once, 1e-7)))
    benchmark.extra_info["calibration"] = kind
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=iterations, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        RESULTS[name] = (benchmark.stats.stats.min, kind)
        TIMED[name] = (fn, iterations)


def _retime(name: str) -> float:
    """Seconds per call of benchmark ``name`` timed again as pytest-benchmark timed it: the fastest of ROUNDS
    rounds of its iterations."""
    fn, iterations = TIMED[name]
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, (time.perf_counter() - t0) / iterations)
    return best


# -- calibration --------------------------------------------------------------------------------------


def _torch_workload():
    """A fixed small attention block in pure torch: projections, softmax, elementwise, reductions."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g)
    w = torch.randn(D, 3 * D, generator=g) / D**0.5

    def run():
        q, k, v = (x @ w).split(D, -1)
        s = torch.softmax((q @ k.transpose(1, 2)) / D**0.5 + torch.full((T, T), float("-inf")).triu(1), -1)
        y = torch.nn.functional.silu(s @ v) * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
        return y.sum()

    return run


def _python_workload():
    """Fixed pure-Python work: dict, str and list operations of the kind a registry lookup does."""

    def run():
        d = {}
        for i in range(100):
            key = f"layer_{i % 37}[w={i}]"
            d[key.split("[")[0]] = d.get(key.split("[")[0], 0) + len(key)
        return sorted(d.items())

    return run


def test_calibration_torch(benchmark):
    _timed(benchmark, "calibration_torch", _torch_workload(), "torch")


def test_calibration_python(benchmark):
    _timed(benchmark, "calibration_python", _python_workload(), "python")


# -- the library ---------------------------------------------------------------------------------------

MIXERS = registry.names()


def _small(name: str):
    torch.manual_seed(0)
    return registry.build(name, hidden_size=D, num_heads=H).eval()


def test_registry_build(benchmark):
    _timed(benchmark, "registry_build", lambda: registry.build("swa", hidden_size=D, num_heads=H), "python")


def test_parse_pattern(benchmark):
    pattern = "(gdn swa[window_size=8] swa_sink[num_sinks=2, window_size=16])*4 eviction_swa full_attention"
    _timed(benchmark, "parse_pattern", lambda: registry.parse_pattern(pattern), "python")


@pytest.mark.parametrize("name", MIXERS)
def test_forward(benchmark, name):
    mixer = _small(name)
    x = torch.randn(B, T, D)

    def fwd():
        with torch.no_grad():
            return mixer(x)

    _timed(benchmark, f"forward[{name}]", fwd, "torch")


@pytest.mark.parametrize("name", [n for n in MIXERS if registry.spec(n).decode])
def test_decode_step(benchmark, name):
    mixer = _small(name)
    state = mixer.init_state(B, max_seqlen=4096)
    with torch.no_grad():
        mixer(torch.randn(B, 32, D), state)
    x1 = torch.randn(B, 1, D)
    start = state.to_dict()

    def step():
        with torch.no_grad():
            return mixer(x1, state)

    _timed(benchmark, f"decode_step[{name}]", step, "torch")
    assert int(state.seen) > int(start["seen"])  # the steps ran on the state


def test_state_save_load(benchmark):
    mixer = _small("swa")
    state = mixer.init_state(B)
    with torch.no_grad():
        mixer(torch.randn(B, 32, D), state)

    def roundtrip():
        blob = save(state.to_dict())
        return mixer.state_class.from_dict(load(blob))

    _timed(benchmark, "state_save_load", roundtrip, "torch")


# -- regression check ------------------------------------------------------------------------------------


def _ratios() -> dict[str, float]:
    calib = {
        kind: RESULTS[f"calibration_{kind}"][0] for kind in ("torch", "python") if f"calibration_{kind}" in RESULTS
    }
    return {n: t / calib[k] for n, (t, k) in RESULTS.items() if not n.startswith("calibration_") and k in calib}


def test_no_regression_against_baseline(request):
    ratios = _ratios()
    if not ratios:
        pytest.skip("no benchmark was timed (--benchmark-disable, or a selection without the calibration)")
    if request.config.getoption("--update-baseline"):
        doc = {
            "threshold": THRESHOLD,
            "note": "seconds per call over the calibration workload's, timed in the same run (test_bench_cpu.py)",
            "ratios": {n: float(f"{r:.4g}") for n, r in sorted(ratios.items())},
        }
        BASELINE.write_text(json.dumps(doc, indent=1) + "\n")
        pytest.skip(f"baseline written to {BASELINE} ({len(ratios)} ratios)")
    base = json.loads(BASELINE.read_text())["ratios"]
    lines, regressed, unknown = [], [], []
    for name, r in sorted(ratios.items()):
        if name not in base:
            unknown.append(name)
            continue
        rel = r / base[name]
        retimed = 0
        while rel > THRESHOLD and retimed < RETRIES:
            # a preempted run is rarely preempted again: time the figure and its calibration once more (a
            # real slowdown stays past the threshold every time)
            kind = RESULTS[name][1]
            rel = min(rel, _retime(name) / _retime(f"calibration_{kind}") / base[name])
            retimed += 1
        again = f" (timed {retimed + 1} times)" if retimed else ""
        lines.append(f"{name:32s} ratio {r:10.4g}  baseline {base[name]:10.4g}  now/baseline {rel:5.2f}{again}")
        if rel > THRESHOLD:
            regressed.append(f"{name} ({rel:.2f}x its baseline)")
    print("\n".join(lines))
    if unknown:
        print(f"no baseline for {', '.join(unknown)}: refresh with --update-baseline")
    assert not regressed, (
        f"slower than {THRESHOLD}x the baseline (relative to the calibration): {'; '.join(regressed)}\n"
        + "\n".join(lines)
    )
