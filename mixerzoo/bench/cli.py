"""``python -m mixerzoo bench``: the benchmark card of every registered mixer (docs/bench.md)."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
from typing import Any

import torch

__all__ = ["add_bench_parser", "cmd_bench", "default_json_path"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Shapes and repeats: the standard run, and --quick, per device.
_STANDARD = dict(
    hidden_size=2048,
    num_heads=16,
    tokens=32768,
    seqlens=(2048, 8192, 32768),
    seen=(4096, 32768, 131072),
    decode_batch=32,
    warmup=3,
    repeat=10,
    decode_repeat=30,
    prefill_chunk=4096,
)
_QUICK = {
    "cuda": dict(tokens=8192, seqlens=(2048, 8192), seen=(4096, 32768), decode_batch=8, repeat=5, decode_repeat=10),
    # small enough for the CPU references: under a minute on 2 cores for the built-in mixers
    "cpu": dict(
        hidden_size=256,
        num_heads=2,
        tokens=512,
        seqlens=(256, 512),
        seen=(256, 1024),
        decode_batch=2,
        warmup=1,
        repeat=3,
        decode_repeat=3,
        prefill_chunk=256,
    ),
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive(text: str) -> int:
    v = _ints(text)
    if len(v) != 1:
        raise argparse.ArgumentTypeError(f"expected one integer >= 1, got {text!r}")
    return v[0]


def _tolerance(text: str) -> float:
    try:
        v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.1) or a percentage (10%), got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a tolerance >= 0, got {text!r}")
    return v


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the subparsers ``sub`` of the mixerzoo command line."""
    from ..cli import add_import_argument

    p = sub.add_parser(
        "bench",
        help="time every registered mixer layer: forward, forward+backward, memory, decode steps, state sizes",
        description=(
            "Time every registered mixer layer (or --mixers) on one device and dtype, with anchors in the same "
            "run: forward and forward+backward per T at a fixed number of tokens per call (B = tokens // T), "
            "peak memory, useful TFLOP/s, the decode step after N tokens seen and the state bytes per "
            "sequence. Defaults: hidden 2048, 16 heads, T 2048,8192,32768, 32768 tokens per call, decode "
            "after 4K/32K/128K tokens at batch 32; bfloat16 on cuda, float32 on cpu. --quick: fewer repeats "
            "and smaller shapes (on cpu: hidden 256, T 256,512, under a minute on 2 cores). See docs/bench.md."
        ),
        epilog="exit status: 0 success, 1 a regression past --tolerance (with --compare) or a failed "
        "measurement, 2 usage error",
    )
    p.add_argument("--mixers", default=None, help="comma-separated mixers (default: every registered mixer)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--quick", action="store_true", help="few repeats and small shapes (a smoke run)")
    p.add_argument("--T", dest="seqlens", type=_ints, default=None, metavar="T,...", help="sequence lengths")
    p.add_argument("--tokens", type=_positive, default=None, help="tokens per forward call (B = tokens // T)")
    p.add_argument("--seen", type=_ints, default=None, metavar="N,...", help="tokens seen before the decode steps")
    p.add_argument("--decode-batch", type=_positive, default=None, help="batch of the decode steps")
    p.add_argument("--hidden", dest="hidden_size", type=_positive, default=None, help="hidden size")
    p.add_argument("--heads", dest="num_heads", type=_positive, default=None, help="number of heads")
    p.add_argument("--repeat", type=_positive, default=None, help="timed calls per figure (forward rows)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a layer setting for the mixers whose config has KEY, e.g. window_size=513 (repeatable)",
    )
    p.add_argument("--no-anchors", dest="anchors", action="store_false", help="leave out the anchors")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results here (see docs/bench.md)")
    p.add_argument("--compare", default=None, metavar="PATH", help="print each figure's ratio to a saved run")
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=0.10,
        help="with --compare: a figure more than this much above the saved one is a regression (default 10%%)",
    )
    p.add_argument("--card", default=None, metavar="PATH", help="write a markdown card of the run")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots (needs matplotlib)")
    add_import_argument(p)
    p.set_defaults(func=cmd_bench)
    return p


def default_json_path(gpu: str, device: str) -> pathlib.Path | None:
    """Where a run writes its results without --json: on cuda ``benchmarks/results/<gpu>-bench.json`` when
    run from a checkout (that folder exists), else ``<gpu>-bench.json`` here; on cpu nowhere."""
    if device != "cuda":
        return None
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    folder = pathlib.Path("benchmarks") / "results"
    return (folder if folder.is_dir() else pathlib.Path(".")) / f"{slug}-bench.json"


