"""Sliding-window attention, and SWA with attention sinks (StreamingLLM, Xiao et al. 2023).

Query at position t sees key j iff ``0 <= j <= t`` and (``t - j < window_size`` or ``j < num_sinks``).
Positions count real tokens only: with left padding, the sinks are the first ``num_sinks`` real tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from ..baselines.backends import load_flash_attn
from ..kernels.swa import swa_attention, swa_decode
from ..registry.core import register
from .attention_common import (
    AttentionMixer,
    all_finite,
    check_attention_heads,
    masked_attention,
    self_diagonal,
    visible,
)
from .base import (
    MixerConfig,
    State,
    leading_padding,
    new_state,
    positions_and_pad,
    state_dataclass,
    state_field,
)

__all__ = ["SWA", "SWAConfig", "SWASink", "SWASinkConfig", "SWASinkState", "SWAState"]

SWA_BACKENDS = ("triton", "flash_attn")


@dataclasses.dataclass(frozen=True)
class SWAConfig(MixerConfig):
    """Sliding-window attention.

    num_kv_heads: key/value heads (GQA); None = num_heads.   head_dim: None = hidden_size // num_heads.
    window_size:  W, keys per query (the query's own included).   rope_theta: RoPE base.
    backend:      parallel-form kernel: "triton" (the mixerzoo::swa_attention op) or "flash_attn" (flash-attn 4,
                  else 2; CUDA, float16 / bfloat16; sinks need flash-attn 4). Calls with a state: unchanged.
    """

    num_kv_heads: int | None = None
    head_dim: int | None = None
    window_size: int = 512
    rope_theta: float = 10000.0
    backend: str = "triton"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_attention_heads(self)
        self.check_int("window_size", minimum=1)
        self.check_choice("backend", SWA_BACKENDS)


@dataclasses.dataclass(frozen=True)
class SWASinkConfig(SWAConfig):
    """SWA plus attention sinks.

    num_sinks: S, the first S real tokens stay visible to every later query.
    """

    num_sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("num_sinks", minimum=0)


@state_dataclass
class SWAState(State):
    """Decode state of swa and swa_sink (constant size): one cache of N = S + W slots.

    Slots [0, S) hold the sinks (slot s: position s); slots [S, S + W) are a ring buffer of the last W
    tokens, indexed by S + slot % W. A sink token lives in its sink slot only (its ring slot is marked
    empty), so no key is ever counted twice.

    k_cache, v_cache: [B, S + W, HKV, Dh] keys (RoPE applied) and values
    pos_cache:        [B, S + W] int64 position of each slot's token; -1 for empty slots and padding
    """

    k_cache: Tensor = state_field()
    v_cache: Tensor = state_field()
    pos_cache: Tensor = state_field(fill=-1)


@state_dataclass
class SWASinkState(SWAState):
    """Decode state of swa_sink: the layout of SWAState with S > 0 sink slots (its own type, so that a
    swa state is refused by swa_sink and the other way round)."""


@register("swa", config=SWAConfig, aliases=("sliding_window_attention",))
class SWA(AttentionMixer):
    """Sliding-window attention with RoPE and GQA. See the module docstring for the visible set.

    Parallel form: the ``mixerzoo::swa_attention`` op (Triton on CUDA, its reference on CPU, which
    computes in float64 for float64 input), leading padding passed as per-row counts; or, with
    ``backend="flash_attn"``, flash-attn's sliding-window kernel (see ``_parallel_flash``). Decode: one cache of
    S sink slots and a ring of W (see SWAState); a one-token step writes the token, then runs the
    ``mixerzoo::swa_decode`` op over the cache (Triton on CUDA); per-step cost O(W + S), independent of
    the length. Eagerly on CUDA without a mask or autograd, that step is two kernels between the projections
    (``_decode_step``). Calls with a state run the same way whatever the backend.
    """

    config: SWAConfig
    state_class = SWAState
    backends = SWA_BACKENDS
    conformance_kwargs = {"window_size": 8}

    def __init__(self, config: SWAConfig):
        super().__init__(config)
        self.window_size = config.window_size
        self.num_sinks = getattr(config, "num_sinks", 0)
        # backend="flash_attn": which flash-attn runs (``.version`` 4 or 2, ``.name``); None for backend="triton"
        self.flash_attn = None
        if config.backend == "flash_attn":
            self.flash_attn = load_flash_attn(self.name, head_dim=self.head_dim, need_lse=self.num_sinks > 0)

    # -- state -----------------------------------------------------------------------------------
    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seqlen: int | None = None,
    ) -> SWAState:
        """A state for ``batch_size`` empty sequences; ``max_seqlen`` is ignored (constant size)."""
        device, dtype = self.state_device_dtype(device, dtype)
        B, N, H, D = batch_size, self.num_sinks + self.window_size, self.num_kv_heads, self.head_dim
        kv = ((N, H, D), dtype)
        return new_state(self.state_class, B, device, k_cache=kv, v_cache=kv, pos_cache=((N,), torch.long))

    # -- forward ---------------------------------------------------------------------------------
    def mix(self, x: Tensor, state: SWAState | None, attention_mask: Tensor | None) -> tuple[Tensor, SWAState | None]:
        if state is not None and attention_mask is None:
            if self.takes_decode_step(x, state.k_cache, state.v_cache, state.pos_cache):
                return self._decode_step(x, state), state
        slot, pos, valid = positions_and_pad(x, state, attention_mask, self.name)
        q, k, v = self.qkv(x, pos, None if state is None else state.k_cache.dtype)
        kpos = pos.masked_fill(~valid, -1)  # [B, T]; padding keys are never visible
        if state is None:
            # Right padding follows every real token, so causality hides it; only the leading padding
            # shifts the op's slots.
            pad = None if attention_mask is None else leading_padding(valid)
            return self.out(self._parallel(q, k, v, pos, kpos, pad)), None
        o = self._step(q, k, v, slot, pos, kpos, state)
        state.seen.add_(x.shape[1])
        return self.out(o), state

    def _decode_step(self, x: Tensor, state: SWAState) -> Tensor:
        """One eager token on CUDA (``takes_decode_step``): ``cached_step`` over the ring."""
        caches = (state.k_cache, state.v_cache, state.pos_cache)
        return self.cached_step(x, state, caches, ring=True, window_size=self.window_size, num_sinks=self.num_sinks)

    def _parallel(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, kpos: Tensor, pad: Tensor | None) -> Tensor:
        """q: [B, T, HQ, Dh], k, v: [B, T, HKV, Dh], pos/kpos: [B, T], pad: [B] or None -> [B, T, HQ, Dh]."""
        if self.flash_attn is not None:
            return self._parallel_flash(q, k, v, kpos, pad)
        return swa_attention(q, k, v, window_size=self.window_size, num_sinks=self.num_sinks, scale=self.scale, pad=pad)

    def _parallel_flash(self, q: Tensor, k: Tensor, v: Tensor, kpos: Tensor, pad: Tensor | None) -> Tensor:
        """The flash_attn backend: flash-attn's window ``window_size=(W - 1, 0)`` (keys t - W < j <= t, padding
        dropped through its variable-length kernel), and for swa_sink the sinks out of the window added here.

        q: [B, T, HQ, Dh], k, v: [B, T, HKV, Dh], kpos: [B, T] positions (-1 = padding), pad: [B] or None.
        Non-finite inputs behave as in the swa_attention op: the kernel multiplies masked probabilities (0) by the
        values of every key of a tile, so non-finite keys and values are zeroed for it, and every query that sees
        one (in its window, or as a sink) outputs NaN instead.
        """
        B, T, HQ, _ = q.shape
        W, S = self.window_size, self.num_sinks
        valid = None if pad is None else kpos >= 0  # [B, T]
        sinks = S > 0 and T > W  # otherwise every sink is inside the window of each query that sees it
        isolate = not all_finite(k, v)  # eager and finite: nothing to isolate
        if isolate:
            bad = ~(torch.isfinite(k) & torch.isfinite(v)).all(-1)  # [B, T, HKV]
            k = torch.where(bad[..., None], 0.0, k)
            v = torch.where(bad[..., None], 0.0, v)
        o, lse = self.flash_attn(q, k, v, valid, self.scale, window=W, return_lse=sinks)
        if sinks:
            o = self._add_sinks(q, k, v, kpos, pad, o, lse)
        if not isolate:
            return o
        count = F.pad(bad.int().cumsum(1), (0, 0, 1, 0))  # [B, T + 1, HKV]: bad keys at slots < t
        t = torch.arange(T, device=q.device)
        seen = (count[:, 1:] - count[:, (t + 1 - W).clamp(min=0)]) > 0  # a bad key at slots t - W < j <= t
        if S > 0:
            sink = ((kpos >= 0) & (kpos < S))[..., None]  # [B, T, 1]
            seen = seen | ((bad & sink).int().cumsum(1) > 0)
        seen = seen.repeat_interleave(HQ // k.shape[2], dim=2)  # [B, T, HQ]
        return torch.where(seen[..., None], float("nan"), o)

    def _add_sinks(
        self, q: Tensor, k: Tensor, v: Tensor, kpos: Tensor, pad: Tensor | None, o: Tensor, lse: Tensor
    ) -> Tensor:
        """Merge the sinks out of each query's window (positions j < S with t - j >= W) into flash-attn's window
        output ``o`` [B, T, HQ, Dh] through its log-sum-exp ``lse`` [B, T, HQ] (float32, -inf for padding queries).

        softmax over window + sinks = (e^lse * o + sum_j e^(s_j) v_j) / (e^lse + sum_j e^(s_j)), computed in float32
        with a detached running maximum (the result does not depend on it); O(T * S) next to the kernel's O(T * W).
        """
        B, T, HQ, D = q.shape
        HKV, S, W = k.shape[2], self.num_sinks, self.window_size
        G = HQ // HKV
        ids = torch.arange(S, device=q.device)
        slots = (ids if pad is None else ids + pad[:, None]).expand(B, S).clamp(max=T - 1)  # [B, S]
        k_s = torch.gather(k, 1, slots[:, :, None, None].expand(B, S, HKV, D)).float()  # [B, S, HKV, Dh]
        v_s = torch.gather(v, 1, slots[:, :, None, None].expand(B, S, HKV, D)).float()
        sink_pos = torch.gather(kpos, 1, slots)  # [B, S]: position s where the row has an s-th real token
        vis = (sink_pos == ids)[:, None, :] & (kpos[:, :, None] - sink_pos[:, None, :] >= W)  # [B, T, S]
        qg = q.float().reshape(B, T, HKV, G, D)
        s = torch.einsum("btkgd,bskd->btkgs", qg, k_s) * self.scale  # [B, T, HKV, G, S]
        s = torch.where(vis[:, :, None, None, :], s, float("-inf"))
        lse = torch.where(torch.isneginf(lse), 0.0, lse).reshape(B, T, HKV, G)  # padding queries: o is 0 there
        top = torch.maximum(lse, s.amax(-1)).detach()  # finite: lse is
        total = top + torch.log(torch.exp(lse - top) + torch.exp(s - top[..., None]).sum(-1))  # [B, T, HKV, G]
        p = torch.exp(s - total[..., None])  # [B, T, HKV, G, S]; invisible sinks: 0
        o_s = torch.einsum("btkgs,bskd->btkgd", p, v_s)  # [B, T, HKV, G, Dh]
        merged = o.float().reshape(B, T, HKV, G, D) * torch.exp(lse - total)[..., None] + o_s
        return merged.reshape(B, T, HQ, D).to(q.dtype)

    def _step(
        self, q: Tensor, k: Tensor, v: Tensor, slot: Tensor, pos: Tensor, kpos: Tensor, state: SWAState
    ) -> Tensor:
        """Attend over the cache and the chunk, writing the chunk into the cache (in place).

        One token without autograd (the decode step): write it, then the ``mixerzoo::swa_decode`` op over
        the fixed cache (a Triton kernel on CUDA, no copy of the cache). A longer chunk: attend over
        [cache, chunk] first (a chunk longer than W would overwrite keys its own queries need), then write.
        """
        T, W, S = q.shape[1], self.window_size, self.num_sinks
        if T == 1 and not (torch.is_grad_enabled() and q.requires_grad):
            self._write(k, v, slot, kpos, state)
            return swa_decode(
                q,
                state.k_cache,
                state.v_cache,
                state.pos_cache,
                pos,
                window_size=W,
                num_sinks=S,
                scale=self.scale,
            )
        dt = q.dtype
        keys = torch.cat([state.k_cache.to(dt), k], 1)
        values = torch.cat([state.v_cache.to(dt), v], 1)
        mask = torch.cat(
            [
                visible(pos, state.pos_cache, window=W, num_sinks=S),
                visible(pos, kpos, window=W, num_sinks=S) | self_diagonal(T, q.device),
            ],
            -1,
        )
        o = masked_attention(q, keys, values, mask, self.scale)
        self._write(k, v, slot, kpos, state)
        return o

    def _write(self, k: Tensor, v: Tensor, slot: Tensor, kpos: Tensor, state: SWAState) -> None:
        """Write a chunk (k, v: [B, T, HKV, Dh], kpos: [B, T]) into the cache: sinks to their slots, the
        last min(T, W) tokens to the ring (a sink's ring slot is marked empty)."""
        T, W, S = k.shape[1], self.window_size, self.num_sinks
        k, v = k.detach(), v.detach()  # a state never records autograd history
        n = min(T, W)  # only these can still be in a later query's window
        idx = S + slot[T - n :] % W  # [n], distinct ring slots
        ring_pos = kpos[:, T - n :]
        state.k_cache.index_copy_(1, idx, k[:, T - n :].to(state.k_cache.dtype))
        state.v_cache.index_copy_(1, idx, v[:, T - n :].to(state.v_cache.dtype))
        state.pos_cache.index_copy_(1, idx, ring_pos.masked_fill(ring_pos < S, -1))
        if S > 0:
            sink_ids = torch.arange(S, device=k.device)
            hit = kpos[:, :, None] == sink_ids  # [B, T, S]: token t is sink s
            found = hit.any(1)  # [B, S]
            src = hit.to(torch.int32).argmax(1)  # [B, S] index of that token in the chunk
            gather = src[:, :, None, None].expand(-1, -1, k.shape[2], k.shape[3])
            k_new = torch.gather(k, 1, gather).to(state.k_cache.dtype)
            v_new = torch.gather(v, 1, gather).to(state.v_cache.dtype)
            sinks = slice(0, S)
            state.k_cache[:, sinks] = torch.where(found[:, :, None, None], k_new, state.k_cache[:, sinks])
            state.v_cache[:, sinks] = torch.where(found[:, :, None, None], v_new, state.v_cache[:, sinks])
            state.pos_cache[:, sinks] = torch.where(found, sink_ids, state.pos_cache[:, sinks])


@register("swa_sink", config=SWASinkConfig, aliases=("streaming_llm",))
class SWASink(SWA):
    """SWA with attention sinks (StreamingLLM): the first ``num_sinks`` real tokens stay visible."""

    config: SWASinkConfig
    state_class = SWASinkState
    conformance_kwargs = {"window_size": 8, "num_sinks": 2}
