"""End-to-end training speed of hybrid language models, as a user trains them (mixerzoo.training.Trainer: bf16
autocast on CUDA, AdamW, gradient clipping, and the sparsity controller of the eviction layers): by default a
12-layer (gdn eviction_swa)*6 model against the same stack with plain sliding-window layers, (gdn swa)*6, in
tokens per second, both in the same run on the same random tokens.

    python benchmarks/train_e2e.py                  # hidden 2048, 16 heads, T 8192, B 2, vocabulary 32000
    python benchmarks/train_e2e.py --retained init  # the eviction stack only as initialised (no band row)
    python benchmarks/train_e2e.py --profile 25     # also the device time of one step by kernel, top 25 per model,
                                                    # and the 25 kernels whose time differs most from the last model's
    python benchmarks/train_e2e.py --profile-sites 40  # the device time of a step by (operator, call site): the
                                                    # mixerzoo line or autograd node that launched it, each model
                                                    # against the last (the CPU time in a --smoke run)
    python benchmarks/train_e2e.py --smoke          # a tiny run on the CPU: the plumbing, no figures

Each model is timed over --steps optimiser steps queued back to back (CUDA events, median step) after --warmup
steps, in --rounds rounds that take every model in turn (every model is built first; the order reverses every
other round), so that the GPU's clocks drifting over the run (seen: the same GEMMs 5-10% apart in two runs) reach
every model alike; the figure is the median round, and rows list every round's (``rounds_ms``). Rows op
``train_e2e`` (impl: the pattern; ``tokens_per_s``, ``step_ms``, ``peak_mem_mb``) go to results/<gpu>.json; each
row but the last pattern's notes its tokens/s as a fraction of the last's (the aim for the eviction stack: within
10% of the sliding-window one).

How many tokens the eviction routers retain sets the training attention's work: every retained key stays visible
to all later queries, so a router that retains everything makes it causal attention over the whole sequence. A
fresh router does nearly that (its output bias starts at +0.5); the sparsity controller then holds each layer
near its band, about ``capacity`` tokens per training sequence. ``--retained`` times a model with eviction
layers in each of these states: ``init`` as built, ``band`` with each router's output bias shifted so that a
fraction capacity / T of the benchmark batch's tokens is retained (what training spends most of its steps at),
or a fraction such as ``0.1``. Rows carry ``retained``, the fraction measured after the timed steps (and
``retained_start``, the one set).

The steps run at a learning rate of 1e-12 by default (``--lr``): every kernel of the step runs, the optimizer's
too, but no weight moves (an AdamW update of about 1e-12 is below float32's resolution of the weights), so the
router state timed is the one set. At a learning rate that trains, the routers of a model fitting these random
tokens move within a few dozen steps (from the band's 6.25% to 0.05% retained, seen on an H200 at 1e-3), and the
attention's work with them: a timing that mixes router states.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import finish, peak_mem_mb, refuse, require_gpu, time_ms  # noqa: E402

SMOKE = dict(hidden=64, heads=2, T=64, B=2, vocab=128, steps=2, warmup=1, rounds=2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="train_e2e.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--patterns", default="(gdn eviction_swa)*6,(gdn swa)*6", help="comma-separated, at least one")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--T", type=int, default=8192, help="tokens per sequence")
    ap.add_argument("--B", type=int, default=2, help="sequences per step")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timing rounds, each over every model in turn; the figure is the median round (default 3)",
    )
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the N kernels of a step by device time")
    ap.add_argument(
        "--profile-sites",
        type=int,
        default=0,
        metavar="N",
        help="print the N (operator, call site) pairs whose device time in a step differs most from the last model's",
    )
    ap.add_argument(
        "--retained",
        default="init,band",
        help="comma-separated router states for models with eviction layers: init, band, or a fraction in (0, 1] "
        "(default init,band)",
    )
    ap.add_argument(
        "--lr",
        type=float,
        default=1e-12,
        help="the steps' peak learning rate (default 1e-12: the weights, and so the router state, stay as set)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: hidden 64, 2 heads, T 64, B 2")
    args = ap.parse_args(argv)
    states = []
    for item in (x.strip() for x in args.retained.split(",")):
        if item in ("init", "band"):
            states.append(item)
            continue
        try:
            frac = float(item)
        except ValueError:
            frac = -1.0
        if not 0.0 < frac <= 1.0:
            refuse(f"train_e2e.py: --retained takes init, band or a fraction in (0, 1], got {item!r}")
        states.append(frac)
    if not states:
        refuse(f"train_e2e.py: --retained needs at least one state, got {args.retained!r}")
    args.retained = states
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    if not patterns:
        refuse(f"train_e2e.py: --patterns needs at least one pattern, got {args.patterns!r}")
    args.patterns = patterns
    for name in ("hidden", "heads", "T", "B", "vocab", "steps", "rounds"):
        if getattr(args, name) < 1:
            refuse(f"train_e2e.py: --{name} must be >= 1, got {getattr(args, name)}")
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def _trainer(torch, pattern: str, args, device):
    from mixerzoo.models import HybridLM, HybridLMConfig
    from mixerzoo.training import TrainConfig, Trainer

    torch.manual_seed(0)
    cfg = HybridLMConfig(pattern=pattern, vocab_size=args.vocab, hidden_size=args.hidden, num_heads=args.heads)
    lm = HybridLM.from_config(cfg)
    steps = args.rounds * (args.warmup + args.steps) + 8  # timing, peak memory and the profiles take steps
    train = TrainConfig(steps=steps, batch_size=args.B, seq_len=args.T, warmup=1, log_every=0, lr=args.lr)
    return Trainer(lm, None, train, device=device, log=lambda s: None), sum(p.numel() for p in lm.parameters())


def _eviction_layers(model) -> list:
    """The model's eviction_swa layers with a learned router."""
    from mixerzoo.mixers.eviction_swa import EvictionSWA

    return [m for m in model.modules() if isinstance(m, EvictionSWA) and m.router is not None]


