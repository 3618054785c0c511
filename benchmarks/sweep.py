"""Shape sweep of the attention kernels on the GPU: mixerzoo's Triton kernels against FlexAttention (same mask,
compiled, block mask built outside the timing) and flash-attn 4 (``flash_attn.cute.flash_attn_func``: its sliding
window for swa, a mask_mod with the same mask as flex plus block sparsity for swa_sink and eviction_train), every
anchor timed in the same run on the same inputs, forward and forward+backward.

    python benchmarks/sweep.py --list                          # the grid and the named points (no GPU needed)
    python benchmarks/sweep.py                                 # every named point, every op
    python benchmarks/sweep.py --points base,D64,G8 --ops swa  # a subset
    python benchmarks/sweep.py --T 65536 --max-seconds 540     # the points at T = 65536, within 9 minutes
    python benchmarks/sweep.py --smoke                         # two tiny points (on the CPU without a GPU)

Ops (rows written under the sweep's own op names, so that the rows of attention.py and eviction.py stay):
swa (rows ``swa_sweep``: window W, no sinks), swa_sink (rows ``swa_sink_sweep``: window W and S = 4 sinks),
eviction_train (rows ``eviction_train_sweep``: ``eviction_attention(..., training=True)``, window W plus the
retained keys, visible to every later query; iid retained fraction ``frac``, S = 4 sinks; capacity plays no
part in training). flash_attn rows: swa through FA4's causal window (``window_size=(W - 1, 0)``); swa_sink and
eviction_train through a ``mask_mod`` with flex's mask (the retained flags as an aux tensor) and FA4's block sparsity
from torch's create_block_mask on that mask, built outside the timing: empty blocks skipped, fully visible blocks
unmasked, forward and backward (``attention._fa4_masked``; ``benchmarks/fa4_mask_check.py`` checks these calls
against a float32 reference).

The grid: bf16, HQ = 16 query heads, head dim D in {64, 128, 256}, G = HQ / HKV in {1, 2, 8}, window W in
{256, 512, 4096}, T in {2048, 8192, 32768, 65536} at a fixed number of tokens per call (B = tokens // T,
``--tokens``, default 65536), and for eviction_train the retained fraction frac in {0.02, 0.10, 0.30}. Its
product is too large for one run, so the named points are the base point (D = 128, G = 1, W = 512, T = 8192,
frac = 0.10), the points that move one axis from it, and a few corners likely to be the worst cases. A point
is named by the axes where it leaves the base, joined by '-': ``D64``, ``G8-W256-T65536-frac0.30``; any
such name is accepted by ``--points``, named or not. ``--D``, ``--G``, ``--W``, ``--T``, ``--frac`` keep the
points with those values. swa and swa_sink skip the points that differ from another only in frac.

Each point: (1) the correctness guard: mixerzoo's forward output against FlexAttention's on the same inputs
(bf16 relative RMSE <= 1e-2), so that a mask mismatch between the anchor and ours cannot go unnoticed; over it,
the point is not timed and counts as a failure (exit status 1); flash_attn's output is compared with ours the
same way and not timed when it differs; (2) ``--rounds`` rounds (default 2), each timing every implementation
in turn (forward, then forward+backward), each figure the median round, so that a drift of the clocks hits
every implementation alike; (3) peak memory of one forward+backward. After each point its rows are written
(merged into benchmarks/results/<gpu>.json, or into ``--json PATH``), a run of part of the sweep replacing only
the rows of the points it measured; a run cut off by a time limit keeps what it measured. ``--max-seconds``
stops between points when the next one would likely overrun, and prints the ``--points`` to resume with.

Rows: op, impl (mixerzoo, flex, flash_attn), point, B, T, HQ, HKV, D, W, S, frac (eviction_train only),
fwd_ms, fwdbwd_ms, peak_mem_mb, note. One line per point (anchor time over ours, forward and forward+backward);
at the end the rows, and per (op, anchor) the worst and best anchor / ours ratio with their points.

--smoke: two tiny points (T = 64 and 128, D = 32, small heads), results into ``--json`` or a temporary file,
never into results/. Without a GPU the kernels run in Triton's interpreter, in float32 (the interpreter gets bf16
dots wrong), called through their launchers (the public ops run the CPU reference on CPU tensors), and
FlexAttention runs eagerly, forward only (it has no backward on the CPU, and compiling it on the CPU takes longer
than the whole smoke run); flash_attn needs a GPU.
The smoke figures mean nothing: it exercises the guard, the rows and the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time
import traceback

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # benchmarks/common.py and the mixerzoo checkout
from common import (  # noqa: E402
    TIMING,
    _fmt,
    _replaced,
    interpret_without_gpu,
    peak_mem_mb,
    refuse,
    rel_rmse,
    require_gpu,
    time_ms,
    write_results,
)

OPS = ("swa", "swa_sink", "eviction_train")
ROW_OP = {op: f"{op}_sweep" for op in OPS}  # the sweep's forms of attention.py's and eviction.py's ops
ANCHORS = ("flex", "flash_attn")
HQ, SINKS, CAPACITY = 16, 4, 512  # capacity: required by the op, no part of the training semantics
GUARD = 1e-2  # bf16 relative RMSE of mixerzoo's forward output against an anchor's
# a row's identity in the results file (besides op): re-running a point replaces that point's rows, all impls
REPLACE_BY = ("B", "T", "HQ", "HKV", "D", "W", "S", "frac")

AXES = {"D": (64, 128, 256), "G": (1, 2, 8), "W": (256, 512, 4096), "T": (2048, 8192, 32768, 65536)}
AXES["frac"] = (0.02, 0.10, 0.30)
BASE = dict(D=128, G=1, W=512, T=8192, frac=0.10)
# likely worst cases, each with why
CORNERS = (
    "D64-G8-W4096-T65536",  # small heads, 8 query heads per KV head, long window and sequence: dK/dV sums 8 heads
    "D256-G2-W256-T2048",  # the largest head dim (smallest tiles) on the least work per tile, B = 32
    "D256-W4096-T65536",  # the largest head dim on the longest window: the most compute
    "D64-W256-T2048",  # the least work per program: launch overhead and the masked edge blocks weigh most
    "G8-W256-T65536-frac0.30",  # eviction: 30 % of 65536 keys visible past a short window to every later query
    "G8-T2048-frac0.02",  # eviction: few retained keys on short sequences, the fixed costs (intervals) weigh most
)


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    D: int
    G: int
    W: int
    T: int
    frac: float
    HQ: int = HQ
    frac_only: bool = False  # leaves the base in frac alone: the same shape as the base for swa and swa_sink

    def B(self, tokens: int) -> int:
        return max(1, tokens // self.T)

    def shape(self, op: str) -> tuple:
        return (self.D, self.G, self.W, self.T, self.HQ) + ((self.frac,) if op == "eviction_train" else ())


_TOKEN = re.compile(r"^(D|G|W|T|frac)(\d+(?:\.\d+)?)$")


def parse_point(name: str) -> Point:
    """``base`` or the axes that leave the base, e.g. ``D64-G8-W4096-T65536``, ``frac0.30``."""
    if name == "base":
        return Point(name, **BASE)
    values = dict(BASE)
    seen = []
    for token in name.split("-"):
        m = _TOKEN.match(token)
        if not m or m[1] in seen:
            raise ValueError(
                f"unknown point {name!r}; a point is 'base' or axis values joined by '-' "
                "(D, G, W, T as integers, frac in (0, 1), e.g. D64-G8-W4096-T65536 or frac0.30); --list shows "
                "the named points"
            )
        seen.append(m[1])
        values[m[1]] = float(m[2]) if m[1] == "frac" else int(float(m[2]))
    if not 0 < values["frac"] < 1 or min(values[k] for k in "DGWT") < 1 or HQ % values["G"]:
        raise ValueError(f"point {name!r}: needs frac in (0, 1), D, W, T >= 1 and G dividing HQ = {HQ}")
    return Point(name, **values, frac_only=seen == ["frac"])


def _value_name(axis: str, value) -> str:
    return f"{axis}{value:.2f}" if axis == "frac" else f"{axis}{value}"


def named_points() -> list[Point]:
    names = ["base"]
    names += [_value_name(a, v) for a, vs in AXES.items() for v in vs if v != BASE[a]]
    return [parse_point(n) for n in (*names, *CORNERS)]


SMOKE_POINTS = (  # tiny, with GQA, a window shorter than T, and sinks
    Point("smoke-a", D=32, G=1, W=16, T=64, frac=0.25, HQ=2),
    Point("smoke-b", D=32, G=2, W=32, T=128, frac=0.10, HQ=2),
)
SMOKE_TOKENS = 128


def list_points(points: list[Point], tokens: int) -> None:
    print("grid: " + "; ".join(f"{a} in {{{', '.join(str(v) for v in vs)}}}" for a, vs in AXES.items()))
    print(f"HQ = {HQ}, {tokens} tokens per call (B = tokens // T), sinks {SINKS}; base point " + _describe(BASE))
    print(f"ops: {', '.join(OPS)} (swa and swa_sink skip the points that differ from the base in frac alone)")
    print(f"{'point':26s} {'D':>4s} {'G':>2s} {'HKV':>3s} {'W':>5s} {'T':>6s} {'B':>3s} {'frac':>5s}  ops")
    for p in points:
        ops = "eviction_train" if p.frac_only else "all"
        print(
            f"{p.name:26s} {p.D:4d} {p.G:2d} {p.HQ // p.G:3d} {p.W:5d} {p.T:6d} {p.B(tokens):3d} {p.frac:5.2f}  {ops}"
        )


def _describe(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


# -- run ------------------------------------------------------------------------------------------------------


def _import_torch_and_kernels() -> None:
    """torch, the kernels and the helpers of attention.py and eviction.py, imported once the arguments are parsed
    and the device checked (``--help``, ``--list`` and a refusal stay fast; TRITON_INTERPRET is set before)."""
    global torch, attention, eviction
    import attention
    import eviction
    import torch

    attention._import_torch_and_kernels()
    eviction._import_torch_and_kernels()


def retained_keys(score):
    """eviction_train's keys visible past the window, bool [B, HKV, T]: score > 0, the first SINKS always."""
    retained = (score > 0).permute(0, 2, 1).contiguous()
    retained[:, :, :SINKS] = True
    return retained


