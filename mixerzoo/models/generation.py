"""Token generation for HybridLM: sampling, the prefill + decode loop, the CUDA-graph decode step, statistics."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..mixers.base import State

if TYPE_CHECKING:
    from .hybrid import HybridLM

__all__ = ["GenerateStats", "generate", "sample_next"]


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token per row: greedy (``temperature=0``) or sampled from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens, then to the smallest set whose probability reaches
    ``top_p`` (nucleus sampling; the most likely token is always kept).

    logits: [B, V] -> [B] int64
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(-1)
        # drop a token when the more likely ones already reach top_p: the first token always stays
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclasses.dataclass(frozen=True)
class GenerateStats:
    """Timings of one ``generate(..., return_stats=True)`` call (seconds; CUDA work is synchronised).

    batch_size:    B.
    prompt_tokens: B * T prompt positions prefilled (padding included).
    new_tokens:    tokens per row produced before stopping (max_new_tokens, or fewer when every row
                   reached eos early; the remaining columns hold the fill token).
    decode_steps:  calls of the one-token decode step (new_tokens - 1: the first token comes from prefill).
    prefill_s:     the prompt's forward and the first token.
    setup_s:       making the decode step ready: compiling it and capturing its CUDA graph (warm-up
                   on scratch states); 0 for the eager step. Not part of decode_s.
    decode_s:      the decode loop.
    step:          how the decode step ran, e.g. "eager", "torch.compile(inductor)",
                   "cuda_graph + torch.compile(inductor)".
    """

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    decode_steps: int
    prefill_s: float
    setup_s: float
    decode_s: float
    step: str

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else math.inf

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the batch in the decode loop (B * decode_steps / decode_s); NaN with no step."""
        if self.decode_steps == 0:
            return math.nan
        return self.batch_size * self.decode_steps / self.decode_s if self.decode_s > 0 else math.inf