def _retain(torch, trainer, inputs, state) -> None:
    """Shift each eviction router's output bias so that the fraction ``state`` ("band": capacity / T) of the
    tokens of ``inputs`` is retained (router logit z > 0), layer after layer in order (a layer's input depends on
    the ones before it), in the training-mode forward the steps run."""
    model = trainer.model
    for m in _eviction_layers(model):
        frac = min(1.0, m.config.capacity / inputs.shape[1]) if state == "band" else float(state)
        got = {}
        hook = m.router.register_forward_hook(lambda mod, a, out, got=got: got.__setitem__("z", out.detach().float()))
        try:
            with torch.no_grad(), trainer._autocast():
                model.train()
                model(inputs)
        finally:
            hook.remove()
        z = got["z"]  # [B, T, H] logits, H = 1 for a shared router
        per_head = z.flatten(0, 1).T if m.router.out.bias.numel() > 1 else z.reshape(1, -1)  # [G, B*T]
        cut = torch.quantile(per_head, 1.0 - frac, dim=1)
        with torch.no_grad():
            m.router.out.bias -= cut.to(m.router.out.bias.dtype)
    with torch.no_grad(), trainer._autocast():
        model(inputs)  # the routers' retained flags as set, for the row's retained_start


def _retained_fraction(model) -> float | None:
    layers = [m for m in _eviction_layers(model) if m.router_retained is not None]
    if not layers:
        return None
    return round(sum(float(m.router_retained.float().mean()) for m in layers) / len(layers), 4)


def _profile(torch, name: str, step, top: int) -> dict[str, tuple[float, int]]:
    """Print the ``top`` kernels of one step by device time; return every kernel's (ms, calls) by name."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60)
    print(f"--- {name}: device time of one training step by kernel (top {top})\n{table}", flush=True)
    # self_device_time_total is in microseconds; kernels only (no host-side operator rows)
    return {e.key: (e.self_device_time_total / 1e3, e.count) for e in events if e.self_device_time_total > 0}


def _sites(torch, step, cuda: bool) -> dict[str, tuple[float, int]]:
    """One step under the profiler with Python stacks: the time of the kernels each operator launched itself
    (device time; CPU time on the CPU), summed by (operator, call site), the call site being the innermost mixerzoo
    source line above it, or the autograd node that ran it in the backward (which has no Python stack)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts, with_stack=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if not cuda:
        return _cpu_sites(torch, prof)
    out: dict[str, tuple[float, int]] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU or "::" not in e.name:  # operators, not Python frames
            continue
        ms = e.self_device_time_total / 1e3
        if ms <= 0:
            continue
        site, p = "(no mixerzoo frame)", e.cpu_parent
        while p is not None:
            if _is_site(p.name):
                site = _site_name(p.name)
                break
            p = p.cpu_parent
        key = f"{e.name} @ {site}"
        t, n = out.get(key, (0.0, 0))
        out[key] = (t + ms, n + 1)
    return out