class Sweep:
    def __init__(self, args, device: str):
        self.args, self.device = args, device
        self.cuda = device == "cuda"
        # Triton's interpreter computes bf16 dots wrongly (tests/kernels/test_swa.py): float32 on the CPU
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.rows: list[dict] = []  # this run's rows, written after every point
        self.notes: list[str] = []  # said once each, written with the results
        self.failures: list[str] = []
        self.ratios: dict[tuple[str, str], list[tuple[float | None, float, str]]] = {}
        self.fa4_how = ""  # how the current point's flash_attn anchor calls flash-attn 4 (its rows' note)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            print("note:", text, flush=True)

    # inputs and implementations ---------------------------------------------------------------------------

    def inputs(self, op: str, p: Point):
        B, HKV = p.B(self.args.tokens), p.HQ // p.G

        def make(H):
            return torch.randn(B, p.T, H, p.D, device=self.device, dtype=self.dtype, requires_grad=True)

        q, k, v = make(p.HQ), make(HKV), make(HKV)
        do = torch.randn_like(q)
        score = eviction.scores(B, p.T, HKV, p.frac) if op == "eviction_train" else None
        return q, k, v, do, score

    def ours(self, op: str, p: Point, q, k, v, do, score):
        """(fwd, fwdbwd) of mixerzoo: the public ops with autograd on the GPU; on the CPU the launchers (the
        public ops run the CPU reference on CPU tensors; the launchers run the kernels in the interpreter)."""
        S = 0 if op == "swa" else SINKS
        if self.cuda:
            if op == "eviction_train":
                attn = lambda q, k, v: eviction.eviction_attention(  # noqa: E731
                    q, k, v, score, window_size=p.W, capacity=CAPACITY, num_sinks=S, training=True
                )
            else:
                attn = lambda q, k, v: attention.swa_attention(q, k, v, window_size=p.W, num_sinks=S)  # noqa: E731
            return attention.fwd_bwd_fns(attn, q, k, v, do)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        if op == "eviction_train":
            from mixerzoo.kernels.eviction.attention import (
                eviction_attention_bwd,
                eviction_attention_fwd,
                eviction_intervals,
            )

            lists = eviction_intervals(score, window_size=p.W, capacity=CAPACITY, num_sinks=S, training=True)
            kw = dict(window_size=p.W, scale=p.D**-0.5, open_ended=True)

            def fwd_lse():
                return eviction_attention_fwd(qd, kd, vd, *lists, **kw)

            def fwdbwd():
                o, lse = fwd_lse()
                return eviction_attention_bwd(do, qd, kd, vd, o, lse, *lists, **kw)
        else:
            from mixerzoo.kernels.swa import swa_bwd, swa_fwd

            def fwd_lse():
                return swa_fwd(qd, kd, vd, p.W, S)

            def fwdbwd():
                o, lse = fwd_lse()
                return swa_bwd(do, qd, kd, vd, o, lse, p.W, S)

        return (lambda: fwd_lse()[0]), fwdbwd

    def flex(self, op: str, p: Point, q, k, v, do, score):
        """FlexAttention with the op's mask (attention.py's and eviction.py's masks, for any W, HQ and G): on the
        GPU compiled, with the block mask built here, outside the timing; on the CPU eager, forward only."""
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        W, G = p.W, p.G
        if op == "eviction_train":
            retained = retained_keys(score)

            def mask_mod(b, h, qi, ki):
                return (ki <= qi) & ((qi - ki < W) | retained[b, h // G, ki])

            B, H = q.shape[0], q.shape[2]  # the mask differs per sequence and head
        else:
            S = 0 if op == "swa" else SINKS

            def mask_mod(b, h, qi, ki):
                return (qi >= ki) & ((qi - ki < W) | (ki < S))

            B = H = None
        T = q.shape[1]
        if self.cuda:
            torch._dynamo.reset()  # a fresh compile per point and mask, clear of dynamo's recompile limit
        # compiled, the mask is built block by block (the dense T x T mask at T = 65536 would take GBs)
        block_mask = create_block_mask(mask_mod, B, H, T, T, device=self.device, _compile=self.cuda)
        if self.cuda:
            fn = torch.compile(flex_attention, dynamic=False)
        else:
            import warnings

            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            fn = flex_attention

        def attn(q, k, v):  # flex takes [B, H, T, D]
            o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=G > 1)
            return o.transpose(1, 2)

        if self.cuda:
            return attention.fwd_bwd_fns(attn, q, k, v, do)
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # no backward on the CPU: inputs without grad
        return (lambda: attn(qd, kd, vd)), None

    def flash_attn(self, op: str, p: Point, q, k, v, do, score):
        """flash-attn 4 on the GPU (None, noted, on the CPU or when it does not import): swa as its causal window
        (W - 1, 0); swa_sink and eviction_train as a mask_mod with flex's mask and block sparsity, the block lists
        built here, outside the timing. Sets ``self.fa4_how``, the row note's account of the call."""
        if not self.cuda:
            self.note("no flash_attn rows: flash-attn 4 needs a CUDA GPU")
            return None
        if op == "swa":
            fa4 = attention._fa4_attn(p.W, self.notes)
            self.fa4_how = "flash_attn.cute.flash_attn_func causal, window_size=(W - 1, 0)"
        else:
            retained = retained_keys(score) if op == "eviction_train" else None
            T, D = q.shape[1], q.shape[3]
            built = attention._fa4_masked(op, T, D, p.W, SINKS, p.G, retained, self.notes)
            fa4, self.fa4_how = built or (None, None)
        return None if fa4 is None else attention.fwd_bwd_fns(fa4, q, k, v, do)

    # timing -----------------------------------------------------------------------------------------------

    def time(self, fn) -> float:
        a = self.args
        if self.cuda:
            return time_ms(fn, warmup=a.warmup, repeat=a.repeat)
        from mixerzoo.bench.timing import time_ms as time_ms_on

        return time_ms_on(fn, torch.device("cpu"), warmup=a.warmup, repeat=a.repeat)

    def point(self, op: str, p: Point) -> list[dict]:
        """Guard, then time one point of one op; returns its rows."""
        torch.manual_seed(0)
        x = self.inputs(op, p)
        q, k, _, _, score = x
        B, S = q.shape[0], 0 if op == "swa" else SINKS
        shape = dict(point=p.name, B=B, T=p.T, HQ=p.HQ, HKV=k.shape[2], D=p.D, W=p.W, S=S)
        extra = ""
        if op == "eviction_train":
            shape["frac"] = p.frac
            kept = (score > 0).float()
            kept[:, :S] = 1
            extra = f"; {kept.mean().item():.1%} of keys retained (sinks included)"
            extra += "; the op builds its key lists in the timed call" if self.cuda else ""
        where = f"{op} {p.name} B={B} T={p.T}"
        impls = {"mixerzoo": self.ours(op, p, *x)}
        for name in self.args.anchors:
            try:
                fns = getattr(self, name)(op, p, *x)
            except Exception as e:
                traceback.print_exc()
                self.note(f"{where}: {name} not built: {type(e).__name__}: {str(e)[:200]}")
                continue
            if fns is not None:
                impls[name] = fns

        # the guard: every anchor's forward output against ours, before anything is timed
        with torch.no_grad():
            try:
                ours_o = impls["mixerzoo"][0]()
            except Exception as e:
                traceback.print_exc()
                self.failures.append(f"{where}: mixerzoo failed: {type(e).__name__}: {str(e)[:200]}")
                return [dict(op=ROW_OP[op], impl="mixerzoo", **shape, note=f"FAILED: {type(e).__name__}")]
            errs = {}
            for name in [n for n in impls if n != "mixerzoo"]:
                try:
                    errs[name] = rel_rmse(impls[name][0]().float(), ours_o.float())
                except Exception as e:
                    traceback.print_exc()
                    self.note(f"{where}: {name} failed: {type(e).__name__}: {str(e)[:200]}")
                    del impls[name]
        if "flex" in errs and not errs["flex"] <= GUARD:
            msg = f"{where}: mixerzoo vs flex output rel RMSE {errs['flex']:.2e} > {GUARD:.0e}, not timed"
            print("FAIL", msg, flush=True)
            self.failures.append(msg)
            return [dict(op=ROW_OP[op], impl="mixerzoo", **shape, note=f"FAILED guard: {msg}")]
        for name, err in list(errs.items()):
            if not err <= GUARD:  # flex agrees with ours: this anchor is the odd one out
                self.note(f"{where}: {name} output differs from mixerzoo's and flex's (rel RMSE {err:.2e}), not timed")
                del impls[name]

        # rounds: the implementations in turn, so that a drift of the clocks hits all of them alike
        runs: dict[str, tuple[list, list]] = {name: ([], []) for name in impls}
        for _ in range(self.args.rounds):
            for name, (fwd, fwdbwd) in list(impls.items()):
                try:
                    with torch.no_grad():
                        runs[name][0].append(self.time(fwd))
                    if fwdbwd is not None:
                        runs[name][1].append(self.time(fwdbwd))
                except Exception as e:
                    traceback.print_exc()
                    msg = f"{where}: {name} failed while timed: {type(e).__name__}: {str(e)[:200]}"
                    if name == "mixerzoo":
                        self.failures.append(msg)
                        return [dict(op=ROW_OP[op], impl="mixerzoo", **shape, note=f"FAILED: {msg}")]
                    self.note(msg)
                    del impls[name], runs[name]
        rows = []
        for name, (fwd_ms, fb_ms) in runs.items():
            row = dict(op=ROW_OP[op], impl=name, **shape, fwd_ms=round(statistics.median(fwd_ms), 4))
            if fb_ms:
                row["fwdbwd_ms"] = round(statistics.median(fb_ms), 4)
                mem = peak_mem_mb(impls[name][1]) if self.cuda else None
                if mem is not None:
                    row["peak_mem_mb"] = round(mem, 1)
            rounds = f", median of {self.args.rounds} rounds" if self.args.rounds > 1 else ""
            if name == "mixerzoo":
                check = f"rel RMSE vs flex {errs['flex']:.1e}" if "flex" in errs else "unchecked (no flex output)"
                note = f"{str(self.dtype).removeprefix('torch.')}; guard: {check}{extra}{rounds}"
            elif name == "flex":
                how = "compiled, block mask built outside the timing" if self.cuda else "eager, forward only (CPU)"
                note = f"FlexAttention, same mask, {how}{rounds}"
            else:
                note = f"{self.fa4_how}; rel RMSE vs mixerzoo {errs[name]:.1e}{rounds}"
            rows.append(dict(row, note=note))
        return rows

    def ratios_line(self, op: str, p: Point, rows: list[dict]) -> str:
        ours = next(r for r in rows if r["impl"] == "mixerzoo")
        parts = []
        for r in rows:
            if r["impl"] == "mixerzoo" or "fwd_ms" not in ours:
                continue
            f = r["fwd_ms"] / ours["fwd_ms"]
            fb = r["fwdbwd_ms"] / ours["fwdbwd_ms"] if "fwdbwd_ms" in r and "fwdbwd_ms" in ours else None
            self.ratios.setdefault((op, r["impl"]), []).append((fb, f, p.name))
            parts.append(f"{r['impl']}/ours fwd {f:.2f}x fwd+bwd " + ("-" if fb is None else f"{fb:.2f}x"))
        return "; ".join(parts) or ("FAILED" if "fwd_ms" not in ours else "no anchor")

    # results ----------------------------------------------------------------------------------------------

    def write(self) -> pathlib.Path:
        ops = {ROW_OP[op] for op in self.args.ops}  # every op of the run: one $OUT/results-<ops>.json name throughout
        extra = {"sweep_notes": self.notes}
        if self.args.json is None:
            return write_results(ops, self.rows, extra, replace_by=REPLACE_BY)
        path = pathlib.Path(self.args.json)
        old = json.loads(path.read_text()) if path.exists() else {}
        kept = [r for r in old.get("rows", []) if not _replaced(r, ops, self.rows, REPLACE_BY)]
        import triton

        doc = {
            **old,
            "device": torch.cuda.get_device_name() if self.cuda else "cpu (Triton interpreter)",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "date": datetime.date.today().isoformat(),
            "timing": TIMING if self.cuda else "wall clock, CPU (the smoke figures mean nothing)",
            **extra,
            "rows": kept + self.rows,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return path

    def run(self, units: list[tuple[Point, str]]) -> int:
        t0 = time.time()
        took: list[float] = []
        path = None
        for i, (p, op) in enumerate(units):
            left = self.args.max_seconds - (time.time() - t0) if self.args.max_seconds else None
            if left is not None and took and left < statistics.mean(took):
                rest = units[i:]
                print(
                    f"\nbudget: stopped after {time.time() - t0:.0f} s of {self.args.max_seconds:.0f} s; not measured:"
                )
                print("  " + ", ".join(f"{q.name} {o}" for q, o in rest))
                points = ",".join(dict.fromkeys(q.name for q, _ in rest))
                ops = ",".join(o for o in OPS if any(o == u for _, u in rest))
                print(f"  resume with: --points {points} --ops {ops}", flush=True)
                break
            start = time.time()
            try:
                rows = self.point(op, p)
            except Exception as e:  # e.g. out of memory building the inputs: the other points go on
                traceback.print_exc()
                self.failures.append(f"{op} {p.name}: {type(e).__name__}: {str(e)[:200]}")
                rows = []
            took.append(time.time() - start)
            if rows:
                line = self.ratios_line(op, p, rows)
                print(f"{op:14s} {p.name:24s} B={rows[0]['B']:<3d} {line}  ({took[-1]:.0f} s)", flush=True)
                self.rows += rows
                # each point as it is measured: a run stopped by a time limit keeps what it measured
                path = self.write()
            if self.cuda:
                torch.cuda.empty_cache()
        print()
        print_rows(self.rows)
        print()
        self.print_ratios()
        if self.notes:
            print("\nnotes:\n  " + "\n  ".join(self.notes))
        if self.failures:
            print("\nFAILED:\n  " + "\n  ".join(self.failures))
        if path is not None:
            print("\nwrote", path)
        return 1 if self.failures else 0

    def print_ratios(self) -> None:
        """Per (op, anchor): the worst (lowest) and best anchor / ours ratio over the points measured."""
        print("anchor time / mixerzoo's (> 1: mixerzoo faster), over the points measured")
        head = ["op", "anchor", "points", "worst fwd+bwd", "best fwd+bwd", "worst fwd", "best fwd"]
        lines = [head]
        for (op, anchor), rs in self.ratios.items():
            fb = [(r, n) for r, _, n in rs if r is not None]
            f = [(r, n) for _, r, n in rs]

            def cell(pairs, pick):
                return "-" if not pairs else "{:.2f}x ({})".format(*pick(pairs))

            lines.append([op, anchor, str(len(rs)), cell(fb, min), cell(fb, max), cell(f, min), cell(f, max)])
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
        if len(lines) == 1:
            print("(no anchor measured)")


def print_rows(rows: list[dict]) -> None:
    cols = ["op", "impl", "point", "B", "T", "HQ", "HKV", "D", "W", "S", "frac", "fwd_ms", "fwdbwd_ms", "peak_mem_mb"]
    cols = [c for c in cols if any(c in r for r in rows)]
    if not rows:
        print("(no rows)")
        return
    widths = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


# -- arguments ------------------------------------------------------------------------------------------------


def _list_of(kind, name: str):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a comma-separated list, got {text!r}") from None

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--list",
        action="store_true",
        help="print the grid and the points chosen (default all named), and exit (no GPU)",
    )
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)} (default all)")
    ap.add_argument("--points", help="comma-separated point names (default: every named point; --list shows them)")
    for axis, values in AXES.items():
        kind = float if axis == "frac" else int
        ap.add_argument(
            f"--{axis}",
            type=_list_of(kind, f"--{axis}"),
            metavar="V,...",
            help=f"keep the points with {axis} among these values (grid: {', '.join(str(v) for v in values)})",
        )
    ap.add_argument(
        "--anchors",
        default=",".join(ANCHORS),
        help=f"comma-separated, of {', '.join(ANCHORS)} (default both; without flex the guard is skipped)",
    )
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per call, B = tokens // T (default 65536)")
    ap.add_argument("--rounds", type=int, help="rounds per point, each figure the median round (default 2; smoke 1)")
    ap.add_argument("--repeat", type=int, help="timed calls per figure (default 20; smoke 1)")
    ap.add_argument("--warmup", type=int, help="calls before the timed ones (default 5; smoke 0)")
    ap.add_argument(
        "--max-seconds",
        type=float,
        help="stop between points once the next one would likely end past this many seconds from the start",
    )
    ap.add_argument("--json", metavar="PATH", help="merge the rows into PATH instead of benchmarks/results/<gpu>.json")
    ap.add_argument("--smoke", action="store_true", help="two tiny points, on the CPU without a GPU; rows to --json")
    args = ap.parse_args(argv)

    args.ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in args.ops if o not in OPS]
    if unknown or not args.ops:
        ap.error(f"--ops: unknown op(s) {','.join(unknown)}; the ops are {', '.join(OPS)}")
    args.anchors = [a for a in args.anchors.split(",") if a]
    unknown = [a for a in args.anchors if a not in ANCHORS]
    if unknown:
        ap.error(f"--anchors: unknown anchor(s) {','.join(unknown)}; the anchors are {', '.join(ANCHORS)}")
    for name in ("rounds", "repeat", "tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup is not None and args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_seconds is not None and args.max_seconds <= 0:
        ap.error(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.smoke:
        given = [f"--{n}" for n in ("points", *AXES) if getattr(args, n) is not None]
        if given:
            ap.error(f"--smoke runs its two tiny points, got also {' '.join(given)}")
        args.points, args.tokens = list(SMOKE_POINTS), SMOKE_TOKENS
        args.json = args.json or str(pathlib.Path(tempfile.mkdtemp(prefix="sweep-smoke-")) / "sweep-smoke.json")
    else:
        try:
            points = [parse_point(n) for n in args.points.split(",") if n] if args.points else named_points()
        except ValueError as e:
            ap.error(f"--points: {e}")
        for axis in AXES:
            keep = getattr(args, axis)
            if keep is not None:
                points = [p for p in points if getattr(p, axis) in keep]
        if not points and not args.list:
            ap.error("no point left: the axis filters exclude every point chosen")
        args.points = points
    defaults = (1, 1, 0) if args.smoke else (2, 20, 5)
    for name, default in zip(("rounds", "repeat", "warmup"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def units_of(args) -> list[tuple[Point, str]]:
    """(point, op) in run order, point by point; an op's repeat of a shape is left out (swa and swa_sink do not
    see frac)."""
    units, seen = [], set()
    for p in args.points:
        for op in args.ops:
            if op != "eviction_train" and p.frac_only:
                continue
            if (op, p.shape(op)) not in seen:
                seen.add((op, p.shape(op)))
                units.append((p, op))
    return units


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        list_points(args.points, args.tokens)
        return 0
    if args.smoke:
        device = "cpu" if interpret_without_gpu("sweep.py") else "cuda"
    else:
        mode = " ".join(sys.argv[1:] if argv is None else argv) or "(the sweep)"
        require_gpu("sweep.py", mode, cpu="sweep.py --smoke")
        device = "cuda"
    _import_torch_and_kernels()
    eviction.DEV = device  # eviction.scores() draws on it
    if device == "cuda":
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    units = units_of(args)
    if not units:
        refuse("sweep.py: no (point, op) to run: the points chosen differ from the base in frac alone, which swa "
               "and swa_sink do not see")  # fmt: skip
    print(f"{len(units)} (point, op) to run, {args.rounds} round(s) each; anchors: {', '.join(args.anchors)}")
    return Sweep(args, device).run(units)


if __name__ == "__main__":
    sys.exit(main())
