"""Command line: ``python -m mixerzoo list`` (registered mixers) and ``python -m mixerzoo demo`` (a small
hybrid LM: prefill, compiled decode, state sizes, tokens/s and the decode-vs-parallel error)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import torch

from .models.config import PRESETS

__all__ = ["DEFAULT_PATTERN", "Progress", "main"]

# The pattern of the demo's default preset.
DEFAULT_PATTERN = PRESETS["demo"].pattern

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


# --------------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, footer: Sequence[Any] | None = None) -> str:
    """A plain-text table; numbers right-aligned, everything else left-aligned."""
    cells = [[str(c) for c in r] for r in [headers, *rows, *([footer] if footer else [])]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(cells[0]), rule, *(line(r) for r in cells[1 : len(rows) + 1])]
    if footer:
        out += [rule, line(cells[-1])]
    return "\n".join(out)


class Progress:
    """A dependency-free progress bar on stderr: ``update(done)`` with the count done so far.

    On a terminal it redraws one line in place (at most every ``min_interval`` seconds); elsewhere (a log
    file, a pipe) it writes a line every ``log_interval`` seconds and the final one, so that logs stay short
    and a run stopped from outside still shows how far it got.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", file: TextIO | None = None, width: int = 24):
        self.total, self.desc, self.unit, self.width = total, desc, unit, width
        self.file = sys.stderr if file is None else file
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.done = 0
        self._last_draw = 0.0 if self.tty else self.start
        self.min_interval = 0.1
        self.log_interval = 30.0

    def render(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return (
            f"{self.desc} [{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} "
            f"{elapsed:5.1f}s {rate:7.1f} {self.unit}/s"
        )

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if self.tty and (now - self._last_draw >= self.min_interval or done >= self.total):
            self._last_draw = now
            self.file.write("\r" + self.render())
            self.file.flush()
        elif not self.tty and done < self.total and now - self._last_draw >= self.log_interval:
            self._last_draw = now
            self.file.write(self.render() + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.write(("\r" if self.tty else "") + self.render() + "\n")
        self.file.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _status(msg: str, file: TextIO | None = None) -> Iterator[None]:
    """``msg ...`` on stderr, then ``done in 1.2s`` when the block ends (for steps that take seconds)."""
    file = sys.stderr if file is None else file
    file.write(f"{msg} ...")
    file.flush()
    start = time.perf_counter()
    try:
        yield
    finally:
        file.write(f" done in {time.perf_counter() - start:.1f}s\n")
        file.flush()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def import_all(targets: Sequence[str], prog: str) -> bool:
    """Import every ``--import`` target (module or .py path); on a failure print why on stderr and
    return False."""
    from .registry import import_mixers

    for target in targets:
        try:
            import_mixers(target)
        except ImportError as e:
            cause = e.__cause__
            if cause is not None and not isinstance(cause, ModuleNotFoundError):
                # an error raised inside the imported module: its traceback says where
                traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
            why = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).removeprefix("import_mixers: ")
            print(f"{prog}: --import {target} failed: {why}", file=sys.stderr)
            return False
    return True


def _parse_value(key: str, text: str) -> Any:
    """A ``--set KEY=VALUE`` value, read as a pattern override is (``true``, ``none``, numbers, quoted strings)."""
    from .registry import PatternError, parse_pattern

    try:
        return parse_pattern(f"x[{key}={text}]")[0].overrides[key]
    except PatternError as e:
        # the message's column and caret point into the pattern built here, not into anything typed
        reason = str(e).splitlines()[0].rsplit(" at column ", 1)[0]
        raise ValueError(f"--set {key}={text}: {reason}") from None


# --------------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from . import registry

    if not import_all(args.imports, args.prog):
        return 2
    names = registry.names()
    if not names:
        print("no mixers registered")
        return 0
    rows = []
    for name in names:
        s = registry.spec(name)
        rows.append(
            [
                name,
                ",".join(s.aliases) or "-",
                s.state_growth,
                "yes" if s.decode else "no",
                "yes" if s.padding else "no",
                "yes" if s.gqa else "no",
                ",".join(_SHORT.get(d, str(d)) for d in s.dtypes),
                "yes" if s.compile_safe else "no",
                "yes" if s.train_differs else "no",
                ",".join(s.backends) or "-",
            ]
        )
    headers = ["mixer", "aliases", "state", "decode", "padding", "gqa", "dtypes", "compile", "train!=eval", "backends"]
    print(format_table(headers, rows))
    if args.fields:
        for name in names:
            s = registry.spec(name)
            print(f"\n{name} ({s.config.__module__}.{s.config.__qualname__}):")
            docs = s.field_docs()
            lhs = [f"{field}={default}" if default is not None else f"{field} (required)" for field, default, _ in docs]
            width = max(len(t) for t in lhs)
            for left, (_, _, meaning) in zip(lhs, docs, strict=True):
                print(f"  {left:<{width}}  {meaning}")
    return 0


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from . import registry
    from .models import HybridLM, HybridLMConfig

    if not import_all(args.imports, args.prog):
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("demo: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    if min(B, P, N) < 1:
        print("demo: --batch, --prompt-len and --new-tokens must be >= 1", file=sys.stderr)
        return 2

    # The preset gives every setting; a flag given on the command line replaces the preset's value.
    cfg = HybridLMConfig.from_preset(args.preset)
    changes = {
        field: value
        for field, value in (
            ("pattern", args.pattern),
            ("hidden_size", args.hidden),
            ("num_heads", args.heads),
            ("mlp_ratio", args.mlp_ratio),
            ("vocab_size", args.vocab),
        )
        if value is not None
    }
    # --set KEY=VALUE is strict: a key that no layer takes is an error.
    strict: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"demo: --set takes KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        try:
            strict[key.strip()] = _parse_value(key.strip(), value.strip())
        except ValueError as e:
            print(f"demo: {e}", file=sys.stderr)
            return 2
    pattern = changes.get("pattern", cfg.pattern)
    try:
        specs = [registry.spec(layer.name) for layer in registry.parse_pattern(pattern)]
    except (KeyError, ValueError, TypeError) as e:
        print(f"demo: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    fields = {f for s in specs for f in s.fields()}
    # The preset's mixer defaults and --window-size go only to the layers that take them (another
    # --pattern may have no windowed layer); --window-size 0 leaves the mixers' own default.
    defaults = {k: v for k, v in cfg.mixer_defaults.items() if k in fields}
    if args.window_size is not None:
        defaults.pop("window_size", None)
        if args.window_size and "window_size" in fields:
            defaults["window_size"] = args.window_size
    defaults.update(strict)

    torch.manual_seed(args.seed)
    try:
        cfg = cfg.replace(**changes, mixer_defaults=defaults)
        lm = HybridLM.from_config(cfg)
    except (KeyError, ValueError, TypeError) as e:
        print(f"demo: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    lm = lm.to(device=device, dtype=dtype).eval()
    backend: str | bool = False
    if args.compile:
        backend = args.backend or ("inductor" if device.type == "cuda" else "aot_eager")

    prompt = torch.randint(0, cfg.vocab_size, (B, P), device=device)
    max_seqlen = P + N
    out = sys.stdout
    n_all = sum(p.numel() for p in lm.parameters())
    n_mixers = sum(p.numel() for m in lm.stack.mixers for p in m.parameters())
    n_embed = lm.embed.weight.numel()
    print(
        f"mixerzoo demo: preset {args.preset!r}, pattern {cfg.pattern!r}, {len(lm.stack)} layers, "
        f"hidden {cfg.hidden_size}, heads {cfg.num_heads}, {n_all / 1e6:.2f}M params in all "
        f"(mixers {n_mixers / 1e6:.2f}M, MLPs and norms "
        f"{(n_all - n_mixers - n_embed) / 1e6:.2f}M, embedding {n_embed / 1e6:.2f}M, tied to the output head)\n"
        f"  device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"{args.dtype}, batch {B}, prompt {P} + {N} new tokens, "
        f"decode step: {'torch.compile(fullgraph=True, backend=' + repr(backend) + ')' if backend else 'eager'}"
        + (f", defaults {dict(cfg.mixer_defaults)}" if cfg.mixer_defaults else ""),
        file=out,
    )
    out.flush()  # before the progress lines on stderr

    with torch.no_grad():
        # Warm-up on throwaway states: first calls pay one-time costs (kernel JIT, allocator).
        with _status("warm-up prefill"):
            lm(prompt, lm.init_state(B, device=device, max_seqlen=max_seqlen))
            _sync(device)

        states = lm.init_state(B, device=device, max_seqlen=max_seqlen)
        _sync(device)
        t0 = time.perf_counter()
        logits, states = lm(prompt, states)
        _sync(device)
        t_prefill = time.perf_counter() - t0
        state_bytes = [s.nbytes() for s in states]

        token = logits[:, -1].argmax(-1)
        step = lm.decode_step(backend)
        t_compile = 0.0
        if N > 1 and backend:
            with _status(f"compiling the decode step ({backend})"):
                t0 = time.perf_counter()
                scratch = [s.select(torch.arange(B, device=device)) for s in states]
                for _ in range(2):  # the second call checks that nothing recompiles for the next position
                    step(token[:, None], scratch)
                _sync(device)
                t_compile = time.perf_counter() - t0

        tokens = [token]
        step_logits = []
        t_decode = 0.0
        # After the warm-up, a recompile (e.g. on a position held as a Python int) is an error.
        no_recompile = torch.compiler.set_stance("fail_on_recompile") if backend else contextlib.nullcontext()
        if N > 1:
            with no_recompile, Progress(N - 1, "decode", unit="tok") as bar:
                _sync(device)
                t0 = time.perf_counter()
                for i in range(N - 1):
                    lg = step(token[:, None], states)
                    token = lg.argmax(-1)
                    step_logits.append(lg)
                    tokens.append(token)
                    bar.update(i + 1)
                _sync(device)
                t_decode = time.perf_counter() - t0

        # The same sequence in one parallel forward (no state): the logits must agree.
        seq = torch.cat([prompt, torch.stack(tokens[:-1], 1)], 1) if N > 1 else prompt  # [B, P + N - 1]
        ref, _ = lm(seq)
        err_prefill = (ref[:, :P].float() - logits.float()).abs().max().item()
        err_decode = 0.0
        if step_logits:
            dec = torch.stack(step_logits, 1)  # [B, N - 1, V]
            err_decode = (ref[:, P:].float() - dec.float()).abs().max().item()

    rows = []
    for i, (m, nbytes) in enumerate(zip(lm.stack.mixers, state_bytes, strict=True)):
        rows.append([i, m.name, m.state_growth, sum(p.numel() for p in m.parameters()), nbytes, _fmt_bytes(nbytes)])
    total = sum(state_bytes)
    print(file=out)
    print(
        format_table(
            ["layer", "mixer", "state", "mixer params", "state bytes", "(readable)"],
            rows,
            footer=["total", "", "", n_mixers, total, _fmt_bytes(total)],
        ),
        file=out,
    )
    err = max(err_prefill, err_decode)
    print(file=out)
    summary = [
        ["prefill", f"{B * P / t_prefill:,.0f} tokens/s", f"{B}x{P} tokens in {t_prefill * 1e3:.1f} ms"],
        [
            "decode",
            f"{B * (N - 1) / t_decode:,.1f} tokens/s" if t_decode else "-",
            f"{N - 1} steps x batch {B} in {t_decode * 1e3:.1f} ms"
            + (f" (compile {t_compile:.1f}s, not counted; no recompiles)" if t_compile else ""),
        ],
        [
            "max |error|",
            f"{err:.2e}",
            f"logits of prefill {err_prefill:.2e}, decode {err_decode:.2e} vs one parallel forward",
        ],
    ]
    print(format_table(["", "", ""], summary).split("\n", 2)[2], file=out)

    tol = args.tol
    if tol is None and dtype == torch.float32:
        tol = 1e-3 if device.type == "cpu" else 1e-2  # cuDNN convolutions may use TF32 on the GPU
    if not math.isfinite(err):
        print("demo: the logits are not finite", file=sys.stderr)
        return 1
    if tol is not None and err > tol:
        print(f"demo: decode disagrees with the parallel forward: max |error| {err:.2e} > {tol:.1e}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def add_import_argument(p: argparse.ArgumentParser) -> None:
    """``--import MODULE`` (repeatable), shared by this CLI and ``python -m mixerzoo.conformance``."""
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module (dotted name or path to a .py file) first, so that its mixers register (repeatable)",
    )


def default_prog(argv0: str | None = None) -> str:
    """``mixerzoo`` when run as the installed console script, else ``python -m mixerzoo``."""
    base = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    return "mixerzoo" if base.removesuffix(".exe").removesuffix("-script.py") == "mixerzoo" else "python -m mixerzoo"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = default_prog() if prog is None else prog
    parser = argparse.ArgumentParser(
        prog=prog,
        description="mixerzoo: token mixers for hybrid LMs",
        epilog="exit status: 0 success, 1 the demo's check failed, 2 usage error (unknown mixer or field, failed "
        "--import)",
    )
    parser.set_defaults(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="table of registered mixers and their capabilities")
    p.add_argument("--fields", action="store_true", help="also list each mixer's config fields, defaults and meanings")
    add_import_argument(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "demo",
        help="build a small hybrid LM, prefill then decode; print state sizes, tokens/s and the decode error",
    )
    p.add_argument(
        "--preset",
        default="demo",
        choices=list(PRESETS),
        help="the model: a HybridLMConfig preset (default 'demo'); the flags below replace its settings",
    )
    p.add_argument("--pattern", default=None, help=f"hybrid pattern (default: the preset's; demo: {DEFAULT_PATTERN!r})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: the preset's; demo: 128)")
    p.add_argument("--heads", type=int, default=None, help="number of heads (default: the preset's; demo: 4)")
    p.add_argument(
        "--mlp-ratio",
        type=float,
        default=None,
        help="SwiGLU width ratio; 0 for no MLP (default: the preset's; demo: 4)",
    )
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's; demo: 256)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument(
        "--window-size",
        type=int,
        default=None,
        help="window of the windowed mixers (stack-wide default, only where a layer has one; 0: the mixers' "
        "own default; default: the preset's, 32 for demo)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="another stack-wide default (repeatable)"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode with one torch.compile(fullgraph=True) step (default: on)",
    )
    p.add_argument(
        "--backend",
        default=None,
        help="torch.compile backend (default: inductor on cuda; aot_eager on cpu, where Inductor's C++ "
        "compile takes minutes)",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="fail above this max |error| (default in float32: 1e-3 on cpu, 1e-2 on cuda; none in 16 bits)",
    )
    p.add_argument("--seed", type=int, default=0)
    add_import_argument(p)
    p.set_defaults(func=cmd_demo)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    from .evals import add_eval_parser

    add_eval_parser(sub)
    from .training.trainer import add_train_parsers

    add_train_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """The ``mixerzoo`` command; ``prog`` (default: from sys.argv[0]) names it in usage and errors."""
    args = build_parser(prog).parse_args(argv)
    return args.func(args)