def _is_site(name: str) -> bool:
    return "mixerzoo/" in name or name.startswith("autograd::engine::evaluate_function")


def _site_name(name: str) -> str:
    return name.split("mixerzoo/")[-1].removeprefix("autograd::engine::evaluate_function: ")


def _cpu_sites(torch, prof) -> dict[str, tuple[float, int]]:
    """``_sites`` on the CPU: self CPU time by (operator, call site), from the profiler's raw events, nested by
    their time ranges on each thread in one pass. The CPU references launch ~10^5 operators in a step, and the
    profiler's own event tree (``prof.events()``) takes ~10 s and ~0.5 GB per 10^5 of them; this takes ~1 s.
    An operator nested directly in one of its own name (an overload calling another) counts as one call."""
    events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: (e.start_thread_id(), e.start_ns(), -e.duration_ns()))
    # nodes: [name, self ns, its call site, the call site of what runs inside it]; open: (end ns, thread, node)
    nodes: list[list] = []
    open_: list[tuple[int, int, int]] = []
    for e in events:
        start, thread, name = e.start_ns(), e.start_thread_id(), e.name()
        end = start + e.duration_ns()
        while open_ and (open_[-1][1] != thread or open_[-1][0] <= start):
            open_.pop()
        parent = open_[-1][2] if open_ else None
        if parent is not None and nodes[parent][0] == name:
            open_.append((end, thread, parent))
            continue
        site = nodes[parent][3] if parent is not None else "(no mixerzoo frame)"
        if parent is not None:
            nodes[parent][1] -= e.duration_ns()
        open_.append((end, thread, len(nodes)))
        nodes.append([name, e.duration_ns(), site, _site_name(name) if _is_site(name) else site])
    out: dict[str, tuple[float, int]] = {}
    for name, ns, site, _ in nodes:
        if "::" in name and ns > 0:  # operators, not Python frames
            key = f"{name} @ {site}"
            t, n = out.get(key, (0.0, 0))
            out[key] = (t + ns / 1e6, n + 1)
    return out


