"""Eviction scores for eviction_swa (learnable token eviction, LTE; docs/mixers.md#router-architecture): the
per-KV-head CNN router, the non-learned key-norm score, and the straight-through value gate that trains it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..kernels._triton import HAS_TRITON
from ..kernels.eviction.router_conv import router_conv
from ..kernels.eviction.value_gate import value_gate_grad

__all__ = ["CNNRouter", "ValueGate", "key_norm_score", "router_margin"]


def router_margin(kernel_sizes: tuple[int, ...], dilations: tuple[int, ...]) -> int:
    """Tokens each side that a stack of 'same' convs reads: sum of d * (k - 1) / 2 (3 x (2 * 1) = 6)."""
    return sum(d * (k - 1) // 2 for k, d in zip(kernel_sizes, dilations, strict=True))


class CNNRouter(nn.Module):
    """Per-KV-head CNN over the sequence axis (grouped convs, one group per KV head).

    Layer i: dropout, conv (kernel k_i, dilation d_i, 'same' zero padding), times the padding mask,
    SiLU; widths 2Dh -> Dh -> Dh/2 -> ... (halving), then a 1x1 conv to one channel whose bias starts
    at +0.5 so that sigmoid(z) - 0.5 > 0 (nearly every token retained) early in training.

    shared=True: one CNN for every KV head (its weights shared across the heads, each head scored on its
    own input), the paper's ``routing_shared="layer"``. init="paper": Kaiming-normal conv weights
    (fan-in, ReLU gain), as the paper's models; "default": PyTorch's conv init (docs/paper.md#initialisation).

    forward(u, mask, dropout, all_valid=False) -> z
        u:    [B, L, H, 2*Dh] router input, concat(k before RoPE, v) per KV head
        mask: [B, L] bool, False where the token is padding or lies before the sequence start; such
              tokens read as zeros at every layer, exactly like the zero padding at the ends
        all_valid: the caller knows that mask is True everywhere (a call without padding): the input then
              needs no masked copy (the per-layer kernels' path; the same result)
        z:    [B, L, H] logits, float32: the 1x1 output conv runs in float32 whatever the dtype of u and
              autocast say (a fresh router's logits differ by ~0.005 around +0.5, where bfloat16 resolves
              0.002 to 0.004: bfloat16 logits would rank the tokens by their rounding)
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        kernel_sizes: tuple[int, ...],
        dilations: tuple[int, ...],
        dropout: float,
        *,
        shared: bool = False,
        init: str = "default",
    ):
        super().__init__()
        H = num_kv_heads
        G = 1 if shared else H  # conv groups: one per KV head, or one CNN applied to every head
        widths = [max(1, (2 * head_dim) >> i) for i in range(len(kernel_sizes) + 1)]
        self.num_kv_heads = H
        self.shared = shared
        self.dropout = dropout
        self.margin = router_margin(kernel_sizes, dilations)
        self.convs = nn.ModuleList(
            nn.Conv1d(G * c_in, G * c_out, k, dilation=d, padding=d * (k - 1) // 2, groups=G)
            for c_in, c_out, k, d in zip(widths[:-1], widths[1:], kernel_sizes, dilations, strict=True)
        )
        self.out = nn.Conv1d(G * widths[-1], G, 1, groups=G)
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "default") -> None:
        """ "default": the convs keep PyTorch's init; "paper": Kaiming-normal weights (fan-in, ReLU gain), conv
        biases as PyTorch's. The output bias starts at +0.5 in both."""
        if init == "paper":
            for conv in (*self.convs, self.out):
                nn.init.kaiming_normal_(conv.weight, a=0.0, mode="fan_in", nonlinearity="relu")
        elif init != "default":
            raise ValueError(f"CNNRouter: init must be 'default' or 'paper', got {init!r}")
        nn.init.constant_(self.out.bias, 0.5)

    def forward(self, u: Tensor, mask: Tensor, dropout: bool, all_valid: bool = False) -> Tensor:
        if _layer_kernels(u):
            return self._forward_layers(u, mask, dropout, all_valid)
        B, L, H = u.shape[:3]
        if self.shared:  # every head is a sequence of its own through the one CNN
            u = rearrange(u, "b l h c -> (b h) l 1 c")
            mask = mask.repeat_interleave(H, dim=0)  # [(B H), L]
        m = mask[:, None, :]  # [B, 1, L]
        # Selected, not multiplied: a NaN at a masked position must not reach its neighbours' scores.
        h = torch.where(m, rearrange(u, "b l h c -> b (h c) l"), 0.0)  # groups: contiguous channel blocks
        for conv in self.convs:
            h = F.silu(torch.where(m, conv(F.dropout(h, self.dropout, training=dropout)), 0.0))
        with torch.autocast(h.device.type, enabled=False):  # [B, H, L] ([(B H), 1, L] when shared)
            z = F.conv1d(h.float(), self.out.weight.float(), self.out.bias.float(), groups=self.out.groups)
        if self.shared:
            return rearrange(z, "(b h) 1 l -> b l h", b=B)
        return rearrange(z, "b h l -> b l h")

    def _forward_layers(self, u: Tensor, mask: Tensor, dropout: bool, all_valid: bool = False) -> Tensor:
        """``forward`` in the [B, L, H, C] layout of u, one ``router_conv`` op per hidden layer (Triton on CUDA:
        no layout transposes around cuDNN's grouped convs), then the 1x1 output conv as a float32 dot over the
        channels. The same function; dropout draws its masks in this layout."""
        # Under autocast a conv runs in the autocast dtype, weights and input alike; the op is no autocast op, so
        # the cast is made here, as nn.Conv1d's would be.
        dev = u.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else u.dtype
        # selected, not multiplied (a NaN stays out); with every token valid, nothing to select: a pass over u (and
        # one over its gradient) fewer, as a training step without padding runs
        h = u if all_valid else torch.where(mask[:, :, None, None], u, 0.0)
        h = h if h.dtype == dt else h.to(dt)
        for conv in self.convs:
            if dropout:  # (F.dropout without training returns its input: a dispatch of host time per layer)
                h = F.dropout(h, self.dropout, training=True)
            w, b = (p if p.dtype == dt else p.to(dt) for p in (conv.weight, conv.bias))
            h = router_conv(h, w, b, mask, dilation=conv.dilation[0], shared=self.shared)
        G = 1 if self.shared else self.num_kv_heads
        w = self.out.weight.float().view(G, -1)  # [G, C]
        with torch.autocast(h.device.type, enabled=False):
            return (h.float() * w).sum(-1) + self.out.bias.float()  # [B, L, H]


def _layer_kernels(u: Tensor) -> bool:
    """Whether CNNRouter.forward takes the per-layer kernels: CUDA with Triton."""
    return u.is_cuda and HAS_TRITON


def key_norm_score(k: Tensor, threshold: float) -> Tensor:
    """Non-learned eviction score: ``1 / (1 + rms(k)) - threshold`` per token and KV head.

    Low-norm keys draw the most attention (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based
    Strategy for KV Cache Compression"), so they score highest. With ``threshold = 0`` every token is
    retained and the buffer keeps the C lowest-norm keys among those that left the window.

    k: [B, T, H, Dh] keys before RoPE -> [B, T, H] float32.
    """
    rms = k.float().pow(2).mean(-1).sqrt()
    return 1.0 / (1.0 + rms) - threshold


class ValueGate(torch.autograd.Function):
    """Identity on the values whose backward also gives the router score a gradient.

    The hard keep/evict choice has no gradient. Treat each value as gated, ``v * g`` with ``g = 1``
    evaluated at the gate: ``dL/dg = sum_d dv * v``, which is passed to the score r (straight-through).

    forward(v, r) -> v;  v: [B, T, H, Dh], r: [B, T, H]
    backward: (dv, sum_d dv * v) in r's dtype, the sum over float32 products (kernels/eviction/value_gate.py:
    one pass over dv and v on the GPU).
    """

    @staticmethod
    def forward(ctx, v: Tensor, r: Tensor) -> Tensor:
        ctx.save_for_backward(v)
        ctx.r_dtype = r.dtype
        return v.view_as(v)

    @staticmethod
    def backward(ctx, dv: Tensor) -> tuple[Tensor, Tensor]:
        (v,) = ctx.saved_tensors
        dr = value_gate_grad(dv, v).to(ctx.r_dtype)
        return dv, dr
