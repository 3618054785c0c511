"""Sliding-window attention with learnable token eviction (LTE; docs/mixers.md#eviction_swa): a small per-KV-head CNN
scores each token; tokens leaving the window are kept in a fixed-size buffer of the top-C scores."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..kernels._triton import HAS_TRITON
from ..kernels.eviction import buffer_insert_, eviction_attention, eviction_decode
from ..kernels.eviction.prefill import prompt_buffer_slots, prompt_state_write
from ..kernels.eviction.reference import final_buffer_members
from ..kernels.eviction.router_step import router_step_scores, router_step_supported
from ..kernels.eviction.step import eviction_step, eviction_step_context
from ..registry.core import register
from .attention_common import AttentionMixer
from .base import (
    ENDED,
    MixerConfig,
    State,
    acc_dtype,
    check_row_open,
    leading_padding,
    live_pad,
    new_state,
    positions_and_pad,
    state_dataclass,
    state_field,
    step_projections,
    whole_prompt,
)
from .rope import apply_rope
from .router import CNNRouter, ValueGate, key_norm_score, router_margin

__all__ = [
    "EvictionSWA",
    "EvictionSWAConfig",
    "EvictionSWAState",
    "convert_reference_state_dict",
    "reference_config_kwargs",
]

_PREFILL_CHUNK = 256  # prefill tokens per step: bounds the [C + T]^2 eviction-order tables
_PAPER_STD = 0.006  # the paper's initializer_range for linear layers
_BIG = 2**62  # "never" for int64 times and positions
# Finite stand-ins for +-inf scores, so that states stay finite (safetensors, conformance checks):
_SINK = 1e30  # sinks: above every score, so always retained and never evicted
_NONE = -1e30  # padding, empty buffer slots, tokens not scored yet: never retained


@dataclasses.dataclass(frozen=True)
class EvictionSWAConfig(MixerConfig):
    """eviction_swa settings.

    window_size:  W, query t sees keys t - W < j <= t directly.
    capacity:     C, buffer slots per KV head at inference, the num_sinks sinks included.
    num_sinks:    S, the first S real tokens (after left padding) are always kept.
    kernel_sizes, dilations: the router's convs ('same' padding, odd kernels); margin
                  m = sum(d * (k - 1) / 2) future tokens are read per score (6 by default), W > m.
    dropout:      dropout before each router conv in training.
    policy:       "learned" (the CNN router) or "key_norm" (non-learned: 1 / (1 + rms(k)) - threshold,
                  no router parameters; same cache and kernels, to measure what learning buys).
    router_grad:  "straight_through" (the router learns through a value gate evaluated at 1: its
                  gradient is a surrogate, not the derivative of the forward) or "none" (the router
                  gets no gradient from the attention, only from the sparsity penalty; the gradient
                  is then the exact derivative of the forward).
    prefill:      prompt semantics at inference (docs/paper.md#prefill): "exact" (each query sees the
                  buffer as it stands at its own time, == token-by-token decode) or "final_buffer" (the
                  paper's: every query of a multi-token call sees its window plus the buffer left at the
                  call's end, restricted to keys older than its window; decode is the same in both).
    init:         "default" (PyTorch's) or "paper" (q/k/v/o normal with std 0.006, biases 0; router convs
                  Kaiming-normal fan-in ReLU; router output bias +0.5 in both).
    scoring:      "sigmoid" (r = sigmoid(z) - 0.5) or "relu" (r = relu(z), the paper's other routing
                  method); retained iff r > 0 in both.
    router_shared: "head" (one CNN per KV head, grouped convs) or "layer" (one CNN shared by the layer's
                  heads, each head scored on its own input).
    router_input_grad: False detaches the router's input (the paper's routing_grad=false): the router
                  still learns, the k/v projections get no gradient through it.
    """

    num_kv_heads: int | None = None
    head_dim: int | None = None
    window_size: int = 512
    capacity: int = 512
    num_sinks: int = 4
    kernel_sizes: tuple[int, ...] = (3, 3, 3)
    dilations: tuple[int, ...] = (2, 2, 2)
    dropout: float = 0.1
    policy: str = "learned"
    router_grad: str = "straight_through"
    key_norm_threshold: float = 0.0
    rope_theta: float = 10000.0
    bias: bool = False
    prefill: str = "exact"
    init: str = "default"
    scoring: str = "sigmoid"
    router_shared: str = "head"
    router_input_grad: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("num_kv_heads", minimum=1, allow_none=True)
        self.check_int("head_dim", minimum=2, allow_none=True)
        self.check_heads(head_dim=self.head_dim, num_kv_heads=self.num_kv_heads)
        if self.dim % 2:
            self.fail("head_dim", self.dim, "even (RoPE rotates pairs)")
        self.check_choice("policy", ("learned", "key_norm"))
        self.check_choice("router_grad", ("straight_through", "none"))
        self.check_choice("prefill", ("exact", "final_buffer"))
        self.check_choice("init", ("default", "paper"))
        self.check_choice("scoring", ("sigmoid", "relu"))
        self.check_choice("router_shared", ("head", "layer"))
        if not isinstance(self.router_input_grad, bool):
            self.fail("router_input_grad", self.router_input_grad, "a bool")
        for name in ("kernel_sizes", "dilations"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not value:
                self.fail(name, value, "a non-empty tuple of ints")
            object.__setattr__(self, name, tuple(value))
        if len(self.kernel_sizes) != len(self.dilations):
            self.fail("dilations", self.dilations, f"as long as kernel_sizes={self.kernel_sizes}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            self.fail("kernel_sizes", self.kernel_sizes, "odd ints >= 1 ('same' padding)")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.dilations):
            self.fail("dilations", self.dilations, "ints >= 1")
        self.check_float("dropout", low=0.0, high=1.0)
        self.check_float("key_norm_threshold")
        self.check_float("rope_theta", low=1.0)
        self.check_int("num_sinks", minimum=0)
        self.check_int("capacity", minimum=max(1, self.num_sinks))
        self.check_int("window_size", minimum=1)
        if self.window_size <= self.margin:
            self.fail("window_size", self.window_size, f"> {self.margin} (the router's margin)")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def margin(self) -> int:
        """Future (and past) tokens the score of a token depends on; 0 for the key-norm policy."""
        return router_margin(self.kernel_sizes, self.dilations) if self.policy == "learned" else 0


@state_dataclass
class EvictionSWAState(State):
    """Decode state of eviction_swa; constant size. H = num_kv_heads, D = head_dim, m = router margin.

    win_k, win_v: [B, W, H, D] ring buffer of the last W tokens (slot s at index s % W), k with RoPE
    win_score:    [B, W, H] float32, their scores (NONE = -1e30 until the router context is complete)
    buf_k, buf_v: [B, C, H, D] the buffer (sinks included); slots fill from 0 up, then an entering
                  token takes the slot of the entry it evicts; empty slots are zeros. The chunked prefill
                  computes the same slots as decode; a one-pass prompt the same set in position order
                  (decode picks victims by score and position and attends over the buffer as a set)
    buf_score:    [B, C, H] float32, NONE when empty (sinks: SINK = 1e30)
    buf_pos:      [B, C, H] int64 positions, -1 when empty
    ctx_u:        [B, 2m, H, 2D] router inputs concat(k before RoPE, v) of the last 2m tokens
    """

    win_k: Tensor = state_field()
    win_v: Tensor = state_field()
    win_score: Tensor = state_field(fill=_NONE)
    buf_k: Tensor = state_field()
    buf_v: Tensor = state_field()
    buf_score: Tensor = state_field(fill=_NONE)
    buf_pos: Tensor = state_field(fill=-1)
    ctx_u: Tensor = state_field()


@register("eviction_swa", config=EvictionSWAConfig, aliases=("lte",))
class EvictionSWA(AttentionMixer):
    """Sliding-window attention plus a buffer of retained tokens (docs/mixers.md#eviction_swa).

    Training (``module.training``, parallel form): query t sees key j iff j <= t and (t - j < W or j
    retained); values pass through a straight-through gate that trains the router. Eval and every call
    with a state: the window, and a buffer holding the top-C scores among retained tokens that left the
    window; the parallel eval form computes exactly the set that prefill + decode sees.

    After a training-mode parallel forward, the regulariser (mixerzoo.training.SparsityController) reads
      router_scores:   [B, T, H] float32, r = sigmoid(z) - 0.5 (with gradient)
      router_mask:     [B, T] bool, positions counted: real tokens except the last m (whose context
                       is cut by the end of the sequence)
      router_retained: [B, T, H] bool, retained tokens (sinks included)
    """

    state_class: ClassVar[type[State]] = EvictionSWAState
    state_growth: ClassVar[str] = "constant"
    supports_gqa: ClassVar[bool] = True
    train_differs: ClassVar[bool] = True
    conformance_kwargs: ClassVar[dict] = dict(window_size=16, capacity=8, num_sinks=2)
    conformance_seqlen: ClassVar[int] = 90  # long enough for tokens to leave the window and be evicted
    # The straight-through router gradient is a surrogate; without it the gradient is exact.
    exact_grad_kwargs: ClassVar[dict] = {"router_grad": "none"}
    # a buffer larger than the conformance sequence: nothing is evicted (a fresh router's scores differ by ~0.005,
    # which bfloat16 rounding reorders)
    choice_free_kwargs: ClassVar[dict] = {"capacity": 128}

    config: EvictionSWAConfig

    def __init__(self, config: EvictionSWAConfig):
        super().__init__(config)  # the q, k, v, o projections (with biases when bias=True)
        c = config
        H, D = c.kv_heads, c.dim
        self.router = None
        if c.policy == "learned":
            shared = c.router_shared == "layer"
            self.router = CNNRouter(H, D, c.kernel_sizes, c.dilations, c.dropout, shared=shared, init=c.init)
        if c.init == "paper":
            with torch.no_grad():
                for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                    nn.init.normal_(lin.weight, std=_PAPER_STD)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
        self.margin = c.margin
        # False during the paper's router warm-up (SparsityController(warmup_steps=...)): in training
        # every token is retained and the router's input is detached; scores are still recorded.
        self.router_enabled = True
        self.router_scores: Tensor | None = None
        self.router_mask: Tensor | None = None
        self.router_retained: Tensor | None = None

    # -- state -------------------------------------------------------------------------------------
    def init_state(self, batch_size, *, device=None, dtype=None, max_seqlen=None) -> EvictionSWAState:
        c = self.config
        p = self._param_like()
        device = device if device is not None else p.device
        dtype = dtype if dtype is not None else p.dtype
        B, W, C, H, D, m = batch_size, c.window_size, c.capacity, c.kv_heads, c.dim, self.margin
        f32, i64 = torch.float32, torch.long
        return new_state(
            EvictionSWAState,
            B,
            device,
            win_k=((W, H, D), dtype),
            win_v=((W, H, D), dtype),
            win_score=((W, H), f32),
            buf_k=((C, H, D), dtype),
            buf_v=((C, H, D), dtype),
            buf_score=((C, H), f32),
            buf_pos=((C, H), i64),
            ctx_u=((2 * m, H, 2 * D), dtype),
        )

    # -- pieces ------------------------------------------------------------------------------------
    def _raw_scores(self, u: Tensor, k: Tensor, pos: Tensor, dropout: bool, all_valid: bool = False) -> Tensor:
        """r for the tokens of u (learned) or k (key norm). u: [B, L, H, 2D], k: [B, L, H, D],
        pos: [B, L] positions (< 0: padding or before the sequence) -> [B, L, H] float32. ``all_valid``: the caller
        knows every pos >= 0 (a call without padding), which spares the router a masked copy of u."""
        c = self.config
        if self.router is None:
            return key_norm_score(k, c.key_norm_threshold)
        if not c.router_input_grad or not self.router_enabled:
            u = u.detach()
        z = self.router(u, pos >= 0, dropout, all_valid=all_valid).float()
        return torch.relu(z) if c.scoring == "relu" else torch.sigmoid(z) - 0.5

    def _effective(self, r: Tensor, pos: Tensor) -> Tensor:
        """Scores the eviction rule reads: sinks SINK, padding NONE. r: [B, L, H], pos: [B, L]."""
        p = pos[..., None]
        return torch.where(p < 0, _NONE, torch.where(p < self.config.num_sinks, _SINK, r.detach()))

    # -- forward -----------------------------------------------------------------------------------
    def mix(self, x, state, attention_mask):
        if state is not None and attention_mask is None and x.shape[1] == 1 and self._fused(x):
            check_row_open(self.name, state)  # positions_and_pad's one check for a mask-less step
            # q, k, v from one matmul (step_projections), in the state's dtype, as [B, heads, D] views
            projs = (self.q_proj, self.k_proj, self.v_proj)
            qkv = step_projections(self, "qkv", projs, x.select(1, 0), state.win_k.dtype)
            q, k, v = qkv.view(x.shape[0], -1, self.head_dim).split(self._qkv_heads, 1)
            return self.out(self._decode_fused(q, k, v, state).unsqueeze(1)), state
        # asked once (it may read the device): a whole prompt without a mask takes positions_and_pad's one check,
        # not its positions (the one-pass prefill makes its own), some launches fewer in a host-bound prompt
        whole = state is not None and attention_mask is None and self._prefill_whole(x, state, None)
        if whole:
            check_row_open(self.name, state)
            q, k, v = self.project(x, state.win_k.dtype)
            return self.out(self._prefill_empty(q, k, v, state, padded=False)), state
        slot, pos, valid = positions_and_pad(x, state, attention_mask, self.name)
        q, k, v = self.project(x, None if state is None else state.win_k.dtype)
        if state is None:
            o = self._parallel(q, k, v, pos, valid, attention_mask is not None)
        elif x.shape[1] == 1 and not (torch.is_grad_enabled() and q.requires_grad):
            o = self._decode_one(q, k, v, state)
        elif attention_mask is not None and self._prefill_whole(x, state, attention_mask):
            o = self._prefill_empty(q, k, v, state, padded=True)
        elif self.config.prefill == "final_buffer":
            o = self._prefill_final(q, k, v, state)
        else:
            chunks = [slice(t0, t0 + _PREFILL_CHUNK) for t0 in range(0, x.shape[1], _PREFILL_CHUNK)]
            o = torch.cat([self._prefill_chunk(q[:, c], k[:, c], v[:, c], state) for c in chunks], 1)
        y = self.out(o)
        return y, state

    def _parallel(self, q, k, v, pos, valid, padded: bool) -> Tensor:
        c = self.config
        kpos = pos.masked_fill(~valid, -1)  # [B, T]: padding on either side reads as outside the sequence
        r = self._raw_scores(torch.cat((k, v), -1), k, kpos, self.training, not padded)  # [B, T, H] float32
        score = self._effective(r, kpos)
        if self.training and not self.router_enabled:
            p = kpos[..., None]
            score = torch.where(p < 0, _NONE, torch.where(p < c.num_sinks, _SINK, torch.ones_like(score)))
        if self.training:
            self.router_scores = r
            # the last m real tokens of a row have their router context cut by the end of the sequence
            self.router_mask = valid & (pos < valid.sum(-1, keepdim=True) - self.margin)
            self.router_retained = score > 0
        if self.router is not None and c.router_grad == "straight_through":
            v = ValueGate.apply(v, r)
        q, k = apply_rope(q, pos, c.rope_theta), apply_rope(k, pos, c.rope_theta)
        # right padding already follows the real tokens: only the left padding needs moving
        shift = leading_padding(valid) if padded else None
        return self._attention(q, k, v, score, shift=shift, lengths=valid.sum(-1), training=self.training)

    def _attention(self, q, k, v, score, *, shift, lengths, training: bool, buffer: bool = False):
        """The eviction op over q, k (with RoPE) and v [B, T, ...] and effective scores [B, T, H], as the parallel
        form and the one-pass prefill run it. The op knows no padding: with ``shift`` [B] (leading padding per row;
        None: none) each row's left padding moves to its end, where causality hides it from the real tokens, and
        its first real tokens become index 0.. (the sinks); ``lengths`` [B] real tokens per row (None: T). Eval
        with the final-buffer prompts: query t sees its window and the keys j <= t - W of the buffer left at the
        row's end, the training mask with "retained" meaning "in that buffer" (docs/paper.md#prefill).
        Returns o [B, T, HQ, D]; with ``buffer`` also what the one-pass prefill builds the buffer from, at the
        op's indices (rotated rows: index = position): the inference-semantics intervals (kpos, kend, kcum), or
        with the final-buffer prompts the members of that final buffer [B, T, H] bool (no intervals computed)."""
        c = self.config
        T = q.shape[1]
        if shift is not None:
            t = torch.arange(T, device=q.device)[None, :]
            q, k, v, score = (_take(x, torch.remainder(t + shift[:, None], T)) for x in (q, k, v, score))
        op = dict(window_size=c.window_size, capacity=c.capacity, num_sinks=c.num_sinks)
        held = None
        if not training and c.prefill == "final_buffer":
            held = final_buffer_members(score, **op, lengths=lengths)
            o = eviction_attention(q, k, v, torch.where(held, 1.0, -1.0), **{**op, "num_sinks": 0}, training=True)
        elif buffer:
            o, held = eviction_attention(q, k, v, score, **op, training=training, return_intervals=True)
        else:
            o = eviction_attention(q, k, v, score, **op, training=training)
        if shift is not None:
            o = _take(o, torch.remainder(t - shift[:, None], T))
        return (o, held) if buffer else o

    # -- streaming ---------------------------------------------------------------------------------
    def _decode_one(self, q, k, v, state: EvictionSWAState) -> Tensor:
        """One token with the inference semantics, O(W + C) work. q: [B, 1, HQ, D], k, v: [B, 1, H, D]."""
        if self._fused(q):
            return self._decode_fused(q.select(1, 0), k.select(1, 0), v.select(1, 0), state).unsqueeze(1)
        c = self.config
        W, m = c.window_size, self.margin
        s, pad = state.seen, live_pad(state)
        k, v = k.detach(), v.detach()  # the no-grad path: states never record autograd history
        ar = torch.arange(2 * m + 1, device=q.device)
        pos_ctx = (s - 2 * m + ar)[None, :] - pad[:, None]  # [B, 2m+1], current token last
        u_ctx = torch.cat((state.ctx_u, torch.cat((k, v), -1)), 1)  # [B, 2m+1, H, 2D]
        k_ctx = k if m == 0 else None
        r = self._raw_scores(u_ctx, k_ctx, pos_ctx, False)[:, m]  # score of token s - m: [B, H]
        r = self._effective(r[:, None], pos_ctx[:, m : m + 1])  # [B, 1, H]
        state.ctx_u.copy_(u_ctx[:, 1:])

        # Token s - W leaves the window: it shares ring index s % W with the new token.
        ring = torch.remainder(s, W).view(1)
        lk = state.win_k.index_select(1, ring)  # [B, 1, H, D]
        lv = state.win_v.index_select(1, ring)
        ls = state.win_score.index_select(1, ring)[:, 0]  # [B, H]
        lpos = (s - W - pad)[:, None].expand_as(ls)  # [B, H]
        buffer_insert_(state.buf_k, state.buf_v, state.buf_score, state.buf_pos, lk[:, 0], lv[:, 0], ls, lpos)

        pos = (s - pad)[:, None]  # [B, 1]
        kr = apply_rope(k, pos, c.rope_theta)
        state.win_k.index_copy_(1, ring, kr)
        state.win_v.index_copy_(1, ring, v)
        state.win_score.index_copy_(1, ring, torch.full_like(r, _NONE))
        state.win_score.index_copy_(1, torch.remainder(s - m, W).view(1), r)

        # Attend over the ring (ring index i holds slot s - ((s - i) mod W)) and the buffer.
        i = torch.arange(W, device=q.device)
        ring_pos = (s - torch.remainder(s - i, W))[None, :] - pad[:, None]  # [B, W]
        # A padding query sees itself (finite output); real tokens always have position >= 0.
        win_ok = ((ring_pos >= 0) | (i == ring))[:, :, None].expand(-1, -1, c.kv_heads)  # [B, W, H]
        qr = apply_rope(q, pos, c.rope_theta)[:, 0]  # [B, HQ, D]
        o = eviction_decode(qr, state.win_k, state.win_v, win_ok, state.buf_k, state.buf_v, state.buf_pos >= 0)[
            :, None
        ]  # [B, 1, HQ, D]
        state.seen.add_(1)
        return o

    @staticmethod
    def _fused(x: Tensor) -> bool:
        """Whether a one-token step on x's device takes ``_decode_fused``: eager CUDA without autograd."""
        return x.is_cuda and HAS_TRITON and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _decode_fused(self, q, k, v, state: EvictionSWAState) -> Tensor:
        """``_decode_one`` in few launches (the eager CUDA path; Triton's interpreter runs it on the CPU): one
        kernel gathers the router's input, one scores the token whose router context is complete
        (kernels/eviction/router_step.py; routers deeper than it unrolls run as in ``_decode_one``), and one
        kernel does the rest (kernels/eviction/step.py). Same results and state up to the float32 summation
        order of the router; nothing read on the host, so it can be captured. q: [B, HQ, D], k, v: [B, H, D]
        (views of one projection output are read in place) -> o [B, HQ, D]."""
        c = self.config
        u_ctx = None
        if self.router is None:
            r = self._raw_scores(None, k.unsqueeze(1), None, False)  # [B, 1, H] float32
        else:
            u_ctx, pos_ctx = eviction_step_context(k, v, state.ctx_u, state.seen, state.pad, ended_mark=ENDED)
            if router_step_supported(self.router):
                # eviction_step reads index m only: the one score, broadcast over the context (stride 0)
                r = router_step_scores(u_ctx, pos_ctx, self.router, c.scoring).unsqueeze(1)  # [B, 1, H]
                r = r.expand(-1, u_ctx.shape[1], -1)  # [B, 2m + 1, H]
            else:
                r = self._raw_scores(u_ctx, None, pos_ctx, False)  # [B, 2m + 1, H] float32
        o = eviction_step(
            q,
            k,
            v,
            r,
            u_ctx,
            seen=state.seen,
            pad=state.pad,
            win_k=state.win_k,
            win_v=state.win_v,
            win_score=state.win_score,
            buf_k=state.buf_k,
            buf_v=state.buf_v,
            buf_score=state.buf_score,
            buf_pos=state.buf_pos,
            ctx_u=state.ctx_u,
            margin=self.margin,
            num_sinks=c.num_sinks,
            rope_theta=c.rope_theta,
            ended_mark=ENDED,
            sink_score=_SINK,
            none_score=_NONE,
        )
        state.seen.add_(1)
        return o  # [B, HQ, D]

    @staticmethod
    def _prefill_whole(x: Tensor, state: EvictionSWAState, attention_mask: Tensor | None) -> bool:
        """Whether a prompt takes ``_prefill_empty``: eager CUDA, a state that has seen nothing yet, no padding
        after a row's last real token (base.whole_prompt). Elsewhere the chunked prefill runs."""
        return x.is_cuda and HAS_TRITON and whole_prompt(x, state, attention_mask)

    def _prefill_empty(self, q, k, v, state: EvictionSWAState, padded: bool = True) -> Tensor:
        """T tokens into a state that has seen nothing, in one pass: the outputs of the parallel eval form (the
        eviction op: the Triton kernels on CUDA), and the state from what the op computes anyway: the buffer's
        history (exact prompts) or the final buffer (final-buffer prompts). The same outputs and state as
        ``_prefill_chunk`` (or ``_prefill_final``) over the same tokens, without their loop over 256-token chunks,
        except for the buffer's slot order: the buffer holds the keys token-by-token decode holds (the same k, v,
        score and position per key) in position order, slot i the i-th by position, then the empty slots. Decode
        picks a victim by score and position, never by slot, and attends over the buffer as a set, so the order
        changes nothing but the float summation order; it takes one sort, where decode's slots would take a walk
        along the chains of evictions. Rows may start with padding (``state.pad``, as positions_and_pad set it
        for this call), not end with it; state.seen == 0. ``padded=False`` (the call had no mask, so state.pad is
        0): the rows are not rotated and the padding arithmetic is left out, some twenty operations fewer (each a
        launch on the GPU, where a prompt of a few thousand tokens is host-bound)."""
        c = self.config
        W, C, m, theta = c.window_size, c.capacity, self.margin, c.rope_theta
        B, T, dev = q.shape[0], q.shape[1], q.device
        final = c.prefill == "final_buffer"
        t_all = torch.arange(T, device=dev)  # [T]
        if padded:
            pad = live_pad(state)  # [B] leading padding of each row
            pos = t_all - pad[:, None]  # [B, T]; padding: < 0
            kp = pos.clamp(min=-1)  # padding reads as outside the sequence
        else:
            pad = None
            pos = kp = t_all.expand(B, T)
        # real tokens per row (the op's rows are rotated: row b ends at index n_b - 1); only the final buffer reads it
        n = T - pad if final and padded else None
        u = torch.cat((k, v), -1)  # [B, T, H, 2D] the router's input
        score = self._effective(self._raw_scores(u, k, kp, False, not padded), kp)  # [B, T, H] float32
        qr, kr = apply_rope(q, pos, theta), apply_rope(k, pos, theta)
        o, held = self._attention(qr, kr, v, score, shift=pad, lengths=n, training=False, buffer=True)

        # The buffer after the last query, in position order: one kernel takes its members in the order of the
        # op's indices, which ascend with the position (a stream compaction, kernels/eviction/prefill.py). Then
        # one kernel writes the buffer, the ring of the last W tokens (the last m without a score yet: their
        # router context is not complete, as in decode) and the router's context.
        if final:
            # the final buffer is decode's buffer after the last query (the same top-C rule), at index = position
            slot, empty = prompt_buffer_slots(T, C, members=held)  # [B, C, H] the positions themselves
            kpos = None
        else:
            # the listed keys (in position order) that entered by the row's last query and were still in it then
            # (the op's padding queries after it may list more; those are left out). Without padding a listed
            # key enters before its interval ends (kpos + W < kend), so one still there at T - 1 had entered.
            kpos, kend, _ = held  # [B, H, T]
            slot, empty = prompt_buffer_slots(T, C, kpos=kpos, kend=kend, window_size=W, pad=pad)  # into kpos
        # the kernel writes the state in place, outside autograd (no detach needed: three ops fewer on the host)
        prompt_state_write(state, kr, v, u, score, slot, empty, kpos=kpos, pad=pad, margin=m, none_score=_NONE)
        state.seen.add_(T)
        return o

    def _prefill_final(self, q, k, v, state: EvictionSWAState) -> Tensor:
        """T tokens with the final-buffer semantics (docs/paper.md#prefill): query t sees the keys of its
        window and the keys j <= t - W of the buffer as it stands after the last of the T tokens. The
        state advances exactly as with the exact semantics. q: [B, T, HQ, D]; k, v: [B, T, H, D]."""
        c = self.config
        W = c.window_size
        B, T = q.shape[:2]
        dev = q.device
        s0, pad = state.seen.clone(), live_pad(state)
        ring_old = torch.remainder(s0 + torch.arange(W, device=dev), W)
        old_k = state.win_k.index_select(1, ring_old)  # [B, W, H, D] slots s0 - W .. s0 - 1 (copies)
        old_v = state.win_v.index_select(1, ring_old)
        for t0 in range(0, T, _PREFILL_CHUNK):
            sl = slice(t0, t0 + _PREFILL_CHUNK)
            self._prefill_chunk(q[:, sl], k[:, sl], v[:, sl], state, attend=False)

        pos = (s0 + torch.arange(T, device=dev))[None, :] - pad[:, None]  # [B, T]
        qr, kr = apply_rope(q, pos, c.rope_theta), apply_rope(k, pos, c.rope_theta)
        Ek, Ev = torch.cat((old_k, kr), 1), torch.cat((old_v, v), 1)  # [B, W + T, H, D]
        E_slot = s0 - W + torch.arange(W + T, device=dev)  # [W + T]
        E_pos = E_slot[None, :] - pad[:, None]  # [B, W + T]
        # The final buffer: its entries among the W + T tokens are marked there (so that the live keys
        # keep their gradient); older ones (from the buffer at the call's start) are read from the state.
        idx = state.buf_pos + pad[:, None, None] - (s0 - W)  # [B, C, H] index into E
        in_E = (state.buf_pos >= 0) & (idx >= 0)
        member = torch.zeros(B, W + T + 1, c.kv_heads, dtype=torch.bool, device=dev)
        member.scatter_(1, torch.where(in_E, idx, W + T), True)
        member = member[:, : W + T].permute(0, 2, 1)[:, :, None, :]  # [B, H, 1, W + T]
        vis_B = ((state.buf_pos >= 0) & ~in_E).permute(0, 2, 1)[:, :, None, :]  # [B, H, 1, C]
        outs = []
        for t0 in range(0, T, _PREFILL_CHUNK):
            t1 = min(T, t0 + _PREFILL_CHUNK)
            t = (s0 + torch.arange(t0, t1, device=dev))[:, None]  # [Tc, 1] query slots
            e = slice(0, W + t1)  # keys up to the chunk's last query
            es = E_slot[e][None, :]
            ok = (E_pos[:, e] >= 0)[:, None, :]  # [B, 1, N]
            in_win = ok & (es <= t) & (t - es < W)  # [B, Tc, N]
            buffered = member[..., e] & (ok & (es <= t - W))[:, None]  # [B, H, Tc, N]
            vis = torch.cat((in_win[:, None] | buffered, vis_B.expand(-1, -1, t1 - t0, -1)), -1)
            ks = torch.cat((Ek[:, e], state.buf_k), 1)
            vs = torch.cat((Ev[:, e], state.buf_v), 1)
            outs.append(_attend(qr[:, t0:t1], ks, vs, vis))
        return torch.cat(outs, 1)

    def _prefill_chunk(self, q, k, v, state: EvictionSWAState, attend: bool = True) -> Tensor | None:
        """T tokens with the inference semantics, exactly as T decode steps. q: [B, T, HQ, D]. With
        attend=False only the state advances (returns None)."""
        c = self.config
        W, C, H, m = c.window_size, c.capacity, c.kv_heads, self.margin
        B, T = q.shape[:2]
        dev = q.device
        s0, pad = state.seen, live_pad(state)
        t_slot = s0 + torch.arange(T, device=dev)  # [T] slots of the queries

        # Scores of slots s0 - m .. s0 + T - 1 - m (their context is complete now).
        u_all = torch.cat((state.ctx_u, torch.cat((k, v), -1)), 1)  # [B, 2m + T, H, 2D]
        pos_all = (s0 - 2 * m + torch.arange(2 * m + T, device=dev))[None, :] - pad[:, None]
        r = self._raw_scores(u_all, k if m == 0 else None, pos_all, False)[:, m : m + T]
        r = self._effective(r, pos_all[:, m : m + T])  # [B, T, H]
        state.ctx_u.copy_(u_all[:, T:].detach())

        # E: the old ring in slot order (slots s0 - W .. s0 - 1) then the chunk.
        ring_old = torch.remainder(s0 + torch.arange(W, device=dev), W)
        pos = t_slot[None, :] - pad[:, None]  # [B, T]
        kr = apply_rope(k, pos, c.rope_theta)
        Ek = torch.cat((state.win_k.index_select(1, ring_old), kr), 1)  # [B, W + T, H, D]
        Ev = torch.cat((state.win_v.index_select(1, ring_old), v), 1)
        old_score = state.win_score.index_select(1, ring_old)
        Es = torch.cat((old_score[:, : W - m], r, torch.full_like(old_score[:, :m], _NONE)), 1)  # [B, W + T, H]
        E_slot = s0 - W + torch.arange(W + T, device=dev)  # [W + T]
        E_pos = E_slot[None, :] - pad[:, None]  # [B, W + T]

        # Buffer candidates: the buffer, then the T tokens that leave the window during the chunk.
        cs = torch.cat((state.buf_score, Es[:, :T]), 1)  # [B, C + T, H]
        cp = torch.cat((state.buf_pos, E_pos[:, :T, None].expand(B, T, H)), 1)
        leave = cp + pad[:, None, None] + W  # slot at which each left (leaves) the window
        ret = cs > 0
        end = _buffer_end(cs, cp, leave, ret, C)  # [B, C + T, H]

        o = None
        if attend:
            # Visibility per query slot t: [B, H, T, key].
            t = t_slot[:, None]
            in_win = (E_pos >= 0)[:, None, :] & (E_slot[None, :] <= t) & (t - E_slot[None, :] < W)  # [B, T, W+T]
            lv_ret, lv_leave, lv_end = (a[:, C:].permute(0, 2, 1)[:, :, None, :] for a in (ret, leave, end))
            buffered = lv_ret & (lv_leave <= t) & (t < lv_end)  # [B, H, T, T] leaving tokens
            vis_E = in_win[:, None] | F.pad(buffered, (0, W))
            b_ret, b_end = (a[:, :C].permute(0, 2, 1)[:, :, None, :] for a in (ret, end))
            vis_B = b_ret & (t < b_end)  # [B, H, T, C]
            qr = apply_rope(q, pos, c.rope_theta)
            ks, vs = torch.cat((Ek, state.buf_k), 1), torch.cat((Ev, state.buf_v), 1)
            o = _attend(qr, ks, vs, torch.cat((vis_E, vis_B), -1))

        # New state: ring <- the last W tokens of E; buffer <- the members at the last query, each in
        # the slot that token-by-token decode would have put it (see _buffer_slots).
        ring_new = torch.remainder(s0 + T + torch.arange(W, device=dev), W)
        state.win_k.index_copy_(1, ring_new, Ek[:, T:].detach())
        state.win_v.index_copy_(1, ring_new, Ev[:, T:].detach())
        state.win_score.index_copy_(1, ring_new, Es[:, T:])
        t_last = s0 + T - 1
        member = ret & (leave <= t_last) & (end > t_last)  # [B, C + T, H]
        dest = torch.where(member, _buffer_slots(state.buf_pos, ret, leave, end), C)  # C: not in the buffer
        _write_buffer(
            state, dest, torch.cat((state.buf_k, Ek[:, :T]), 1), torch.cat((state.buf_v, Ev[:, :T]), 1), cs, cp
        )
        state.seen.add_(T)
        return o


# --------------------------------------------------------------------------------------------------
# The paper's reference implementation (docs/paper.md#mapping)
# --------------------------------------------------------------------------------------------------


def reference_config_kwargs(attn: Mapping[str, Any], hidden_size: int) -> dict[str, Any]:
    """eviction_swa config fields for an LTE layer of the paper's reference code: ``attn`` is the "attn"
    dict of its model config (e.g. configs/gated_delta_net_lte_0.4B.json), ``hidden_size`` the model's.
    Its window of W keys before the query becomes window_size = W + 1; prompts get its final-buffer
    semantics. The controller fields (l1_*) go to SparsityController(rule="paper"), not here."""
    if attn.get("qkv_bias", False):
        raise ValueError("eviction_swa: qkv_bias=True has no counterpart (bias=True also gives o_proj a bias)")
    shared = attn.get("routing_shared", "head")
    if shared not in ("head", "layer"):
        raise ValueError(f"eviction_swa: routing_shared must be 'head' or 'layer' here, got {shared!r}")
    return dict(
        hidden_size=hidden_size,
        num_heads=attn["num_heads"],
        num_kv_heads=attn.get("num_kv_heads", attn["num_heads"]),
        window_size=attn["window_size"] + 1,
        capacity=attn.get("buffer_size", 512),
        num_sinks=attn.get("sink_size", 4),
        kernel_sizes=tuple(attn.get("conv_size", (3, 3, 3))),
        dilations=tuple(attn.get("conv_dilation", (1, 1, 1))),
        dropout=attn.get("dropout_prob", 0.0),
        scoring=attn.get("routing_method", "relu"),
        router_input_grad=attn.get("routing_grad", True),
        router_shared=shared,
        rope_theta=attn.get("rope_theta", 10000.0),
        prefill="final_buffer",
        init="paper",
    )


_REFERENCE_NAMES = [
    (re.compile(r"^(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$"), r"\1.\2", False),
    (re.compile(r"^router\.conv_stack\.convs\.(\d+)\.(weight|bias)$"), r"router.convs.\1.\2", True),
    (re.compile(r"^router\.conv_stack\.proj\.(weight|bias)$"), r"router.out.\1", True),
]


def convert_reference_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict of one LTE layer of the paper's reference code (keys relative to the layer, e.g.
    ``router.conv_stack.convs.0.weight``) renamed and reshaped for eviction_swa: its router convs are 2-D
    with a (1, k) kernel, ours 1-D. Rotary buffers are dropped (ours are computed); any other key raises."""
    out = {}
    for name, t in sd.items():
        if name.startswith("rotary."):
            continue
        for pattern, repl, conv in _REFERENCE_NAMES:
            if pattern.match(name):
                new = pattern.sub(repl, name)
                out[new] = t.squeeze(2) if conv and name.endswith("weight") else t
                break
        else:
            raise ValueError(f"convert_reference_state_dict: unknown reference parameter {name!r}")
    return out


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b, t]] along dim 1. x: [B, T, ...], idx: [B, T] -> [B, T, ...]."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Masked softmax attention in float32 (float64 for float64 input), GQA (query head h reads KV head h // G).

    q: [B, T, HQ, D]; k, v: [B, N, H, D]; mask: [B, H, T or 1, N] bool -> [B, T, HQ, D] (q's dtype).
    A row with nothing visible (padding queries) gives a finite average instead of NaN.
    """
    B, T, HQ, D = q.shape
    H = k.shape[2]
    acc = acc_dtype(q.dtype)
    qf = rearrange(q.to(acc), "b t (h g) d -> b h g t d", h=H)
    kf = rearrange(k.to(acc), "b n h d -> b h n d")
    vf = rearrange(v.to(acc), "b n h d -> b h n d")
    with torch.autocast(q.device.type, enabled=False):  # float32 as said, under a caller's autocast too
        logits = torch.einsum("bhgtd,bhnd->bhgtn", qf, kf) * D**-0.5
        logits = torch.where(mask[:, :, None], logits, torch.finfo(acc).min)
        p = torch.softmax(logits, -1)
        o = torch.einsum("bhgtn,bhnd->bhgtd", p, vf)
    return rearrange(o, "b h g t d -> b t (h g) d").to(q.dtype)