def _usage(args: argparse.Namespace, msg: str) -> int:
    print(f"{args.prog} bench: {msg}", file=sys.stderr)
    return 2


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import registry
    from ..cli import _parse_value, format_table, import_all
    from . import report
    from .runner import Settings, mixer_names, run

    if not import_all(args.imports, f"{args.prog} bench"):
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _usage(args, "--device cuda asked for, but torch sees no CUDA device")
    dtype = _DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    try:
        names = mixer_names([n.strip() for n in args.mixers.split(",") if n.strip()] if args.mixers else None)
    except KeyError as e:
        return _usage(args, f"--mixers: {e.args[0]}")
    if not names:
        return _usage(args, "no mixers registered")
    layer_kwargs: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            return _usage(args, f"--set takes KEY=VALUE, got {item!r}")
        if not any(key.strip() in registry.spec(n).fields() for n in names):
            return _usage(args, f"--set {key.strip()}: no mixer of this run has that config field")
        try:
            layer_kwargs[key.strip()] = _parse_value(key.strip(), value.strip())
        except ValueError as e:
            return _usage(args, str(e))
    saved = None
    if args.compare is not None:
        try:
            saved = report.load(args.compare)
        except ValueError as e:
            return _usage(args, f"--compare: {e}")
    if args.plots is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _usage(args, f"--plots needs matplotlib, which is not installed: {report.PLOTS_HINT}")

    values = dict(_STANDARD)
    if args.quick:
        values.update(_QUICK[device])
    for field in ("hidden_size", "num_heads", "tokens", "seqlens", "seen", "decode_batch", "repeat"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    settings = Settings(
        device=torch.device(device),
        dtype=dtype,
        mixers=names,
        anchors=args.anchors,
        layer_kwargs=layer_kwargs,
        **values,
    )
    print(
        f"mixerzoo bench: {', '.join(names)} on {device} "
        f"({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), {str(dtype).removeprefix('torch.')}, "
        f"hidden {settings.hidden_size}, {settings.num_heads} heads, T {','.join(map(str, settings.seqlens))} "
        f"at {settings.tokens} tokens per call, decode after {','.join(map(str, settings.seen))} tokens at "
        f"batch {settings.decode_batch}",
        flush=True,
    )
    try:
        doc = run(settings)
    except (KeyError, TypeError, ValueError) as e:  # a bad --set value, refused by a mixer's config
        return _usage(args, e.args[0] if isinstance(e, KeyError) else str(e))

    print(report.table(doc["rows"]))
    for note in doc["notes"]:
        print(f"note: {note}")
    for failure in doc["failures"]:
        print(f"FAILED: {failure}")
    written = []
    path = pathlib.Path(args.json) if args.json else default_json_path(doc["gpu"], device)
    if path is not None:
        written.append(report.save(doc, path))
    if os.environ.get("OUT") and path is not None:
        written.append(report.save(doc, pathlib.Path(os.environ["OUT"]) / path.name))
    plots: dict[str, str] = {}
    if args.plots is not None:
        files = report.write_plots(doc, args.plots)
        written += files.values()
        base = pathlib.Path(args.card).parent if args.card else pathlib.Path(".")
        plots = {t: os.path.relpath(f, base) for t, f in files.items()}
    if args.card is not None:
        card = pathlib.Path(args.card)
        card.parent.mkdir(parents=True, exist_ok=True)
        card.write_text(report.card_markdown(doc, plots=plots))
        written.append(card)
    for f in written:
        print(f"wrote {f}")
    status = 1 if doc["failures"] else 0
    if saved is not None:
        if (saved.get("gpu"), saved.get("settings", {}).get("dtype")) != (doc["gpu"], doc["settings"]["dtype"]):
            print(
                f"note: the saved run is from {saved.get('gpu')} {saved.get('settings', {}).get('dtype')}, "
                f"this one from {doc['gpu']} {doc['settings']['dtype']}"
            )
        lines, regressed = report.compare(doc["rows"], saved["rows"], args.tolerance)
        print(f"\ncompared with {args.compare} (tolerance {args.tolerance:.0%}):")
        print(format_table(["row", "figure", "saved", "now", "now/saved", ""], lines))
        if regressed:
            print(f"{len(regressed)} row(s) regressed beyond {args.tolerance:.0%}: " + "; ".join(regressed))
            status = 1
        else:
            print(f"no regression beyond {args.tolerance:.0%}")
    print(f"elapsed {doc['elapsed_s']:.1f}s")
    return status