def _profile_diff(name: str, mine: dict, base_name: str, base: dict, top: int, what: str = "kernel") -> None:
    """The entries (kernels, or operators by call site) whose time in one step differs most between two models,
    largest difference first: where a model's extra time goes (an entry only one model has shows 0 on the other)."""
    diff = {k: mine.get(k, (0.0, 0))[0] - base.get(k, (0.0, 0))[0] for k in set(mine) | set(base)}
    total = sum(t for t, _ in mine.values()) - sum(t for t, _ in base.values())
    print(f"--- {name} against {base_name}: {total:+.2f} ms of device time per step; by {what} (top {top})")
    print(f"{'ms diff':>9} {'ms':>8} {'calls':>6} {'base ms':>8} {'calls':>6}  {what}")
    for k in sorted(diff, key=lambda k: -abs(diff[k]))[:top]:
        (a, na), (b, nb) = mine.get(k, (0.0, 0)), base.get(k, (0.0, 0))
        print(f"{diff[k]:+9.3f} {a:8.3f} {na:6d} {b:8.3f} {nb:6d}  {k[:90]}")
    print(flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke:
        require_gpu("train_e2e.py", "(the default mode)", cpu="train_e2e.py --smoke")
    import torch

    device = torch.device("cpu" if args.smoke else "cuda")
    runs = []  # every (model, router state), built before any is timed, so that the rounds alternate them
    for pattern in args.patterns:
        trainer, params = _trainer(torch, pattern, args, device)
        # a model with learned eviction routers is timed in each router state, each time freshly built
        states = args.retained if _eviction_layers(trainer.model) else [None]
        for n, state in enumerate(states):
            if n:
                trainer, params = _trainer(torch, pattern, args, device)
            g = torch.Generator().manual_seed(1)
            inputs = torch.randint(0, args.vocab, (args.B, args.T), generator=g).to(device)
            batch = (inputs, torch.roll(inputs, -1, 1))
            start = None
            if state not in (None, "init"):
                _retain(torch, trainer, inputs, state)
                start = _retained_fraction(trainer.model)

            def step(trainer=trainer, batch=batch):
                return trainer.train_step(batch, sync=False)

            label = f"{pattern} (routers: {state})" if state else pattern
            print(f"built {label}: {params:,} parameters", flush=True)
            runs.append(dict(pattern=pattern, state=state, label=label, trainer=trainer, params=params, step=step,
                             start=start, times=[]))  # fmt: skip
    # rounds: each times every run in turn (in reverse order every other round), so that a drift of the GPU's
    # clocks over the run reaches every model alike; the figure is the median over the rounds
    for r in range(args.rounds):
        for run in runs if r % 2 == 0 else runs[::-1]:
            step = run["step"]
            if args.smoke:
                times = []
                for i in range(args.warmup + args.steps):
                    t0 = time.perf_counter()
                    loss = step()["loss"]
                    if i >= args.warmup:
                        times.append((time.perf_counter() - t0) * 1e3)
                if not bool(torch.isfinite(loss)):
                    raise RuntimeError(f"train_e2e.py: {run['pattern']}: the loss is not finite")
                run["times"].append(statistics.median(times))
            else:
                run["times"].append(time_ms(step, warmup=args.warmup, repeat=args.steps))
            print(f"round {r + 1}/{args.rounds}: {run['label']} {run['times'][-1]:.2f} ms per step", flush=True)
    rows, profiles, site_profiles = [], [], []
    for run in runs:
        step, trainer, state, label = run["step"], run["trainer"], run["state"], run["label"]
        ms = statistics.median(run["times"])
        mem = None if args.smoke else round(peak_mem_mb(step), 1)
        if args.profile and not args.smoke:
            profiles.append((label, _profile(torch, label, step, args.profile)))
        if args.profile_sites:
            site_profiles.append((label, _sites(torch, step, cuda=not args.smoke)))
        row = dict(
            op="train_e2e",
            impl=run["pattern"],
            B=args.B,
            T=args.T,
            H=args.heads,
            hidden=args.hidden,
            step_ms=round(ms, 2),
            tokens_per_s=round(args.B * args.T / ms * 1e3),
            params=run["params"],
            note=f"vocabulary {args.vocab}; Trainer: "
            + ("float32 on the CPU" if args.smoke else "bf16 autocast, AdamW, grad clip 1")
            + f", learning rate {args.lr:g}; median of {args.rounds} rounds (each the median step of queued steps)",
            rounds_ms=[round(t, 2) for t in run["times"]],
        )
        if state is not None:
            row["routers"] = state if isinstance(state, str) else f"fraction {state}"
            row["retained"] = _retained_fraction(trainer.model)
            if run["start"] is not None:
                row["retained_start"] = run["start"]
        if mem is not None:
            row["peak_mem_mb"] = mem
        rows.append(row)
        print(row, flush=True)
        del run["trainer"], run["step"], trainer, step  # free the model (step holds it too)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[-1]
    for r in rows[:-1]:
        frac = r["tokens_per_s"] / base["tokens_per_s"]
        r["note"] += f"; {frac:.3f}x the tokens/s of {base['impl']}"
        kept = f" (routers {r['routers']}, {r['retained']:.1%} retained)" if "routers" in r else ""
        print(f"{r['impl']}{kept}: {frac:.3f}x the tokens/s of {base['impl']}", flush=True)
    for label, prof in profiles[:-1]:
        _profile_diff(label, prof, *profiles[-1], args.profile)
    for label, prof in site_profiles[:-1]:
        _profile_diff(label, prof, *site_profiles[-1], args.profile_sites, what="operator @ call site")
    return finish("train_e2e", rows, args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
