"""Anchors timed in the same run as the mixers: other implementations of the same computation.

- ``full_attention``: the layer with its attention core replaced by raw SDPA (``is_causal``) and, on CUDA,
  by FlexAttention with a causal block mask;
- ``swa``, ``swa_sink``: the layer with its core replaced by FlexAttention with the same window (and sinks)
  mask on CUDA, by SDPA with the explicit mask on the CPU;
- ``gdn``: the gated delta rule core alone (rows ``core:gdn``), mixerzoo's op against flash-linear-attention's
  ``chunk_gated_delta_rule``, on CUDA when that package is installed.

A layer anchor keeps the mixer's own projections and RoPE (``AttentionMixer.qkv`` / ``out``), so that the ratio
to the mixer's row is the ratio of the cores with the rest of the layer in both.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Anchor", "CoreCase", "core_cases", "layer_anchors", "lift_fla_backward_guard", "missing_anchor_packages"]

FLA_PIP = "flash-linear-attention"


@dataclasses.dataclass
class Anchor:
    """A layer anchor: ``fn(x) -> y`` with x, y [B, T, D], for one sequence length."""

    impl: str
    fn: Callable[[Tensor], Tensor]
    note: str


@dataclasses.dataclass
class CoreCase:
    """A core benchmark: ``make(B, T)`` returns (inputs needing grad, ``fn(*inputs) -> output``)."""

    op: str
    impl: str
    make: Callable[[int, int], tuple[list[Tensor], Callable[..., Tensor]]]
    note: str
    flops_per_token: float


def _mask_of(name: str, mixer: nn.Module) -> tuple[int | None, int]:
    """(window, sinks) of an attention mixer's mask; window None for full causal attention."""
    if name == "full_attention":
        return None, 0
    return mixer.config.window_size, getattr(mixer.config, "num_sinks", 0)


def _with_core(mixer: nn.Module, core: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def layer(x: Tensor) -> Tensor:  # x [B, T, D] -> [B, T, D]
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device).expand(B, T)
        q, k, v = mixer.qkv(x, pos)  # [B, T, HQ, Dh], [B, T, HKV, Dh] x 2
        return mixer.out(core(q, k, v))

    return layer


def _sdpa_core(mixer: nn.Module, window: int | None, sinks: int, T: int, device: torch.device):
    gqa = mixer.num_heads != mixer.num_kv_heads
    mask = None
    if window is not None:
        t = torch.arange(T, device=device)
        d = t[:, None] - t[None, :]  # [T, T] query - key
        mask = (d >= 0) & ((d < window) | (t[None, :] < sinks))

    def core(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=mixer.scale,
            enable_gqa=gqa,
        )
        return o.transpose(1, 2)

    return core


def _flex_core(mixer: nn.Module, window: int | None, sinks: int, T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, ki):
        if window is None:
            return qi >= ki
        return (qi >= ki) & ((qi - ki < window) | (ki < sinks))

    torch.compiler.reset()  # a fresh compile per length and mask, clear of the recompile limit
    block_mask = create_block_mask(mask_mod, None, None, T, T, device=device)
    flex = torch.compile(flex_attention, dynamic=False)
    gqa = mixer.num_heads != mixer.num_kv_heads

    def core(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        o = flex(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=block_mask,
            scale=mixer.scale,
            enable_gqa=gqa,
        )
        return o.transpose(1, 2)

    return core


def layer_anchors(name: str, mixer: nn.Module, T: int, device: torch.device) -> list[Anchor]:
    """The layer anchors of mixer ``name`` at sequence length T on ``device`` (none for other mixers)."""
    if name not in ("full_attention", "swa", "swa_sink"):
        return []
    window, sinks = _mask_of(name, mixer)
    what = "causal" if window is None else f"W={window}" + (f" S={sinks}" if sinks else "")
    out = []
    if window is None or device.type != "cuda":
        how = "is_causal" if window is None else "explicit bool mask"
        out.append(
            Anchor(
                "sdpa",
                _with_core(mixer, _sdpa_core(mixer, window, sinks, T, device)),
                f"mixerzoo projections + RoPE around torch SDPA ({how}, {what})",
            )
        )
    if device.type == "cuda":
        out.append(
            Anchor(
                "flex",
                _with_core(mixer, _flex_core(mixer, window, sinks, T, device)),
                f"mixerzoo projections + RoPE around FlexAttention (compiled, block mask {what})",
            )
        )
    return out


def lift_fla_backward_guard() -> str:
    """flash-linear-attention 0.6 refuses its gated-delta-rule backward on Hopper with Triton < 3.7.1 (a miscompile
    it guards against). An anchor is timed, never trusted for its values, so the guard is lifted for the process;
    returns the note its rows carry (empty when there was no guard to lift, or fla is not installed)."""
    try:
        from fla.ops.common import chunk_o as fla_chunk_o
    except ImportError:
        return ""
    if getattr(fla_chunk_o, "TRITON_ABOVE_3_7_1", True) is not False:
        return ""
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    return " (its backward guard for Triton < 3.7.1 on Hopper lifted: timed, not used for values)"


def missing_anchor_packages(name: str, device: torch.device) -> list[str]:
    """pip names of the optional packages an anchor of ``name`` would need and that are not installed."""
    if name == "gdn" and device.type == "cuda" and importlib.util.find_spec("fla") is None:
        return [FLA_PIP]
    return []


def core_cases(name: str, mixer: nn.Module, device: torch.device, dtype: torch.dtype) -> list[CoreCase]:
    """Core benchmarks with an anchor for mixer ``name``: gdn on CUDA with flash-linear-attention installed."""
    if name != "gdn" or device.type != "cuda" or missing_anchor_packages(name, device):
        return []
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from ..kernels import gated_delta_rule
    from .flops import GDN_CHUNK

    H, K, V = mixer.num_heads, mixer.key_dim, mixer.value_dim
    C = GDN_CHUNK
    scale = K**-0.5

    def make_inputs(B: int, T: int) -> list[Tensor]:
        # as the mixer feeds its op: L2-normalised q and k, log decays mostly near 0, beta in (0, 1)
        q = F.normalize(torch.randn(B, T, H, K, device=device, dtype=torch.float32), dim=-1).to(dtype)
        k = F.normalize(torch.randn(B, T, H, K, device=device, dtype=torch.float32), dim=-1).to(dtype)
        v = torch.randn(B, T, H, V, device=device, dtype=dtype)
        g = F.logsigmoid(torch.randn(B, T, H, device=device) + 3).to(dtype)
        beta = torch.sigmoid(torch.randn(B, T, H, device=device)).to(dtype)
        return [t.requires_grad_() for t in (q, k, v, g, beta)]

    def ours(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, scale=scale)[0]

    def fla(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)[0]

    flops = 6 * C * K + 4 * C * V + 6 * K * V + 2 * C * C / 3
    note = f"gated delta rule core, H={H} K={K} V={V}, inputs [B, T, H, K] in {str(dtype).removeprefix('torch.')}"
    fla_note = f"{note}; fla chunk_gated_delta_rule" + lift_fla_backward_guard()
    return [
        CoreCase("core:gdn", "mixerzoo", lambda B, T: (make_inputs(B, T), ours), note, flops * H),
        CoreCase("core:gdn", "fla", lambda B, T: (make_inputs(B, T), fla), fla_note, flops * H),
    ]