def _buffer_end(score: Tensor, pos: Tensor, leave: Tensor, retained: Tensor, capacity: int) -> Tensor:
    """Slot at which each candidate drops out of the top-C buffer (``_BIG``: never).

    Order: score descending, then position ascending (earlier wins ties). A candidate is out once C
    better retained candidates have left the window, i.e. at the C-th smallest ``leave`` among them.
    score, pos, leave, retained: [B, N, H] -> [B, N, H] int64 (needs N >= C).
    """
    si, sj = score[:, :, None], score[:, None, :]  # i: the better one, j: the candidate
    better = retained[:, :, None] & ((si > sj) | ((si == sj) & (pos[:, :, None] < pos[:, None, :])))
    times = torch.where(better, leave[:, :, None], _BIG)  # [B, N (i), N (j), H]
    return torch.topk(times, capacity, dim=1, largest=False).values[:, -1]


def _write_buffer(
    state: EvictionSWAState, dest: Tensor, k: Tensor, v: Tensor, score: Tensor, pos: Tensor, rows: Tensor | None = None
) -> None:
    """Refill the buffer from N candidates, each to its slot dest [B, N, H] (C: not in the buffer; a slot < C is
    taken by at most one): pos [B, N, H] per candidate; k, v [B, R, H, D] and score [B, R, H] per row, candidate
    n's at row rows[b, n, h] (rows: [B, N, H]; None: row n). Slots no candidate takes are empty (zeros, NONE, -1).
    dest is inverted first (which candidate fills each slot), so only the C buffered rows are read."""
    B, N, H = dest.shape
    C = state.buf_pos.shape[1]
    n = torch.arange(N, device=dest.device)[None, :, None].expand(B, N, H)
    src = torch.full((B, C + 1, H), N, dtype=torch.long, device=dest.device)  # N: empty; C + 1: a spill slot
    src = src.scatter_(1, dest, n)[:, :C]  # [B, C, H] the candidate in each slot
    empty = src == N
    src = src.clamp(max=N - 1)  # empty slots read any candidate, then are filled
    _fill_buffer(state, src if rows is None else rows.gather(1, src), empty, k, v, score, pos.gather(1, src))


