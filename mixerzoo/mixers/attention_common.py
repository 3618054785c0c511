"""Pieces shared by the softmax-attention mixers: q/k/v/o projections with RoPE, GQA, masked attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.swa.step import attn_decode_step, attn_step_supported
from .base import MixerConfig, State, TokenMixer, cast_all, check_row_open, step_projections
from .rope import apply_rope

__all__ = [
    "AttentionMixer",
    "all_finite",
    "check_attention_heads",
    "masked_attention",
    "self_diagonal",
    "visible",
]


def check_attention_heads(cfg: MixerConfig) -> None:
    """Validate ``num_kv_heads`` / ``head_dim`` / ``rope_theta`` of an attention config (in __post_init__)."""
    cfg.check_int("num_kv_heads", minimum=1, allow_none=True)
    cfg.check_int("head_dim", minimum=2, allow_none=True)
    cfg.check_heads(head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads)
    head_dim = cfg.head_dim if cfg.head_dim is not None else cfg.hidden_size // cfg.num_heads
    if head_dim % 2:
        # RoPE rotates pairs (i, i + D/2).
        cfg.fail("head_dim", head_dim, "even (RoPE rotates pairs of channels)")
    cfg.check_float("rope_theta")
    if cfg.rope_theta <= 0:
        cfg.fail("rope_theta", cfg.rope_theta, "> 0")


class AttentionMixer(TokenMixer):
    """Base of the softmax-attention mixers: q, k, v, o projections, RoPE on q and k at absolute positions, GQA
    (``num_heads`` query heads HQ, ``num_kv_heads`` key/value heads HKV).

    The config must have ``num_kv_heads``, ``head_dim`` and ``rope_theta`` (see check_attention_heads); the
    projections have biases when it has ``bias=True`` (none otherwise).
    """

    supports_gqa = True

    def __init__(self, config: MixerConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads or config.num_heads
        self.head_dim = config.head_dim or hidden // config.num_heads
        self.rope_theta = float(config.rope_theta)
        self.scale = self.head_dim**-0.5
        bias = bool(getattr(config, "bias", False))
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        # the decode steps' one q, k, v matmul (step_projections): its columns per projection, its heads per projection
        self._qkv_sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
        self._qkv_heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)

    def project(self, x: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, D] -> q [B, T, HQ, Dh], k and v [B, T, HKV, Dh], before RoPE. ``dtype``: cast to it (a cached
        path passes its state's dtype: under autocast the projections give bfloat16, and the attention over a
        float32 cache then runs in float32)."""
        # b t (h d) -> b t h d as views by a method call: a fraction of rearrange's host time (eager decode steps)
        heads = (-1, self.head_dim)
        q, k, v = (
            self.q_proj(x).unflatten(-1, heads),
            self.k_proj(x).unflatten(-1, heads),
            self.v_proj(x).unflatten(-1, heads),
        )
        return (q, k, v) if dtype is None else cast_all(dtype, q, k, v)

    def qkv(self, x: Tensor, pos: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, D], pos: [B, T] -> q [B, T, HQ, Dh], k and v [B, T, HKV, Dh] (RoPE on q and k); ``dtype`` as
        for ``project``."""
        q, k, v = self.project(x, dtype)
        return apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta), v

    def takes_decode_step(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos_cache: Tensor) -> bool:
        """Whether x [B, T, D] is one eager token on CUDA without autograd (a decode loop outside torch.compile)
        that ``kernels.swa.step.attn_decode_step`` takes with these caches: the mixers' ``_decode_step``."""
        return (
            x.shape[1] == 1
            and x.is_cuda
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            # the projections are cast to the cache's dtype (under autocast x's projections are bfloat16)
            and attn_step_supported(k_cache, self.head_dim, k_cache, v_cache, pos_cache)
        )

    def cached_step(
        self,
        x: Tensor,
        state: State,
        caches: tuple[Tensor, Tensor, Tensor],
        *,
        ring: bool,
        window_size: int,
        num_sinks: int = 0,
    ) -> Tensor:
        """One token x [B, 1, D] that ``takes_decode_step`` accepted -> [B, 1, D], in a few launches: the
        projections, one kernel for RoPE and the cache write, the decode kernel over the cache, the output
        projection (``kernels.swa.step``); ``seen`` advances. ``caches``: (keys, values, positions) of the state,
        a ring of S + W slots (``ring=True``) or a linear cache (``ring=False``, window larger than any distance,
        slots above ``seen`` never read). The results and the cache are those of the general path."""
        check_row_open(self.name, state)  # positions_and_pad's one check for a mask-less step
        # [B, (HQ + 2 HKV) Dh]: q, k, v from one matmul, in the cache's dtype (under autocast they are bfloat16)
        qkv = step_projections(self, "qkv", (self.q_proj, self.k_proj, self.v_proj), x.select(1, 0), caches[0].dtype)
        o = attn_decode_step(
            *qkv.split(self._qkv_sizes, -1),
            state.seen,
            state.pad,
            *caches,
            theta=self.rope_theta,
            ring=ring,
            window_size=window_size,
            num_sinks=num_sinks,
            scale=self.scale,
            checked=False,  # inputs and state checked by forward, layout by takes_decode_step
        )  # [B, 1, HQ, Dh]
        state.seen.add_(1)
        return self.o_proj(o.view(x.shape[0], 1, -1))

    def out(self, o: Tensor) -> Tensor:
        """o: [B, T, HQ, Dh] -> [B, T, D]."""
        return self.o_proj(o.flatten(2))  # b t h d -> b t (h d), at a fraction of rearrange's host time

    def state_device_dtype(
        self, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> tuple[torch.device | str, torch.dtype]:
        """init_state defaults: the parameters' device and dtype."""
        w = self.q_proj.weight
        return (w.device if device is None else device), (w.dtype if dtype is None else dtype)


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of ``tensors`` is finite, read on the host (one synchronisation), so that an eager call
    can skip the NaN isolation around a backend kernel (several passes over q, k, v and o) for finite input, which
    it leaves unchanged. False while compiling or capturing a CUDA graph: isolate unconditionally there."""
    t = tensors[0]
    if torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    ok = torch.isfinite(t).all()
    for x in tensors[1:]:
        ok = ok & torch.isfinite(x).all()
    return bool(ok)


def visible(
    qpos: Tensor,
    kpos: Tensor,
    *,
    window: int | None = None,
    num_sinks: int = 0,
) -> Tensor:
    """Which keys each query sees, from absolute positions (negative = padding or an empty slot).

    qpos: [B, T], kpos: [B, S] -> [B, T, S] bool
    Key j is visible to query t iff ``0 <= j <= t`` and (``t - j < window`` or ``j < num_sinks``);
    ``window=None`` is unbounded (full causal attention).
    """
    q = qpos[:, :, None]
    k = kpos[:, None, :]
    m = (k >= 0) & (k <= q)
    if window is not None:
        near = (q - k) < window
        if num_sinks > 0:
            near = near | (k < num_sinks)
        m = m & near
    return m


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Softmax attention under an explicit mask, through torch SDPA.

    q: [B, T, HQ, Dh], k and v: [B, S, HKV, Dh], mask: [B, T, S] bool (True = visible) -> [B, T, HQ, Dh]
    Every query row must see at least one key (callers let padding queries see themselves), because
    some SDPA kernels return NaN for a fully masked row.
    """
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)


def self_diagonal(T: int, device: torch.device) -> Tensor:
    """[T, T] identity mask: lets each (padding) query see itself, so that no softmax row is empty."""
    return torch.eye(T, dtype=torch.bool, device=device)
