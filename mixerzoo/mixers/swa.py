"""Sliding-window attention, and SWA with attention sinks (StreamingLLM, Xiao et al. 2023).

Query at position t sees key j iff ``0 <= j <= t`` and (``t - j < window_size`` or ``j < num_sinks``).
Positions count real tokens only: with left padding, the sinks are the first ``num_sinks`` real tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..kernels.swa import swa_attention
from ..registry.core import register
from .attention_common import AttentionMixer, check_attention_heads, masked_attention, self_diagonal, visible
from .base import MixerConfig, State, positions_and_pad, state_dataclass, state_field

__all__ = ["SWA", "SWAConfig", "SWASink", "SWASinkConfig", "SWASinkState", "SWAState"]


@dataclasses.dataclass(frozen=True)
class SWAConfig(MixerConfig):
    """Sliding-window attention.

    num_kv_heads: key/value heads (GQA); None = num_heads.   head_dim: None = hidden_size // num_heads.
    window_size:  W, keys per query (the query's own included).   rope_theta: RoPE base.
    """

    num_kv_heads: int | None = None
    head_dim: int | None = None
    window_size: int = 512
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_attention_heads(self)
        self.check_int("window_size", minimum=1)


@dataclasses.dataclass(frozen=True)
class SWASinkConfig(SWAConfig):
    """SWA plus ``num_sinks`` attention sinks: the first S tokens stay visible to every later query."""

    num_sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("num_sinks", minimum=0)


@state_dataclass
class SWAState(State):
    """Decode state of swa (constant size): a ring buffer of the last W tokens, indexed by slot % W.

    k_win, v_win: [B, W, HKV, Dh] keys (RoPE applied) and values
    pos_win:      [B, W] int64 position of each slot's token; -1 for empty slots and padding
    """

    k_win: Tensor = state_field()
    v_win: Tensor = state_field()
    pos_win: Tensor = state_field(fill=-1)


@state_dataclass
class SWASinkState(SWAState):
    """Decode state of swa_sink: the window ring buffer plus S sink slots (slot s holds position s).

    k_sink, v_sink: [B, S, HKV, Dh];   pos_sink: [B, S] int64, -1 until the sink token has been seen
    """

    k_sink: Tensor = state_field()
    v_sink: Tensor = state_field()
    pos_sink: Tensor = state_field(fill=-1)


@register("swa", config=SWAConfig, aliases=("sliding_window_attention",))
class SWA(AttentionMixer):
    """Sliding-window attention with RoPE and GQA. See the module docstring for the visible set.

    Parallel form: the ``mixerzoo::swa_attention`` op (Triton on CUDA, its reference on CPU), left
    padding passed as per-row counts; float64 input takes a masked SDPA instead. Decode: attention
    over [sinks, ring buffer, new tokens], then the new tokens are written into the ring (and the
    sink slots); per-step cost O(W + S), independent of the length.
    """

    config: SWAConfig
    state_class = SWAState
    conformance_kwargs = {"window_size": 8}

    def __init__(self, config: SWAConfig):
        super().__init__(config)
        self.window_size = config.window_size
        self.num_sinks = getattr(config, "num_sinks", 0)

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
        B, W, S, H, D = batch_size, self.window_size, self.num_sinks, self.num_kv_heads, self.head_dim
        fields = dict(
            seen=torch.zeros((), dtype=torch.long, device=device),
            pad=torch.zeros(B, dtype=torch.long, device=device),
            k_win=torch.zeros(B, W, H, D, dtype=dtype, device=device),
            v_win=torch.zeros(B, W, H, D, dtype=dtype, device=device),
            pos_win=torch.full((B, W), -1, dtype=torch.long, device=device),
        )
        if self.state_class is SWASinkState:
            fields.update(
                k_sink=torch.zeros(B, S, H, D, dtype=dtype, device=device),
                v_sink=torch.zeros(B, S, H, D, dtype=dtype, device=device),
                pos_sink=torch.full((B, S), -1, dtype=torch.long, device=device),
            )
        return self.state_class(**fields)

    # -- forward ---------------------------------------------------------------------------------
    def mix(self, x: Tensor, state: SWAState | None, attention_mask: Tensor | None) -> tuple[Tensor, SWAState | None]:
        slot, pos, valid = positions_and_pad(x, state, attention_mask)
        q, k, v = self.qkv(x, pos)
        kpos = pos.masked_fill(~valid, -1)  # [B, T]; padding keys are never visible
        if state is None:
            pad = None if attention_mask is None else (~valid).sum(-1)
            return self.out(self._parallel(q, k, v, pos, kpos, pad)), None
        o = self._step(q, k, v, slot, pos, kpos, state)
        state.seen.add_(x.shape[1])
        return self.out(o), state

    def _parallel(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, kpos: Tensor, pad: Tensor | None) -> Tensor:
        """q: [B, T, HQ, Dh], k, v: [B, T, HKV, Dh], pos/kpos: [B, T], pad: [B] or None -> [B, T, HQ, Dh]."""
        if q.dtype != torch.float64:
            return swa_attention(
                q, k, v, window_size=self.window_size, num_sinks=self.num_sinks, scale=self.scale, pad=pad
            )
        # float64 (CPU gradchecks): the op's CPU reference computes in float32, so stay in float64 here.
        mask = visible(pos, kpos, window=self.window_size, num_sinks=self.num_sinks)
        mask = mask | self_diagonal(q.shape[1], q.device)  # padding queries see themselves
        return masked_attention(q, k, v, mask, self.scale)

    def _step(
        self, q: Tensor, k: Tensor, v: Tensor, slot: Tensor, pos: Tensor, kpos: Tensor, state: SWAState
    ) -> Tensor:
        """Attend over [sinks, ring, chunk], then write the chunk into the state (in place)."""
        T, W, S = q.shape[1], self.window_size, self.num_sinks
        dt = q.dtype
        # Each key is reachable through one block only: a sink through the sink block once it has
        # left the window, through the ring or the chunk while inside it.
        keys = [state.k_win.to(dt), k]
        values = [state.v_win.to(dt), v]
        masks = [
            visible(pos, state.pos_win, window=W),
            visible(pos, kpos, window=W, num_sinks=S) | self_diagonal(T, q.device),
        ]
        if S > 0:
            ks = state.pos_sink[:, None, :]  # [B, 1, S]
            keys.insert(0, state.k_sink.to(dt))
            values.insert(0, state.v_sink.to(dt))
            masks.insert(0, (ks >= 0) & (pos[:, :, None] - ks >= W))
        o = masked_attention(q, torch.cat(keys, 1), torch.cat(values, 1), torch.cat(masks, -1), self.scale)

        # Ring: only the last min(T, W) tokens of the chunk can still be in a later query's window.
        n = min(T, W)
        idx = slot[T - n :] % W  # [n], distinct
        state.k_win.index_copy_(1, idx, k[:, T - n :].to(state.k_win.dtype))
        state.v_win.index_copy_(1, idx, v[:, T - n :].to(state.v_win.dtype))
        state.pos_win.index_copy_(1, idx, kpos[:, T - n :])
        if S > 0:
            sink_ids = torch.arange(S, device=q.device)
            hit = kpos[:, :, None] == sink_ids  # [B, T, S]: token t is sink s
            found = hit.any(1)  # [B, S]
            src = hit.to(torch.int32).argmax(1)  # [B, S] index of that token in the chunk
            gather = src[:, :, None, None].expand(-1, -1, k.shape[2], k.shape[3])
            k_new = torch.gather(k, 1, gather).to(state.k_sink.dtype)
            v_new = torch.gather(v, 1, gather).to(state.v_sink.dtype)
            state.k_sink.copy_(torch.where(found[:, :, None, None], k_new, state.k_sink))
            state.v_sink.copy_(torch.where(found[:, :, None, None], v_new, state.v_sink))
            state.pos_sink.copy_(torch.where(found, sink_ids, state.pos_sink))
        return o


@register("swa_sink", config=SWASinkConfig, aliases=("streaming_llm",))
class SWASink(SWA):
    """SWA with attention sinks (StreamingLLM): the first ``num_sinks`` real tokens stay visible."""

    config: SWASinkConfig
    state_class = SWASinkState
    conformance_kwargs = {"window_size": 8, "num_sinks": 2}