def _fill_buffer(
    state: EvictionSWAState, rows: Tensor, empty: Tensor, k: Tensor, v: Tensor, score: Tensor, pos: Tensor
) -> None:
    """Write the buffer slot by slot: rows [B, C, H] the row of k, v [B, R, H, D] and score [B, R, H] that each slot
    reads, pos [B, C, H] its position; slots where empty [B, C, H] is set become empty (zeros, NONE, -1). The
    gathers write into the state (no copies: each operation is a launch)."""
    rows4, empty4 = rows[..., None].expand(-1, -1, -1, k.shape[-1]), empty[..., None]
    for buf, x, idx, mask, fill in (
        (state.buf_k, k, rows4, empty4, 0.0),
        (state.buf_v, v, rows4, empty4, 0.0),
        (state.buf_score, score, rows, empty, _NONE),
    ):
        torch.gather(x.detach(), 1, idx, out=buf)
        buf.masked_fill_(mask, fill)
    state.buf_pos.copy_(pos).masked_fill_(empty, -1)


def _follow_chains(val: Tensor, nxt: Tensor, dim: int, steps: int) -> Tensor:
    """Pointer doubling: each entry without a value (< 0) takes the value at the end of its chain of pointers
    ``nxt`` (indices along ``dim``; an entry with a value points to itself), chains of up to 2**steps links.
    The ends point to themselves, so ``steps`` doublings of the pointers alone reach them, and one gather reads
    their values: one launch per step."""
    for _ in range(steps):
        nxt = nxt.gather(dim, nxt)
    return val.gather(dim, nxt)