def _backend_name(compile: bool | str | Callable) -> str:
    if compile is True:
        return "inductor"
    if isinstance(compile, str):
        return compile
    return getattr(compile, "__name__", type(compile).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_args(lm: HybridLM, input_ids: Any, max_new_tokens: Any, a: dict[str, Any]) -> None:
    """Refuse what generate cannot do, naming the argument, the value and what is allowed."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"generate: input_ids must be a [B, T] tensor of token ids, got {shape}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    t = a["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t < math.inf):
        raise ValueError(f"generate: temperature must be a finite number >= 0, got {t!r}")
    k, p = a["top_k"], a["top_p"]
    if k is not None and (not _is_int(k) or k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {k!r}")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
        raise ValueError(f"generate: top_p must be None or a number in (0, 1], got {p!r}")
    if not isinstance(a["do_sample"], bool):
        raise ValueError(f"generate: do_sample must be a bool, got {a['do_sample']!r}")
    if not a["do_sample"]:
        # greedy decoding: a sampling setting would be ignored, so it is refused instead
        for name, value, neutral in (
            ("temperature", t, (0, 1)),
            ("top_k", k, (None,)),
            ("top_p", p, (None,)),
            ("seed", a["seed"], (None,)),
            ("generator", a["generator"], (None,)),
        ):
            if not any(value is n or (n is not None and value == n) for n in neutral):
                raise ValueError(
                    f"generate: {name}={value!r} only applies when sampling; pass do_sample=True "
                    "(the default, do_sample=False, is greedy)"
                )
    if a["seed"] is not None and a["generator"] is not None:
        raise ValueError("generate: pass seed or generator, not both")
    if a["seed"] is not None and not _is_int(a["seed"]):
        raise ValueError(f"generate: seed must be None or an int, got {a['seed']!r}")
    g = a["generator"]
    if g is not None:
        if not isinstance(g, torch.Generator):
            raise ValueError(f"generate: generator must be a torch.Generator, got {type(g).__name__}")
        if g.device.type != input_ids.device.type:
            raise ValueError(f"generate: generator is on {g.device}, input_ids on {input_ids.device}")
    V = lm.vocab_size
    for name in ("eos_token_id", "pad_token_id"):
        v = a[name]
        ids = v if isinstance(v, (list, tuple)) and name == "eos_token_id" else [v]
        if v is None:
            continue
        if not ids or not all(_is_int(i) and 0 <= i < V for i in ids):
            allowed = "an int or a list of ints" if name == "eos_token_id" else "an int"
            raise ValueError(f"generate: {name} must be None or {allowed} in [0, vocab_size={V}), got {v!r}")
    if a["pad_token_id"] is not None and a["eos_token_id"] is None:
        raise ValueError("generate: pad_token_id fills the rows that reached eos; it needs eos_token_id")
    cg = a["cuda_graph"]
    if cg is not None and not isinstance(cg, bool):
        raise ValueError(f"generate: cuda_graph must be None (auto), True or False, got {cg!r}")
    if cg and input_ids.device.type != "cuda":
        raise ValueError(f"generate: cuda_graph=True needs CUDA tensors, input_ids are on {input_ids.device}")
    c = a["compile"]
    if not (isinstance(c, (bool, str)) or callable(c)):
        raise ValueError(f"generate: compile must be a bool, a backend name or a backend callable, got {c!r}")
    m = a["attention_mask"]
    if m is not None:
        if not isinstance(m, Tensor) or tuple(m.shape) != tuple(input_ids.shape):
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(
                f"generate: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}"
            )
        ends_padded = (m[:, -1] == 0).nonzero().flatten().tolist()
        if ends_padded:
            raise ValueError(
                f"generate: attention_mask row(s) {ends_padded} end with padding; generation continues each row "
                "after its last prompt token, so batched prompts must be left-padded (padding first)"
            )


class _GraphStep:
    """The decode step captured in a CUDA graph: static token input, static logits output, and the states,
    whose tensors the step updates in place at fixed addresses (the State protocol), so one capture
    replays for every position."""

    def __init__(self, step: Callable[[Tensor, list[State]], Tensor], token: Tensor, states: list[State]):
        device = token.device
        self.token = token[:, None].clone()  # [B, 1]
        rows = torch.arange(token.shape[0], device=device)
        scratch = [s.select(rows) for s in states]
        # Warm-up on copies of the states, on a side stream as capture requires: compiles the step, runs
        # kernel autotuning and lazy initialisation, none of which may happen during capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step(self.token, scratch)
        torch.cuda.current_stream(device).wait_stream(side)
        del scratch
        self.graph = torch.cuda.CUDAGraph()
        try:
            # Capture records kernels without running them: the states are not advanced here.
            with torch.cuda.graph(self.graph):
                self.logits = step(self.token, states)  # [B, V], overwritten by each replay
        except RuntimeError as e:  # torch.AcceleratorError is a RuntimeError
            raise RuntimeError(
                "generate: capturing the decode step in a CUDA graph failed: a mixer's step reads a device value "
                "on the host (a check or a size), which capture does not allow. Pass compile=True (or a backend "
                "name) so the captured step is the compiled one, or cuda_graph=False"
            ) from e

    def __call__(self, token: Tensor) -> Tensor:
        self.token.copy_(token[:, None])
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(
    lm: HybridLM,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    compile: bool | str | Callable = True,
    max_seqlen: int | None = None,
    progress: Callable[[int], None] | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, GenerateStats]:
    """See HybridLM.generate."""
    args = dict(
        attention_mask=attention_mask,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        seed=seed,
        generator=generator,
        cuda_graph=cuda_graph,
        compile=compile,
    )
    _check_args(lm, input_ids, max_new_tokens, args)
    B, T = input_ids.shape
    device = input_ids.device
    need = T + max_new_tokens
    if max_seqlen is None:
        max_seqlen = need
    elif not _is_int(max_seqlen) or max_seqlen < need - 1:
        raise ValueError(
            f"generate: max_seqlen={max_seqlen!r} is below prompt length {T} + max_new_tokens "
            f"{max_new_tokens} - 1 (the last token is never fed back)"
        )
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    sampling = do_sample and temperature != 0
    if sampling and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    def pick(logits: Tensor) -> Tensor:
        if not sampling:
            return logits.argmax(-1)
        return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    eos = None
    fill = 0
    if eos_token_id is not None:
        eos_ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        fill = eos_ids[0] if pad_token_id is None else pad_token_id
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    def emit(token: Tensor, i: int) -> Tensor:
        if eos is not None:
            token = torch.where(finished, fill, token)
            finished.logical_or_(torch.isin(token, eos))
        out[:, i] = token
        return token

    def sync() -> None:
        if return_stats and device.type == "cuda":
            torch.cuda.synchronize(device)

    # A host read of `finished` stalls the GPU queue: on CUDA it is read every few steps only (the
    # tokens are the same either way; finished rows just decode a few more throwaway steps).
    check_every = 1 if device.type != "cuda" else 8
    backend = None if compile is False else _backend_name(compile)
    kind = "eager" if backend is None else f"torch.compile({backend})"
    if cuda_graph:
        kind = "cuda_graph" + ("" if backend is None else f" + {kind}")

    was_training = lm.training
    lm.eval()
    try:
        sync()
        t0 = time.perf_counter()
        states = lm.init_state(B, device=device, max_seqlen=max_seqlen)
        logits, states = lm(input_ids, states, attention_mask=attention_mask)
        out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)
        token = emit(pick(logits[:, -1]), 0)
        sync()
        t1 = time.perf_counter()
        if progress is not None:
            progress(1)
        done = 1
        run: Callable[[Tensor], Tensor] | None = None
        if max_new_tokens > 1:
            step = lm.decode_step(compile)
            if cuda_graph:
                run = _GraphStep(step, token, states)
            else:
                if backend is not None and return_stats:
                    # compile on copies of the states, so that decode_s times decoding only
                    rows = torch.arange(B, device=device)
                    step(token[:, None], [s.select(rows) for s in states])

                def run(tok: Tensor) -> Tensor:
                    return step(tok[:, None], states)

        sync()
        t2 = time.perf_counter()
        for i in range(1, max_new_tokens):
            if eos is not None and i % check_every == 0 and bool(finished.all()):
                break
            token = emit(pick(run(token)), i)
            done = i + 1
            if progress is not None:
                progress(done)
        if done < max_new_tokens and progress is not None:
            progress(max_new_tokens)  # the rest is fill: every row has ended
        sync()
        t3 = time.perf_counter()
    finally:
        lm.train(was_training)
    if not return_stats:
        return out
    stats = GenerateStats(
        batch_size=B,
        prompt_tokens=B * T,
        new_tokens=done,
        decode_steps=done - 1,
        prefill_s=t1 - t0,
        setup_s=t2 - t1,
        decode_s=t3 - t2,
        step=kind,
    )
    return out, stats
