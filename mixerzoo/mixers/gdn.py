"""Gated DeltaNet token mixer (Yang, Kautz and Hatamizadeh, "Gated Delta Networks", ICLR 2025)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..kernels.gdn import causal_conv1d, gated_delta_rule
from ..kernels.gdn.decode_step import gdn_decode_step
from ..registry.core import register
from .base import (
    MixerConfig,
    State,
    TokenMixer,
    acc_dtype,
    check_row_open,
    new_state,
    positions_and_pad,
    state_dataclass,
    state_field,
    step_projections,
)

__all__ = ["GDNConfig", "GDNState", "GatedDeltaNet"]


@dataclasses.dataclass(frozen=True)
class GDNConfig(MixerConfig):
    """Gated DeltaNet settings (docs/mixers.md#gdn).

    head_dim:   query/key head dim K (None: hidden_size // num_heads); on CUDA at most 256.
    head_v_dim: value head dim V (None: head_dim).
    conv_size:  kernel of the short causal depthwise convolution on q, k and v.
    norm_eps:   epsilon of the gated output RMSNorm.
    """

    head_dim: int | None = None
    head_v_dim: int | None = None
    conv_size: int = 4
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("head_dim", minimum=1, allow_none=True)
        self.check_int("head_v_dim", minimum=1, allow_none=True)
        self.check_heads(head_dim=self.head_dim)
        self.check_int("conv_size", minimum=2)
        self.check_float("norm_eps", low=1e-12, high=1.0)  # > 0: padding gives o = 0

    @property
    def key_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def value_dim(self) -> int:
        return self.head_v_dim if self.head_v_dim is not None else self.key_dim


@state_dataclass
class GDNState(State):
    """Decode state of ``gdn``; constant size.

    S:    [B, H, K, V] float32, the delta-rule memory of every head.
    conv: [B, C, conv_size - 1], the last conv_size - 1 inputs of the short convolution (C = 2*H*K + H*V:
          q, k and v channels, in that order), oldest first; zeros at the sequence start.
    """

    S: Tensor = state_field()
    conv: Tensor = state_field()


def _l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / ||x|| over the last dim, in float32 (or float64); a zero vector (padding) stays zero."""
    xf = x.to(acc_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


@register("gdn", config=GDNConfig, aliases=("gated_deltanet",))
class GatedDeltaNet(TokenMixer):
    """Gated DeltaNet: per head, S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T and
    o_t = K**-0.5 * S_t^T q_t, with L2-normalised q, k after a short causal conv + SiLU, then a gated
    RMSNorm per head and an output projection.

    forward(x, state=None, *, attention_mask=None) -> (y, state)
        x: [B, T, D] -> y: [B, T, D]. The parallel form (state=None) and prefill/decode (state given)
        call the same op, ``kernels.gdn.gated_delta_rule`` (chunked form on long inputs, Triton on CUDA).
    Gradients flow within a call (to the parameters and x) but never across calls through the state.
    """

    state_class = GDNState
    state_growth = "constant"
    supports_gqa = False
    conformance_kwargs: dict = {}
    conformance_seqlen = 80  # past one chunk of 64: the parallel form takes the chunked path

    def __init__(self, config: GDNConfig):
        super().__init__(config)
        D, H = config.hidden_size, config.num_heads
        K, V = config.key_dim, config.value_dim
        self.num_heads, self.key_dim, self.value_dim = H, K, V
        self.conv_channels = 2 * H * K + H * V
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * V, bias=False)
        self.a_proj = nn.Linear(D, H, bias=False)  # decay input a_t
        self.b_proj = nn.Linear(D, H, bias=False)  # beta_t = sigmoid(b_t)
        self.g_proj = nn.Linear(D, H * V, bias=False)  # output gate
        self.o_proj = nn.Linear(H * V, D, bias=False)
        # One depthwise kernel per channel of [q, k, v]: a single conv over the concatenation.
        self.conv_weight = nn.Parameter(torch.empty(self.conv_channels, config.conv_size))
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.norm_weight = nn.Parameter(torch.empty(V))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj, self.o_proj):
            lin.reset_parameters()
        bound = self.config.conv_size**-0.5  # nn.Conv1d's default for a depthwise kernel
        self.conv_weight.uniform_(-bound, bound)
        # Decay rates A ~ U[1, 16] and time steps dt log-uniform in [1e-3, 1e-1] (Mamba-2's init):
        # alpha = exp(-A * dt) starts between ~0.2 and ~1 per token.
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.norm_weight.fill_(1.0)
        for p in (self.A_log, self.dt_bias):
            p._no_weight_decay = True

    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seqlen: int | None = None,
    ) -> GDNState:
        """An empty state. ``dtype`` (default: the parameters') is the conv tails'; S is float32
        (float64 for a float64 mixer on the CPU).
        ``max_seqlen`` is ignored: the state has constant size."""
        p = self.conv_weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        H, K, V = self.num_heads, self.key_dim, self.value_dim
        conv = (self.conv_channels, self.config.conv_size - 1)
        return new_state(GDNState, batch_size, device, S=((H, K, V), acc_dtype(dtype)), conv=(conv, dtype))

    def mix(self, x: Tensor, state: GDNState | None, attention_mask: Tensor | None) -> tuple[Tensor, GDNState | None]:
        T = x.shape[1]
        H, K, V = self.num_heads, self.key_dim, self.value_dim
        if T == 1 and state is not None and attention_mask is None and x.is_cuda and not torch.is_grad_enabled():
            check_row_open(self.name, state)  # positions_and_pad's one check for a mask-less step
            return self._decode_step(x, state), state
        _, _, valid = positions_and_pad(x, state, attention_mask, self.name)  # valid: [B, T]

        u = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # [B, T, C]
        if attention_mask is not None:
            # Padding enters the conv as the zeros an unpadded sequence starts with (selected, so that
            # nothing computed at a padding position reaches a real token).
            u = torch.where(valid[..., None], u, 0.0)
        # The ops may keep their initial states for the backward; the state is overwritten in place below.
        S0 = conv0 = None
        if state is not None:
            keep = torch.is_grad_enabled()
            S0 = state.S.clone() if keep else state.S
            conv0 = state.conv.clone() if keep else state.conv
        # the weight in u's dtype: under autocast the projections give bfloat16 while the parameter stays float32
        # (what autocast does for a conv); a no-op otherwise
        w = self.conv_weight.to(u.dtype)
        u, tail = causal_conv1d(
            u, w, None, initial_state=conv0, output_final_state=state is not None, activation="silu"
        )  # [B, T, C], [B, C, W-1] or None
        q, k, v = u.split([H * K, H * K, H * V], dim=-1)
        q = _l2norm(rearrange(q, "b t (h d) -> b t h d", h=H))  # [B, T, H, K]
        k = _l2norm(rearrange(k, "b t (h d) -> b t h d", h=H))  # [B, T, H, K]
        v = rearrange(v, "b t (h d) -> b t h d", h=H)  # [B, T, H, V]

        acc = acc_dtype(x.dtype)  # float32, or float64 (CPU gradchecks)
        # log alpha_t = -exp(A_log) * softplus(a_t + dt_bias) <= 0, in float32: it is summed over chunks.
        g = -self.A_log.to(acc).exp() * F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc))  # [B, T, H]
        beta = torch.sigmoid(self.b_proj(x).to(acc))  # [B, T, H]
        if attention_mask is not None:
            # alpha = 1, beta = 0: a pad token leaves S unchanged.
            g = torch.where(valid[..., None], g, 0.0)
            beta = torch.where(valid[..., None], beta, 0.0)

        # A non-finite input gives a non-finite decay or beta, which the op refuses: that token leaves the
        # state unchanged instead (g = 0, beta = 0) and carries its NaN in v, so that it still shows in the
        # outputs from that token on, and only there.
        bad = ~(torch.isfinite(g) & torch.isfinite(beta))  # [B, T, H]
        g, beta = torch.where(bad, 0.0, g), torch.where(bad, 0.0, beta)
        v = torch.where(bad[..., None], float("nan"), v)
        o, S = gated_delta_rule(
            q, k, v, g, beta, scale=K**-0.5, initial_state=S0, output_final_state=state is not None
        )  # o: [B, T, H, V]; S: [B, H, K, V] float32 or None

        # Gated RMSNorm per head, in float32.
        of = o.to(acc)
        of = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + self.config.norm_eps) * self.norm_weight.to(acc)
        gate = rearrange(self.g_proj(x), "b t (h d) -> b t h d", h=H).to(acc)
        o = (of * F.silu(gate)).to(x.dtype)
        y = self.o_proj(rearrange(o, "b t h d -> b t (h d)"))

        if state is not None:
            with torch.no_grad():
                state.S.copy_(S)
                state.conv.copy_(tail)
                state.seen.add_(T)
        return y, state

    def _decode_step(self, x: Tensor, state: GDNState) -> Tensor:
        """One token on the GPU without autograd: the projections, one fused kernel for everything between
        them (``kernels.gdn.decode_step``: conv, norms, gates, the delta-rule update of S in place), the
        output projection. Same results as the general path to float32 rounding."""
        # the six projections [q | k | v | a | b | g] from one matmul (step_projections), in x's (the state's) dtype:
        # autocast gives them bfloat16
        projs = (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj)
        o = gdn_decode_step(
            step_projections(self, "in", projs, x.select(1, 0), x.dtype),
            self.conv_weight,
            state.conv,
            self.A_log,
            self.dt_bias,
            self.norm_weight,
            state.S,
            scale=self.key_dim**-0.5,
            norm_eps=self.config.norm_eps,
        )
        state.seen.add_(1)
        return self.o_proj(o).unsqueeze(1)
