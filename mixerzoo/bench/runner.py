"""Measure every registered mixer layer: forward, forward+backward, peak memory, decode steps, state sizes."""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import torch
from torch import Tensor

from .anchors import core_cases, layer_anchors, missing_anchor_packages
from .flops import layer_flops
from .timing import TIMING, cuda_graphed, peak_mem_mb, sync, time_ms

__all__ = ["Settings", "run"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclasses.dataclass
class Settings:
    """What one bench run measures (``python -m mixerzoo bench --help`` gives the defaults)."""

    device: torch.device
    dtype: torch.dtype
    mixers: list[str]
    hidden_size: int = 2048
    num_heads: int = 16
    tokens: int = 32768  # tokens per forward call: B = tokens // T
    seqlens: tuple[int, ...] = (2048, 8192, 32768)
    seen: tuple[int, ...] = (4096, 32768, 131072)  # tokens already seen before the timed decode steps
    decode_batch: int = 32
    warmup: int = 3
    repeat: int = 10
    decode_repeat: int = 30
    prefill_chunk: int = 4096
    anchors: bool = True
    layer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # --set KEY=VALUE, where a config has KEY
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["device"] = str(self.device)
        d["dtype"] = _DTYPE_NAMES.get(self.dtype, str(self.dtype))
        d["seqlens"], d["seen"] = list(self.seqlens), list(self.seen)
        return d


def _versions(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device": device.type,
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    info["date"] = datetime.date.today().isoformat()
    info["timing"] = TIMING[device.type]
    return info


def layer_config(name: str, settings: Settings) -> dict[str, Any]:
    """The standard layer config of mixer ``name``: hidden size and heads, plus the ``--set`` values its
    config has; every other field keeps the mixer's default (window, capacity, blocks)."""
    from .. import registry

    fields = set(registry.spec(name).fields())
    kw = {"hidden_size": settings.hidden_size, "num_heads": settings.num_heads}
    kw.update({k: v for k, v in settings.layer_kwargs.items() if k in fields})
    return {k: v for k, v in kw.items() if k in fields}


def _head_dim(mixer: torch.nn.Module) -> int | None:
    c = mixer.config
    for attr in ("head_dim", "key_dim"):
        v = getattr(c, attr, None)
        if isinstance(v, int):
            return v
    return c.hidden_size // c.num_heads if c.num_heads else None


def _tflops(flops: float | None, ms: float | None) -> float | None:
    if flops is None or ms is None or ms <= 0:
        return None
    return flops / ms / 1e9


def _row(**kw: Any) -> dict[str, Any]:
    """A results row: absent figures are absent keys, never zeros or None; 5 significant digits."""
    return {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in kw.items() if v is not None}


class _Run:
    def __init__(self, settings: Settings, log: TextIO):
        self.s = settings
        self.log = log
        self.rows: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.notes: list[str] = []

    def say(self, msg: str) -> None:
        print(msg, file=self.log, flush=True)

    def fail(self, what: str, e: BaseException) -> None:
        if not isinstance(e, (torch.cuda.OutOfMemoryError, ValueError, TypeError, NotImplementedError)):
            traceback.print_exception(type(e), e, e.__traceback__, file=self.log)
        msg = f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.failures.append(msg)
        self.say(f"  failed: {msg}")
        if self.s.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- forward and forward+backward --------------------------------------------------------------
    def forward_rows(self, name: str, mixer: torch.nn.Module, T: int) -> None:
        s, dev = self.s, self.s.device
        B = s.tokens // T
        if B < 1:
            self.notes.append(f"{name} T={T}: skipped, fewer tokens per call ({s.tokens}) than T")
            return
        D = mixer.config.hidden_size
        common = dict(T=T, B=B, H=mixer.config.num_heads, D=_head_dim(mixer), hidden=D)
        dtype_name = _DTYPE_NAMES.get(s.dtype, str(s.dtype))
        x = torch.randn(B, T, D, device=dev, dtype=s.dtype, requires_grad=True)
        dy = torch.randn(B, T, D, device=dev, dtype=s.dtype)
        params = [p for p in mixer.parameters() if p.requires_grad]

        def measure(fn: Callable[[Tensor], Tensor]) -> tuple[float, float, float | None]:
            def fwd():
                with torch.no_grad():
                    return fn(x)

            def fwdbwd():
                return torch.autograd.grad(fn(x), [x, *params], dy, allow_unused=True)

            f = time_ms(fwd, dev, warmup=s.warmup, repeat=s.repeat)
            fb = time_ms(fwdbwd, dev, warmup=s.warmup, repeat=s.repeat)
            return f, fb, peak_mem_mb(fwdbwd, dev)

        def layer(x: Tensor) -> Tensor:
            return mixer(x)[0]

        try:
            f, fb, mem = measure(layer)
            flops = layer_flops(name, mixer, B, T)  # after a training forward (eviction_swa counts its router)
            self.rows.append(
                _row(
                    op=f"layer:{name}",
                    impl="mixerzoo",
                    **common,
                    fwd_ms=f,
                    fwdbwd_ms=fb,
                    peak_mem_mb=None if mem is None else round(mem, 1),
                    fwd_tflops=_tflops(flops and flops[0], f),
                    fwdbwd_tflops=_tflops(flops and flops[1], fb),
                    note=f"{dtype_name}, training mode; the module as built by registry.build",
                )
            )
        except Exception as e:
            self.fail(f"{name} B={B} T={T}", e)
        if not s.anchors:
            return
        for anchor in self._safe(lambda: layer_anchors(name, mixer, T, dev), f"{name} anchors T={T}") or []:
            try:
                f, fb, mem = measure(anchor.fn)
                flops = layer_flops(name, mixer, B, T)
                self.rows.append(
                    _row(
                        op=f"layer:{name}",
                        impl=anchor.impl,
                        **common,
                        fwd_ms=f,
                        fwdbwd_ms=fb,
                        peak_mem_mb=None if mem is None else round(mem, 1),
                        fwd_tflops=_tflops(flops and flops[0], f),
                        fwdbwd_tflops=_tflops(flops and flops[1], fb),
                        note=f"{dtype_name}; {anchor.note}",
                    )
                )
            except Exception as e:
                self.fail(f"{name} anchor {anchor.impl} B={B} T={T}", e)
        for case in self._safe(lambda: core_cases(name, mixer, dev, s.dtype), f"{name} core anchors") or []:
            try:
                self._core_row(case, B, T, common)
            except Exception as e:
                self.fail(f"{case.op} {case.impl} B={B} T={T}", e)

    def _core_row(self, case: Any, B: int, T: int, common: dict[str, Any]) -> None:
        s, dev = self.s, self.s.device
        inputs, fn = case.make(B, T)
        do = torch.randn_like(fn(*inputs))

        def fwd():
            with torch.no_grad():
                return fn(*inputs)

        def fwdbwd():
            return torch.autograd.grad(fn(*inputs), inputs, do)

        f = time_ms(fwd, dev, warmup=s.warmup, repeat=s.repeat)
        fb = time_ms(fwdbwd, dev, warmup=s.warmup, repeat=s.repeat)
        mem = peak_mem_mb(fwdbwd, dev)
        flops = case.flops_per_token * B * T
        self.rows.append(
            _row(
                op=case.op,
                impl=case.impl,
                **common,
                fwd_ms=f,
                fwdbwd_ms=fb,
                peak_mem_mb=None if mem is None else round(mem, 1),
                fwd_tflops=_tflops(flops, f),
                fwdbwd_tflops=_tflops(flops * 3, fb),
                note=case.note,
            )
        )

    def _safe(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except Exception as e:
            self.fail(what, e)
            return None

    # -- decode ------------------------------------------------------------------------------------
    def decode_rows(self, name: str, mixer: torch.nn.Module, linear: bool, bar: Callable[[str], None]) -> None:
        """Decode steps after ``seen`` tokens. The state is made by a real prefill of random tokens of one
        sequence (in chunks of ``prefill_chunk``), then copied to ``decode_batch`` rows with State.select. A
        constant-size state is prefilled once, up to each length in turn; a growing one (a KV cache) anew for
        each length, with a capacity of that length plus the timed steps."""
        s, dev = self.s, self.s.device
        D = mixer.config.hidden_size
        Bd = s.decode_batch
        steps = 2 * (s.warmup + s.decode_repeat) + 8  # every step the timing may run on one copy
        mixer.eval()
        state = None
        try:
            with torch.no_grad():
                for N in sorted(s.seen):
                    try:
                        if linear or state is None:
                            state = mixer.init_state(1, device=dev, dtype=s.dtype, max_seqlen=N + steps)
                        while int(state.seen) < N:
                            n = min(s.prefill_chunk, N - int(state.seen))
                            mixer(torch.randn(1, n, D, device=dev, dtype=s.dtype), state)
                        self._decode_row(name, mixer, state, N, Bd, linear)
                    except Exception as e:
                        self.fail(f"{name} decode after {N} tokens", e)
                        state = None
                    bar(f"{name} decode after {N}")
        finally:
            del state
            mixer.train()

    def _decode_row(self, name: str, mixer: torch.nn.Module, state: Any, N: int, Bd: int, linear: bool) -> None:
        s, dev = self.s, self.s.device
        batch = state.select(torch.zeros(Bd, dtype=torch.long, device=dev))  # copies: the B=1 state stays put
        x1 = torch.randn(Bd, 1, mixer.config.hidden_size, device=dev, dtype=s.dtype)  # fixed input buffer

        def step():
            return mixer(x1, batch)[0]

        how = "eager"
        if dev.type == "cuda":
            try:
                replay, y = cuda_graphed(step)
                ms = time_ms(replay, dev, warmup=s.warmup, repeat=s.decode_repeat)
                if not bool(torch.isfinite(y).all()):
                    raise RuntimeError("the replayed step's output is not finite")
                how = "CUDA graph replay"
            except Exception as e:  # a step that cannot be captured (a host sync): the eager time
                self.notes.append(f"{name} decode after {N}: CUDA graph failed ({type(e).__name__}: {e}); eager")
                torch.cuda.synchronize(dev)
                ms = time_ms(step, dev, warmup=s.warmup, repeat=s.decode_repeat)
        else:
            ms = time_ms(step, dev, warmup=s.warmup, repeat=s.decode_repeat)
        per_seq = mixer.init_state(1, device="meta", dtype=s.dtype, max_seqlen=N).nbytes()
        prep = (
            f"state: real prefill of {N} random tokens of one sequence (chunks of {s.prefill_chunk}), "
            f"copied to {Bd} rows"
        )
        self.rows.append(
            _row(
                op=f"layer:{name}",
                impl="mixerzoo",
                T=1,
                B=Bd,
                seen=N,
                H=mixer.config.num_heads,
                D=_head_dim(mixer),
                hidden=mixer.config.hidden_size,
                decode_ms=ms,
                state_bytes=per_seq,
                note=f"decode step, {how}; {prep}"
                + ("; capacity = seen + the timed steps" if linear else "")
                + "; state_bytes per sequence",
            )
        )


def run(settings: Settings, *, log: TextIO | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every mixer of ``settings.mixers``; returns the results document (see docs/bench.md)."""
    from .. import registry
    from ..cli import Progress

    log = sys.stderr if log is None else log
    s = settings
    run_ = _Run(s, log)
    start = time.perf_counter()
    specs = {name: registry.spec(name) for name in s.mixers}
    total = sum(len(s.seqlens) + (len(s.seen) if specs[n].decode else 0) for n in s.mixers)
    missing = sorted({p for n in s.mixers for p in missing_anchor_packages(n, s.device)})
    if s.anchors and missing:
        run_.notes.append(f"anchors skipped: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
        run_.say(run_.notes[-1])
    done = 0
    bar = Progress(total, "bench", unit="case", file=log) if progress else None
    # off a terminal (a log file), one line per case with its seconds: where a slow run spent its time
    per_case = progress and not bool(getattr(log, "isatty", lambda: False)())
    last = time.perf_counter()

    def tick(what: str) -> None:
        nonlocal done, last
        done += 1
        if per_case:
            now = time.perf_counter()
            run_.say(f"  {what}: {now - last:.1f}s")
            last = now
        if bar is not None:
            bar.update(done)

    for name in s.mixers:
        spec = specs[name]
        torch.manual_seed(s.seed)
        try:
            mixer = registry.build(name, **layer_config(name, s)).to(device=s.device, dtype=s.dtype).train()
        except Exception as e:
            run_.fail(f"{name}: build", e)
            for _ in range(len(s.seqlens) + (len(s.seen) if spec.decode else 0)):
                tick(f"{name} (not built)")
            continue
        for T in s.seqlens:
            run_.forward_rows(name, mixer, T)
            tick(f"{name} T={T}")
        if spec.decode:
            run_.decode_rows(name, mixer, spec.state_growth == "linear", tick)
        del mixer
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
        sync(s.device)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    doc = {
        **_versions(s.device),
        "elapsed_s": round(elapsed, 1),
        "settings": s.to_json(),
        "notes": run_.notes,
        "failures": run_.failures,
        "rows": run_.rows,
    }
    return doc


def mixer_names(requested: Sequence[str] | None) -> list[str]:
    """The registered mixers to measure: all (sorted) or those asked for, in the order asked (aliases taken)."""
    from .. import registry

    if not requested:
        return list(registry.names())
    return [registry.spec(n).name for n in requested]
