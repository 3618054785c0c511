"""Bench results: console table, JSON file, comparison with a saved run, markdown card, plots."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

__all__ = [
    "METRICS",
    "card_markdown",
    "compare",
    "load",
    "row_key",
    "save",
    "table",
    "write_plots",
]

# Figures where lower is better, compared by --compare.
METRICS = ("fwd_ms", "fwdbwd_ms", "decode_ms", "peak_mem_mb")
KEY_FIELDS = ("op", "impl", "B", "T", "seen")
PLOTS_HINT = "pip install matplotlib"


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a row across runs: op, impl, B, T and seen (decode rows)."""
    return tuple(row.get(k) for k in KEY_FIELDS)


def row_name(row: dict[str, Any]) -> str:
    parts = [row["op"], row["impl"], f"B={row.get('B')}", f"T={row.get('T')}"]
    if "seen" in row:
        parts.append(f"seen={row['seen']}")
    return " ".join(parts)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.4g}")
    return v


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a plain-text table: forward rows first, then decode rows."""
    from ..cli import format_table

    out = []
    fwd = [r for r in rows if "decode_ms" not in r]
    dec = [r for r in rows if "decode_ms" in r]
    if fwd:
        cols = ["op", "impl", "B", "T", "fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops", "peak_mem_mb"]
        cols = [c for c in cols if any(c in r for r in fwd)]
        out.append(format_table(cols, [[_fmt(r.get(c, "-")) for c in cols] for r in fwd]))
    if dec:
        cols = ["op", "impl", "B", "seen", "decode_ms", "state_bytes"]
        out.append(format_table(cols, [[_fmt(r.get(c, "-")) for c in cols] for r in dec]))
    return "\n\n".join(out)


def save(doc: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load(path: str | pathlib.Path) -> dict[str, Any]:
    """A results document; ValueError naming the file when it is not one."""
    path = pathlib.Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"bench: cannot read results file {str(path)!r}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"bench: {str(path)!r} is not a results file (a JSON object with a 'rows' list)")
    return doc


def compare(
    rows: Sequence[dict[str, Any]], saved: Sequence[dict[str, Any]], tolerance: float
) -> tuple[list[list[Any]], list[str]]:
    """Each figure of ``rows`` against the same row of ``saved``: (table rows [row, figure, saved, now,
    ratio, verdict], names of the regressed rows). A figure regresses when now / saved > 1 + tolerance."""
    old = {row_key(r): r for r in saved}
    lines: list[list[Any]] = []
    regressed: list[str] = []
    for r in rows:
        o = old.get(row_key(r))
        if o is None:
            lines.append([row_name(r), "-", "-", "-", "-", "new row"])
            continue
        bad = False
        for m in METRICS:
            if m not in r or m not in o:
                continue
            ratio = r[m] / o[m] if o[m] > 0 else math.inf
            verdict = "REGRESSION" if ratio > 1 + tolerance else ("faster" if ratio < 1 - tolerance else "ok")
            bad |= verdict == "REGRESSION"
            lines.append([row_name(r), m, _fmt(o[m]), _fmt(r[m]), round(ratio, 3), verdict])
        if bad:
            regressed.append(row_name(r))
    seen = {row_key(r) for r in rows}
    for o in saved:
        if row_key(o) not in seen:
            lines.append([row_name(o), "-", "-", "-", "-", "not measured now"])
    return lines, regressed


# --------------------------------------------------------------------------------------------------
# card and plots
# --------------------------------------------------------------------------------------------------


def _mixers(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows:
        n = r["op"].split(":", 1)[-1]
        if n not in names:
            names.append(n)
    return names


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def anchor_ratios(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, int, int, float]]:
    """(op, anchor impl, B, T, anchor fwd+bwd time / mixerzoo's) for every anchor row with a mixerzoo row of
    the same op and shape; > 1 means mixerzoo is faster."""
    ours = {(r["op"], r.get("B"), r.get("T")): r for r in rows if r["impl"] == "mixerzoo" and "fwdbwd_ms" in r}
    out = []
    for r in rows:
        o = ours.get((r["op"], r.get("B"), r.get("T")))
        if r["impl"] != "mixerzoo" and o is not None and "fwdbwd_ms" in r:
            out.append((r["op"], r["impl"], r["B"], r["T"], r["fwdbwd_ms"] / o["fwdbwd_ms"]))
    return out


def card_markdown(doc: dict[str, Any], *, plots: dict[str, str] | None = None, heading: str = "##") -> str:
    """A markdown card of a bench run: per mixer, forward and forward+backward against its anchors, peak
    memory, decode steps and state sizes; the device and versions; the worst and best anchor ratios; links
    to ``plots`` ({title: relative path})."""
    rows = doc["rows"]
    s = doc.get("settings", {})
    lines = [
        f"{heading} mixerzoo bench: {doc.get('gpu', '?')}",
        "",
        f"torch {doc.get('torch', '?')}, Triton {doc.get('triton', 'not installed')}, {doc.get('date', '?')}; "
        f"{s.get('dtype', '?')}, hidden {s.get('hidden_size', '?')}, {s.get('num_heads', '?')} heads, "
        f"{s.get('tokens', '?')} tokens per call; decode batch {s.get('decode_batch', '?')}. "
        f"Times: {doc.get('timing', '?')}.",
        "",
        "| mixer | impl | B x T | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | peak MiB | anchor / mixerzoo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = {(op, impl, B, T): x for op, impl, B, T, x in anchor_ratios(rows)}
    for r in rows:
        if "decode_ms" in r:
            continue
        ratio = ratios.get((r["op"], r["impl"], r.get("B"), r.get("T")))
        lines.append(
            f"| `{r['op']}` | {r['impl']} | {r.get('B')} x {r.get('T')} | {_ms(r.get('fwd_ms'))} | "
            f"{_ms(r.get('fwdbwd_ms'))} | {_ms(r.get('fwdbwd_tflops'))} | {_ms(r.get('peak_mem_mb'))} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} |"
        )
    dec = [r for r in rows if "decode_ms" in r]
    if dec:
        seen = sorted({r["seen"] for r in dec})
        lines += [
            "",
            "| mixer | decode step ms at "
            + " / ".join(f"{n // 1024}K" if n >= 1024 else str(n) for n in seen)
            + " seen | state per sequence |",
            "|---|---|---|",
        ]
        for name in _mixers(dec):
            mine = {r["seen"]: r for r in dec if r["op"].split(":", 1)[-1] == name}
            times = " / ".join(_ms(mine[n]["decode_ms"]) if n in mine else "-" for n in seen)
            sizes = sorted({mine[n]["state_bytes"] for n in mine if "state_bytes" in mine[n]})
            size = " to ".join(_bytes(b) for b in ([sizes[0], sizes[-1]] if len(sizes) > 1 else sizes)) or "-"
            lines.append(f"| `{name}` | {times} | {size} |")
    all_ratios = anchor_ratios(rows)
    if all_ratios:
        worst = min(all_ratios, key=lambda t: t[4])
        best = max(all_ratios, key=lambda t: t[4])
        lines += [
            "",
            f"Anchor fwd+bwd time over mixerzoo's (> 1: mixerzoo faster): worst {worst[4]:.2f}x "
            f"(`{worst[0]}` vs {worst[1]}, B={worst[2]} T={worst[3]}), best {best[4]:.2f}x "
            f"(`{best[0]}` vs {best[1]}, B={best[2]} T={best[3]}).",
        ]
    if doc.get("failures"):  # the first sentence of each (the results file keeps the whole message)
        short = [f.split(". ")[0].rstrip(".")[:200] for f in doc["failures"]]
        lines += ["", "Failed (the results file has the full messages):"] + [f"- {f}" for f in short]
    if plots:
        lines += [""] + [f"![{title}]({path})" for title, path in plots.items()]
    return "\n".join(lines) + "\n"


def write_plots(doc: dict[str, Any], folder: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """PNG plots of a bench run into ``folder``: forward+backward time and peak memory against T, decode step
    against tokens seen, one line per mixer (mixerzoo's rows). Needs matplotlib; ImportError with the install
    command without it. Returns {title: path} of the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(f"bench --plots needs matplotlib, which is not installed: {PLOTS_HINT}") from None
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r for r in doc["rows"] if r["impl"] == "mixerzoo" and r["op"].startswith("layer:")]
    fwd = [r for r in rows if "decode_ms" not in r]
    dec = [r for r in rows if "decode_ms" in r]
    specs = [
        ("fwdbwd_ms", fwd, "T", "forward+backward ms per call", "fwdbwd_ms vs T"),
        ("peak_mem_mb", fwd, "T", "peak memory of forward+backward (MiB)", "peak_mem_mb vs T"),
        ("decode_ms", dec, "seen", "decode step ms", "decode_ms vs seen"),
    ]
    written: dict[str, pathlib.Path] = {}
    for metric, data, x, ylabel, title in specs:
        data = [r for r in data if metric in r]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in _mixers(data):
            pts = sorted((r[x], r[metric]) for r in data if r["op"].split(":", 1)[-1] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens seen" if x == "seen" else "T (tokens per sequence)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{doc.get('gpu', '?')}: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = folder / f"bench-{metric}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[title] = path
    return written
