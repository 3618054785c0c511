"""Shared benchmark plumbing: CUDA-event timing, peak memory, and the results JSON (SPEC section 7)."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def gpu_slug() -> str:
    name = torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def rel_rmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMSE of ``out`` against ``ref``: rms(out - ref) / rms(ref), in float64."""
    ref, out = ref.double(), out.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TIMING = (
    "median over 10 to 200 calls (the script says how many) queued back to back, each between two CUDA events, "
    "one synchronisation at the end"
)


def time_ms(fn, *, warmup: int = 5, repeat: int = 20) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` runs after ``warmup``, timed with CUDA events.

    The runs are queued back to back with one synchronisation at the end (as triton.testing.do_bench
    does), so each event pair measures the device's time for one call, not the host's launch latency
    before the first kernel of a call found the device idle; where the host is the slower side (an
    eager decode step), the pairs measure the host's time per call instead."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def peak_mem_mb(fn) -> float:
    """Peak CUDA memory allocated while running ``fn()`` once, in MiB, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_results(ops: set[str], rows: list[dict], extra: dict | None = None) -> pathlib.Path:
    """Merge ``rows`` into ``results/<gpu>.json``: rows of ``ops`` from an earlier run are replaced,
    rows of other ops (written by other scripts) are kept."""
    import triton

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{gpu_slug()}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    kept = [r for r in old.get("rows", []) if r.get("op") not in ops]
    doc = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "timing": TIMING,
        **{k: v for k, v in old.items() if k not in ("gpu", "torch", "triton", "date", "timing", "rows")},
        **(extra or {}),
        "rows": kept + rows,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    if os.environ.get("OUT"):  # on the lent GPU machine: also write this run's rows alone, to merge back
        part = pathlib.Path(os.environ["OUT"]) / f"results-{'-'.join(sorted(ops))}.json"
        part.write_text(json.dumps({**doc, "rows": rows}, indent=1) + "\n")
    return path


def print_table(rows: list[dict]) -> None:
    cols = ["op", "impl", "B", "T", "H", "D", "fwd_ms", "fwdbwd_ms", "decode_ms", "peak_mem_mb", "note"]
    cols = [c for c in cols if any(c in r for r in rows)]
    widths = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def merge_file(returned: str) -> pathlib.Path:
    """Merge a results file brought back from the GPU machine into ``results/``: its ops replace ours."""
    new = json.loads(pathlib.Path(returned).read_text())
    slug = re.sub(r"[^a-z0-9]+", "-", new["gpu"].lower()).strip("-")
    path = RESULTS / f"{slug}.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    ops = {r["op"] for r in new["rows"]}
    old_rows = [r for r in old.get("rows", []) if r.get("op") not in ops]
    new_rows = [r for r in new["rows"] if r["op"] in ops]
    doc = {**old, **new, "rows": old_rows + new_rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


if __name__ == "__main__":
    import sys

    for f in sys.argv[1:]:
        print("merged into", merge_file(f))
