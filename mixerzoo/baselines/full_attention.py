"""Full causal softmax attention (Vaswani et al. 2017) with RoPE and GQA, the baseline of every hybrid.

The parallel form runs through a chosen backend (torch SDPA, flash-attn 4 or 2, xformers, FlexAttention);
decode keeps a KV cache of capacity ``max_seqlen`` and attends over it with torch SDPA (eagerly on CUDA, one token
without a mask or autograd: two Triton kernels, see ``FullAttention._decode_step``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..mixers.attention_common import AttentionMixer, all_finite, check_attention_heads, masked_attention, visible
from ..mixers.base import MixerConfig, State, check_capacity, new_state, positions_and_pad, state_dataclass, state_field
from ..registry.core import register
from .backends import BACKENDS, load_backend

__all__ = ["FullAttention", "FullAttentionConfig", "FullAttentionState"]


@dataclasses.dataclass(frozen=True)
class FullAttentionConfig(MixerConfig):
    """Causal multi-head / grouped-query attention.

    num_kv_heads: key/value heads (GQA); None = num_heads.   head_dim: None = hidden_size // num_heads.
    backend:      parallel-form kernel: "sdpa" (torch picks cuDNN or flash), "flash_attn" (flash-attn 4, else 2;
                  CUDA, float16 / bfloat16), "xformers", "flex". One not installed or unable to run here fails at build.
    max_seqlen:   KV-cache capacity of init_state when it is not given there.
    """

    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    backend: str = "sdpa"
    max_seqlen: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check_attention_heads(self)
        self.check_choice("backend", BACKENDS)
        self.check_int("max_seqlen", minimum=1)


@state_dataclass
class FullAttentionState(State):
    """KV cache of capacity L = max_seqlen, indexed by slot (left padding included).

    k, v: [B, L, HKV, Dh] keys (RoPE applied) and values
    kpos: [B, L] int64 position of each slot's token; -1 for empty slots and padding
    """

    k: Tensor = state_field()
    v: Tensor = state_field()
    kpos: Tensor = state_field(fill=-1)


@register("full_attention", config=FullAttentionConfig, aliases=("attn", "mha"))
class FullAttention(AttentionMixer):
    """Causal attention with RoPE and GQA; see FullAttentionConfig for the backends."""

    config: FullAttentionConfig
    state_class = FullAttentionState
    state_growth = "linear"
    backends = BACKENDS

    def __init__(self, config: FullAttentionConfig):
        super().__init__(config)
        self._attend = load_backend(config.backend, head_dim=self.head_dim)
        # backend="flash_attn": which flash-attn runs (``.version`` 4 or 2, ``.name``); None for the other backends
        self.flash_attn = getattr(self._attend, "flash_attn", None)

    # -- state -----------------------------------------------------------------------------------
    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seqlen: int | None = None,
    ) -> FullAttentionState:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_seqlen`` tokens (padding included);
        ``max_seqlen=None`` takes the config's."""
        L = self.config.max_seqlen if max_seqlen is None else max_seqlen
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ValueError(f"{self.name}: max_seqlen must be an int >= 1, got {L!r}")
        device, dtype = self.state_device_dtype(device, dtype)
        B, H, D = batch_size, self.num_kv_heads, self.head_dim
        kv = ((L, H, D), dtype)
        return new_state(FullAttentionState, B, device, k=kv, v=kv, kpos=((L,), torch.long))

    def _state_capacity(self, state: FullAttentionState) -> int:
        return state.k.shape[1]

    # -- forward ---------------------------------------------------------------------------------
    def mix(
        self, x: Tensor, state: FullAttentionState | None, attention_mask: Tensor | None
    ) -> tuple[Tensor, FullAttentionState | None]:
        if state is not None:
            self._check_capacity(state, x.shape[1])
            if attention_mask is None and self.takes_decode_step(x, state.k, state.v, state.kpos):
                return self._decode_step(x, state), state
        slot, pos, valid = positions_and_pad(x, state, attention_mask, self.name)
        q, k, v = self.qkv(x, pos, None if state is None else state.k.dtype)
        if state is None:
            return self.out(self._parallel(q, k, v, None if attention_mask is None else valid)), None

        # Write the chunk into the cache (detached: a state never records autograd history), then attend
        # over the whole cache (fixed shape [B, L]).
        kpos = pos.masked_fill(~valid, -1)  # padding keys are never visible
        state.k.index_copy_(1, slot, k.detach().to(state.k.dtype))
        state.v.index_copy_(1, slot, v.detach().to(state.v.dtype))
        state.kpos.index_copy_(1, slot, kpos)
        keys, values = state.k.to(q.dtype), state.v.to(q.dtype)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # The chunk's gradient reaches k and v through out-of-place copies; autograd then never
            # saves the cache itself, which the next call overwrites in place.
            keys, values = keys.index_copy(1, slot, k), values.index_copy(1, slot, v)
        L = state.k.shape[1]
        itself = torch.arange(L, device=x.device) == slot[:, None]  # [T, L]: padding queries see themselves
        mask = visible(pos, state.kpos) | itself
        o = masked_attention(q, keys, values, mask, self.scale)
        state.seen.add_(x.shape[1])
        return self.out(o), state

    def _decode_step(self, x: Tensor, state: FullAttentionState) -> Tensor:
        """One eager token on CUDA (``takes_decode_step``; capacity checked by the caller): ``cached_step`` over the
        linear cache, with a window beyond any distance; the slots above ``seen`` are never read."""
        caches = (state.k, state.v, state.kpos)
        return self.cached_step(x, state, caches, ring=False, window_size=state.k.shape[1] + 1)

    def _parallel(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        """The backend's causal attention, NaN-isolated: q [B, T, HQ, Dh], k and v [B, T, HKV, Dh].

        The backends' kernels multiply masked probabilities (0) by the values of later keys, so a NaN or
        Inf at key j would reach queries before j. Non-finite keys and values are zeroed for the kernel
        and every query at or after them (in the same KV head) is marked NaN instead: a non-finite input
        still shows, and only where causality lets it.
        """
        if all_finite(k, v):  # eager and finite: nothing to isolate
            return self._attend(q, k, v, valid, self.scale)
        bad = ~(torch.isfinite(k) & torch.isfinite(v)).all(-1)  # [B, T, HKV]
        k = torch.where(bad[..., None], 0.0, k)
        v = torch.where(bad[..., None], 0.0, v)
        o = self._attend(q, k, v, valid, self.scale)
        seen_bad = bad.int().cumsum(1) > 0  # [B, T, HKV]: a non-finite key at or before t
        seen_bad = seen_bad.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # [B, T, HQ]
        return torch.where(seen_bad[..., None], float("nan"), o)

    def _check_capacity(self, state: FullAttentionState, T: int) -> None:
        check_capacity(self.name, state, T, state.k.shape[1])