def _buffer_slots(buf_pos: Tensor, retained: Tensor, leave: Tensor, end: Tensor) -> Tensor:
    """Buffer slot of each candidate that enters, as decode assigns them: the first empty slot while
    there is room (slots fill from 0 up and never empty again), else the slot of the entry it evicts.

    buf_pos: [B, C, H] (-1 empty) at the chunk start; retained, leave, end: [B, C + T, H] over the
    buffer entries then the T tokens leaving the window in order (see _buffer_end) -> [B, C + T, H]
    int64 (meaningful for entrants and buffer entries only).
    """
    B, N, H = leave.shape
    C = buf_pos.shape[1]
    i = torch.arange(N, device=leave.device)[None, :, None]
    entered = retained & (end > leave)  # in the buffer at its own leave time (old entries: already in)
    new = entered & (i >= C)
    rank = new.long().cumsum(1) - 1  # order of entry within the chunk
    n0 = (buf_pos >= 0).sum(1, keepdim=True)  # filled slots at the chunk start
    val = torch.where(i < C, i, torch.where(new & (n0 + rank < C), n0 + rank, -1))
    # The entrant k evicts the entry j that drops out of the top C when k leaves the window.
    hit = entered[:, None] & (end[:, None] == leave[:, :, None])  # [B, N (k), N (j), H]
    nxt = torch.where(val >= 0, i, hit.long().argmax(2))  # pointer to the victim, itself when known
    return _follow_chains(val, nxt, 1, max(1, (N - C)).bit_length() + 1)
