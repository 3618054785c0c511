"""The README's results section, generated from the committed results files in benchmarks/results/.

    python benchmarks/results_card.py            # print the section
    python benchmarks/results_card.py --write    # rewrite README.md between the results markers
    python benchmarks/results_card.py --plots    # also draw the bench runs' plots (needs matplotlib) first

Sources: every ``results/<gpu>-bench.json`` written by ``python -m mixerzoo bench`` (layer rows, rendered by
mixerzoo.bench.card_markdown, with the plots found in ``results/plots/<gpu>/``); and every op-level
``results/<gpu>.json`` of the scripts here (each op against the anchors timed in the same run). A test
(tests/test_bench_cli.py) checks that README.md holds exactly what this script generates.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# Keys that name a row's shape: an anchor row is compared with each mixerzoo row of the same op whose shape keys
# agree (a key only one of the two rows has, such as an attention window, does not separate them).
SHAPE_KEYS = ("B", "T", "seen", "H", "HKV", "D", "K", "V", "W", "packed")


def _same_shape(ours: dict, anchor: dict) -> bool:
    return ours["op"] == anchor["op"] and all(ours[k] == anchor[k] for k in SHAPE_KEYS if k in ours and k in anchor)


def _shape(r: dict) -> str:
    s = f"{r['B']} x {r['T']}" if "T" in r else f"{r['B']}, {r['seen']} seen" if "seen" in r else f"B={r['B']}"
    extra = [f"{k}={r[k]}" for k in ("H", "HKV", "W") if k in r and r["op"].startswith("nsa")]
    if r["op"] == "gdn_shapes":  # a sweep over head shapes: each row names its own
        extra = [f"{k}={r[k]}" for k in ("H", "K", "V") if k in r] + (["packed"] if r.get("packed") else [])
    return s + (f" ({', '.join(extra)})" if extra else "")


# benchmarks/sweep.py's ops (swa_sweep, ...): many points each, summed up by sweep_lines instead of a line per row
SWEEP_SUFFIX = "_sweep"
# a sweep row's point (sweep.REPLACE_BY): an anchor row is compared with the mixerzoo row of the same op and point
SWEEP_KEYS = ("B", "T", "HQ", "HKV", "D", "W", "S", "frac")


def sweep_lines(rows: list[dict]) -> list[str]:
    """The shape sweep's rows as one line per (op, anchor): the worst and best anchor / mixerzoo fwd+bwd ratio over
    the points measured, with the point; nothing when there are no sweep rows with both figures."""
    rows = [r for r in rows if r["op"].endswith(SWEEP_SUFFIX) and "fwdbwd_ms" in r]
    ours = {(r["op"], *(r.get(k) for k in SWEEP_KEYS)): r for r in rows if r["impl"] == "mixerzoo"}
    ratios: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for r in rows:
        o = ours.get((r["op"], *(r.get(k) for k in SWEEP_KEYS)))
        if r["impl"] != "mixerzoo" and o is not None:
            ratios.setdefault((r["op"], r["impl"]), []).append((r["fwdbwd_ms"] / o["fwdbwd_ms"], r.get("point", "?")))
    if not ratios:
        return []
    lines = [
        "",
        "Shape sweep (`benchmarks/sweep.py`): anchor fwd+bwd time over mixerzoo's, the worst and the best over the "
        "points measured (> 1: mixerzoo faster).",
        "",
        "| op | anchor | points | worst | best |",
        "|---|---|---|---|---|",
    ]
    for (op, anchor), rs in sorted(ratios.items()):
        (w, wp), (b, bp) = min(rs), max(rs)
        lines.append(f"| `{op}` | {anchor} | {len(rs)} | {w:.2f}x (`{wp}`) | {b:.2f}x (`{bp}`) |")
    return lines


def op_level_card(doc: dict, source: str) -> str:
    """Each op of an op-level results file against the anchors of the same shape: fwd+bwd times (decode times
    for decode ops), the anchor's time over mixerzoo's, mixerzoo's peak memory and state size; the shape sweep's
    ops summed up (sweep_lines)."""
    rows = [r for r in doc["rows"] if not r["op"].endswith(SWEEP_SUFFIX)]
    ours = [r for r in rows if r["impl"] == "mixerzoo"]
    lines = [
        f"### {doc.get('gpu', '?')}: kernels against their anchors (`{source}`)",
        "",
        f"torch {doc.get('torch', '?')}, Triton {doc.get('triton', '?')}, {doc.get('date', '?')}. "
        f"Times: {doc.get('timing', '?')}.",
        "",
        "| op | B x T (or seen) | figure | mixerzoo ms | anchor | anchor ms | anchor / mixerzoo | mixerzoo peak MiB "
        "| state (whole batch) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for r in rows:
        if r["impl"] == "mixerzoo":
            continue
        for o in (o for o in ours if _same_shape(o, r)):
            metric = next((m for m in ("fwdbwd_ms", "decode_ms", "fwd_ms") if m in r and m in o), None)
            if metric is None:
                continue
            ratio = r[metric] / o[metric]
            shape = _shape(o)
            anchor = r["impl"] + (f" ({r['backend']})" if "backend" in r else "")  # e.g. sdpa (flash)
            ratios.append((ratio, r["op"], anchor, shape))
            state = _bytes(o["state_bytes"]) if "state_bytes" in o else "-"
            lines.append(
                f"| `{r['op']}` | {shape} | {metric.removesuffix('_ms')} | {_ms(o[metric])} | {anchor} | "
                f"{_ms(r[metric])} | {ratio:.2f}x | {_ms(o.get('peak_mem_mb'))} | {state} |"
            )
    if ratios:
        worst, best = min(ratios), max(ratios)
        lines += [
            "",
            f"Anchor time over mixerzoo's (> 1: mixerzoo faster): worst {worst[0]:.2f}x (`{worst[1]}` vs {worst[2]}, "
            f"{worst[3]}), best {best[0]:.2f}x (`{best[1]}` vs {best[2]}, {best[3]}).",
        ]
    lines += sweep_lines(doc["rows"])
    return "\n".join(lines) + "\n"


def _bench_files() -> list[pathlib.Path]:
    return sorted(RESULTS.glob("*-bench.json"))


def _op_files() -> list[pathlib.Path]:
    return sorted(
        p
        for p in RESULTS.glob("*.json")
        if not p.name.endswith("-bench.json") and not p.name.startswith(("backends-", "recall-"))
    )


def recall_card(doc: dict, rel: str) -> str:
    """The recall experiment's table (``python -m mixerzoo recall``): accuracy per pattern and length."""
    rows = doc["rows"]
    lengths = list(rows[0]["accuracy"]) if rows else []
    pairs = rows[0].get("pairs", {}) if rows else {}
    r = doc["recipe"]
    asked = {L: pairs.get(L, r["pairs"]) for L in lengths}
    out = [
        f"### recall (`{rel}`, {doc['device']}, torch {doc['torch']}, {doc['date']})",
        "",
        f"T = {r['T']}, vocabulary {r['vocab']}, hidden {r['hidden']}, W = {r['window']}, C = {r['capacity']}, "
        f"batch {r['batch']}, {r['steps']} steps; chance {doc['chance']:.4f}.",
        "",
        "| pattern | KV bytes per attention layer | "
        + " | ".join(f"T = {L} ({asked[L]} pairs)" for L in lengths)
        + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for row in rows:
        accs = " | ".join(f"{row['accuracy'][L]:.3f}" for L in lengths)
        out.append(f"| `{row['pattern']}` | {row['kv_bytes_per_attention_layer']:,} | {accs} |")
    if doc.get("note"):
        out += ["", doc["note"][0].upper() + doc["note"][1:] + "."]
    return "\n".join(out) + "\n"


def _plots_of(bench: pathlib.Path) -> dict[str, str]:
    folder = RESULTS / "plots" / bench.name.removesuffix("-bench.json")
    return {
        p.stem.removeprefix("bench-").replace("_", " "): os.path.relpath(p, ROOT) for p in sorted(folder.glob("*.png"))
    }


def section() -> str:
    """The markdown between the README's results markers."""
    sys.path.insert(0, str(ROOT))
    from mixerzoo.bench import card_markdown

    parts = [
        "Generated by `python benchmarks/results_card.py --write` from the results files in `benchmarks/results/`; "
        "do not edit by hand.",
        "",
    ]
    for path in _bench_files():
        doc = json.loads(path.read_text())
        parts.append(
            card_markdown(doc, plots=_plots_of(path), heading="###").replace(
                "### mixerzoo bench:", "### mixerzoo bench (`" + os.path.relpath(path, ROOT) + "`):", 1
            )
        )
    for path in _op_files():
        doc = json.loads(path.read_text())
        parts.append(op_level_card(doc, os.path.relpath(path, ROOT)))
    for path in sorted(RESULTS.glob("recall-*.json")):
        parts.append(recall_card(json.loads(path.read_text()), os.path.relpath(path, ROOT)))
    if len(parts) == 2:
        parts.append("No results committed yet.\n")
    return "\n".join(parts)


def write_readme(text: str) -> bool:
    """Replace the README's results section with ``text``; True when the file changed."""
    old = README.read_text()
    if old.count(BEGIN) != 1 or old.count(END) != 1:
        raise SystemExit(f"results_card.py: README.md must hold {BEGIN} and {END} once each")
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{text.strip()}\n{END}{tail}"
    if new != old:
        README.write_text(new)
    return new != old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite README.md between the results markers")
    ap.add_argument("--plots", action="store_true", help="draw each bench run's plots into results/plots/<gpu>/")
    args = ap.parse_args(argv)
    if args.plots:
        sys.path.insert(0, str(ROOT))
        from mixerzoo.bench import write_plots

        for path in _bench_files():
            write_plots(json.loads(path.read_text()), RESULTS / "plots" / path.name.removesuffix("-bench.json"))
    text = section()
    if args.write:
        print("README.md " + ("rewritten" if write_readme(text) else "already up to date"))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
