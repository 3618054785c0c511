"""Shared benchmark plumbing: device checks, CUDA-event timing, peak memory and the results JSON.

Importing this module imports neither torch nor Triton (``--help`` of every script stays fast); the
functions that need torch import it when called.

    python benchmarks/common.py FILE...   # merge results files written under $OUT into results/<gpu>.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# optional comparison packages: import name -> pip name
FLA = ("fla", "flash-linear-attention")


def refuse(message: str) -> NoReturn:
    """One line on stderr and exit status 2 (argparse's status for a usage error), without a traceback."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def missing_packages(packages: Sequence[tuple[str, str]]) -> list[str]:
    """The pip names of those ``(module, pip name)`` pairs whose module is not installed (nothing is imported)."""
    return [pip for module, pip in packages if importlib.util.find_spec(module) is None]


def install_hint(pip_names: Sequence[str]) -> str:
    return "pip install " + " ".join(pip_names)


def require_gpu(script: str, mode: str, *, cpu: str | None, packages: Sequence[tuple[str, str]] = ()) -> None:
    """Refuse ``mode`` of ``script`` (exit status 2, one line) unless a CUDA device and ``packages`` are present.

    ``cpu`` names the mode of the script that runs without a GPU, if any. Call it right after the arguments
    are parsed, before anything imports mixerzoo's kernels or Triton."""
    import torch

    needs = []
    if not torch.cuda.is_available():
        where = f"'{cpu}' runs on the CPU" if cpu else "no mode of it runs on the CPU"
        needs.append(f"a CUDA GPU (torch.cuda.is_available() is False; {where})")
    missing = missing_packages(packages)
    if missing:
        needs.append(f"{', '.join(missing)} (not installed: {install_hint(missing)})")
    if needs:
        refuse(f"{script} {mode}: needs " + " and ".join(needs))


def interpret_without_gpu(script: str) -> bool:
    """For a mode that runs on the CPU: without a CUDA device, set TRITON_INTERPRET=1 (a Triton kernel launched
    on CPU tensors then runs in Triton's interpreter), say so, and return True. Triton reads the variable when
    a kernel is decorated, so this must run before anything imports Triton or mixerzoo's kernels."""
    import torch

    if torch.cuda.is_available():
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise RuntimeError(f"{script}: triton was imported before TRITON_INTERPRET could be set")
        os.environ["TRITON_INTERPRET"] = "1"
    print(f"{script}: no CUDA device; Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1)", flush=True)
    return True


def gpu_slug() -> str:
    import torch

    name = torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def rel_rmse(ref, out) -> float:
    """Relative RMSE of ``out`` against ``ref`` (tensors): rms(out - ref) / rms(ref), in float64."""
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
    import torch

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


def cuda_graphed(fn):
    """Capture fn() in a CUDA graph (decode steps are launch-bound): returns (replay, out), out being fn's
    output tensors, which every replay overwrites (mixerzoo.bench.timing.cuda_graphed, 3 eager runs first)."""
    from mixerzoo.bench.timing import cuda_graphed

    return cuda_graphed(fn, warmup=3)


def host_ms(fn, repeat: int = 30) -> float:
    """Median host time of one call of ``fn`` with the device idle before it (the launch overhead of an eager
    decode step), in milliseconds."""
    import time

    import torch

    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def peak_mem_mb(fn) -> float:
    """Peak CUDA memory allocated while running ``fn()`` once, in MiB, above what was allocated before."""
    import torch

    from mixerzoo.bench.timing import peak_mem_mb

    return peak_mem_mb(fn, torch.device("cuda", torch.cuda.current_device()))


def _replaced(row: dict, ops: set[str], new_rows: list[dict], by: Sequence[str] | None) -> bool:
    """Whether an earlier ``row`` gives way to ``new_rows``: every row of ``ops``, or with ``by`` only those
    whose values of the keys ``by`` match a new row's (a run of part of a sweep replaces that part)."""
    if row.get("op") not in ops:
        return False
    if not by:
        return True
    return any(all(row.get(k) == n.get(k) for k in by) for n in new_rows if n.get("op") == row.get("op"))


def write_results(
    ops: set[str], rows: list[dict], extra: dict | None = None, *, replace_by: Sequence[str] | None = None
) -> pathlib.Path:
    """Merge ``rows`` into ``results/<gpu>.json``: rows of ``ops`` from an earlier run are replaced (with
    ``replace_by``, only those that agree with a new row on those keys), rows of other ops (written by other
    scripts) are kept. With $OUT set, this run's rows alone also go to ``$OUT/results-<ops>.json``, for
    ``merge_file`` in another checkout (which replaces rows the same way); a run of part of a sweep (``replace_by``)
    adds its rows to those an earlier run of the same command wrote there (a script run once per cell in one
    command), replacing the ones it measured again."""
    import torch
    import triton

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{gpu_slug()}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    kept = [r for r in old.get("rows", []) if not _replaced(r, ops, rows, replace_by)]
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
    if os.environ.get("OUT"):
        part = pathlib.Path(os.environ["OUT"]) / f"results-{'-'.join(sorted(ops))}.json"
        part.parent.mkdir(parents=True, exist_ok=True)  # $OUT may name a folder not yet made (one per script)
        by = list(replace_by) if replace_by else None
        earlier = json.loads(part.read_text()) if by and part.exists() else {}
        if earlier.get("replace_by") != by:
            earlier = {}  # an earlier run that replaced by other keys: ours alone (a whole run: always ours alone)
        part_rows = [r for r in earlier.get("rows", []) if not _replaced(r, ops, rows, by)] + rows
        part_doc = {**doc, "rows": part_rows} | ({"replace_by": by} if by else {})
        part.write_text(json.dumps(part_doc, indent=1) + "\n")
    return path


def print_table(rows: list[dict], cols: Sequence[str] | None = None) -> None:
    """The rows as a table; ``cols``: the columns (a row without one shows ""), else the usual ones that any row
    has."""
    if cols is None:
        cols = ["op", "impl", "B", "T", "H", "D", "fwd_ms", "fwdbwd_ms", "decode_ms", "step_ms", "tokens_per_s"]
        cols += ["peak_mem_mb", "note"]
        cols = [c for c in cols if any(c in r for r in rows)]
    widths = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def finish(op: str, rows: list[dict], smoke: bool) -> int:
    """The end of a script with a CPU smoke mode: the table, then the rows into results/<gpu>.json unless it was
    the smoke run (no GPU figures). Returns the exit status 0."""
    print_table(rows)
    if not smoke:
        print("wrote", write_results({op}, rows))
    return 0


def swa_point_inputs(point: Sequence[int]):
    """(shape keys, q, k, v) of a kernel experiment's point (B, T, HQ, HKV, D, W): bf16 CUDA tensors drawn with seed
    0, q [B, T, HQ, D], k and v [B, T, HKV, D]."""
    import torch

    B, T, HQ, HKV, D, W = point
    torch.manual_seed(0)
    q = torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return dict(B=B, T=T, HQ=HQ, HKV=HKV, D=D, W=W), q, k, v


def experiment_main(argv: Sequence[str] | None, experiment, *, interpret: bool = True) -> int:
    """The command line of a one-question kernel experiment (``swa_five_matmul.py``, ``swa_warp_specialized.py``,
    ``swa_gluon.py``), ``experiment`` being the script's module: its ``SHAPES`` (point: shape), ``OP`` and
    ``COLUMNS``, ``_build()`` (defines the kernels once the interpreter flag is settled), ``check()`` and
    ``timing(points)``. ``--check`` runs ``check()`` on the CPU (in Triton's interpreter, or with ``interpret=False``
    with the interpreter flag cleared, for a check that compiles kernels), else ``timing(points)`` on the GPU prints
    the table of ``COLUMNS`` and writes the rows of ``OP`` (replacing the earlier rows of the points it measured);
    ``--points`` picks among the points. Returns the exit status."""
    script, doc, points = pathlib.Path(experiment.__file__).name, experiment.__doc__, list(experiment.SHAPES)
    build, check, timing = experiment._build, experiment.check, experiment.timing
    check_help = "the CPU check (Triton's interpreter)" if interpret else "the CPU check (compiles for sm_90)"
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help=f"{check_help} instead of timing")
    ap.add_argument("--points", default=",".join(points), help=f"comma-separated, of {', '.join(points)}")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.points.split(",")) - set(points))
    if unknown:
        ap.error(f"--points: unknown point(s) {', '.join(unknown)}; choose from {', '.join(points)}")
    if args.check:
        if interpret:
            interpret_without_gpu(script)
        elif os.environ.pop("TRITON_INTERPRET", None) is not None and "triton" in sys.modules:
            raise RuntimeError(f"{script}: triton was imported before TRITON_INTERPRET could be cleared")
        build()
        return check()
    require_gpu(script, "timing", cpu=f"{script} --check")
    build()
    rows = timing(args.points.split(","))
    print_table(rows, experiment.COLUMNS)
    # a run of some points replaces those points' rows only: the others' rows (an earlier run) stay
    print("results:", write_results({experiment.OP}, rows, replace_by=("point",)))
    return 0


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def merge_file(returned: str) -> pathlib.Path:
    """Merge a results file written by another checkout (``$OUT/results-*.json``) into ``results/``: its ops
    replace ours (when it names ``replace_by`` keys, only our rows that agree with one of its rows on them)."""
    new = json.loads(pathlib.Path(returned).read_text())
    by = new.pop("replace_by", None)
    slug = re.sub(r"[^a-z0-9]+", "-", new["gpu"].lower()).strip("-")
    path = RESULTS / f"{slug}.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    ops = {r["op"] for r in new["rows"]}
    old_rows = [r for r in old.get("rows", []) if not _replaced(r, ops, new["rows"], by)]
    new_rows = [r for r in new["rows"] if r["op"] in ops]
    doc = {**old, **new, "rows": old_rows + new_rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(
            "Merge results files written under $OUT by a benchmark run elsewhere (results-<ops>.json) into "
            "benchmarks/results/<gpu>.json: the file's ops replace the rows of those ops, other rows are kept. "
            "Runs on the CPU."
        )
    )
    ap.add_argument("files", nargs="+", metavar="FILE", help="results-<ops>.json files to merge")
    args = ap.parse_args(argv)
    for f in args.files:
        if not pathlib.Path(f).is_file():
            refuse(f"common.py: results file {f!r} does not exist")
    for f in args.files:
        print("merged into", merge_file(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
