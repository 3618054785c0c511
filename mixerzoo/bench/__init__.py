"""``python -m mixerzoo bench``: time every registered mixer layer against its anchors (docs/bench.md).

From Python: ``run(Settings(...))`` returns the results document; ``report`` prints, saves, compares and
renders it (markdown card, plots); ``flops`` holds the one definition of each mixer's useful FLOPs.
"""

from __future__ import annotations

from .cli import add_bench_parser, cmd_bench, default_json_path
from .flops import attention_pairs, layer_flops
from .report import card_markdown, compare, load, save, table, write_plots
from .runner import Settings, run
from .timing import cuda_graphed, peak_mem_mb, time_ms

__all__ = [
    "Settings",
    "add_bench_parser",
    "attention_pairs",
    "card_markdown",
    "cmd_bench",
    "compare",
    "cuda_graphed",
    "default_json_path",
    "layer_flops",
    "load",
    "peak_mem_mb",
    "run",
    "save",
    "table",
    "time_ms",
    "write_plots",
]
