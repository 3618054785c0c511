"""Useful FLOPs of one mixer layer call: the one place that defines them for ``python -m mixerzoo bench``.

A layer's useful FLOPs are those of its projections plus those of its token-mixing core, counted on what the
mask actually lets through (never on the padded tiles a kernel happens to compute):

- projections: 2 FLOPs per weight of every ``nn.Linear`` of the module, per token (bias, norms,
  short convolutions, RoPE and gates are left out: they are a few percent at most);
- softmax attention, per batch row and query head, 4 * Dh FLOPs per visible (query, key) pair (QK^T and PV):
    full_attention: causal, sum_t (t + 1) = T (T + 1) / 2 pairs;
    swa:            sum_t min(t + 1, W);
    swa_sink:       sum_t min(t + 1, W) + min(S, max(0, t - W + 1)) (the sinks outside the window);
    eviction_swa:   in training mode (the mode the bench times), the window plus every retained earlier
                    token, counted from the layer's ``router_retained`` after the timed forward (so the count
                    follows the router); no count in eval mode;
- gdn (chunked form, chunk C = 64, per head with key dim K and value dim V, per chunk): the chunk's
  K K^T, its triangular solve (2 C^3 / 3), W = T K, U = T V, V' = U - W S, Q S, Q K^T, (Q K^T) V' and the
  state update K^T V': 6 C^2 K + 4 C^2 V + 6 C K V + 2 C^3 / 3 FLOPs, that is per token
  6 C K + 4 C V + 6 K V + 2 C^2 / 3;
- a mixer not listed here has no FLOP count (its rows carry no TFLOP/s).

Backward: 2x the forward for projections and the gated delta rule (two matmuls per forward matmul), 2.5x for
softmax attention (the recomputed scores and the five backward matmuls, as FlashAttention counts it); so
forward+backward is 3x or 3.5x the forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["GDN_CHUNK", "attention_pairs", "layer_flops"]

GDN_CHUNK = 64  # the chunk length of the chunked gated delta rule (the Triton kernels' and the reference's)
ATTN_BWD = 2.5
MATMUL_BWD = 2.0


def attention_pairs(T: int, window: int | None = None, sinks: int = 0) -> int:
    """Visible (query, key) pairs of one sequence of T tokens and one head: causal, limited to a window of
    ``window`` keys (None: unbounded), plus the ``sinks`` first tokens."""
    t = torch.arange(T, dtype=torch.float64)
    if window is None:
        return int((t + 1).sum())
    n = torch.minimum(t + 1, torch.tensor(float(window)))
    n = n + (t - window + 1).clamp(min=0, max=sinks)
    return int(n.sum())


def _heads(mixer: nn.Module) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of an attention mixer's config."""
    c = mixer.config
    hq = c.num_heads
    hkv = getattr(c, "num_kv_heads", None) or hq
    dh = getattr(c, "head_dim", None) or c.hidden_size // hq
    return hq, hkv, dh


def _full(mixer: nn.Module, B: int, T: int) -> tuple[float, float]:
    hq, _, dh = _heads(mixer)
    return 4.0 * dh * hq * B * attention_pairs(T), ATTN_BWD


def _swa(mixer: nn.Module, B: int, T: int) -> tuple[float, float]:
    hq, _, dh = _heads(mixer)
    pairs = attention_pairs(T, mixer.config.window_size, getattr(mixer.config, "num_sinks", 0))
    return 4.0 * dh * hq * B * pairs, ATTN_BWD


def _eviction(mixer: nn.Module, B: int, T: int) -> tuple[float, float] | None:
    c = mixer.config
    hq, hkv, dh = _heads(mixer)
    W = c.window_size
    retained = getattr(mixer, "router_retained", None)  # [B, T, HKV] bool, set by a training forward
    if not mixer.training or retained is None or retained.shape[:2] != (B, T):
        return None
    window = attention_pairs(T, W)  # per (row, kv head)
    # keys retained and already out of the window of query t: retained j <= t - W
    counts = retained.to(torch.float64).cumsum(1)  # [B, T, HKV]: retained j <= t
    out_of_window = counts[:, : max(T - W, 0)].sum().item()  # query t = j + W .. reads counts[t - W]
    pairs = window * B * hkv + out_of_window
    return 4.0 * dh * (hq // hkv) * pairs, ATTN_BWD


def _gdn(mixer: nn.Module, B: int, T: int) -> tuple[float, float]:
    C = GDN_CHUNK
    H, K, V = mixer.num_heads, mixer.key_dim, mixer.value_dim
    per_token = 6 * C * K + 4 * C * V + 6 * K * V + 2 * C * C / 3
    return per_token * B * T * H, MATMUL_BWD


CORES: dict[str, Callable[[nn.Module, int, int], tuple[float, float] | None]] = {
    "eviction_swa": _eviction,
    "full_attention": _full,
    "gdn": _gdn,
    "swa": _swa,
    "swa_sink": _swa,
}


def layer_flops(name: str, mixer: nn.Module, B: int, T: int) -> tuple[float, float] | None:
    """(forward FLOPs, forward+backward FLOPs) of one call of ``mixer`` (registered as ``name``) on [B, T]
    tokens, or None where the mixer's core has no FLOP count (see the module docstring)."""
    core = CORES.get(name)
    if core is None:
        return None
    got = core(mixer, B, T)
    if got is None:
        return None
    core_fwd, core_bwd = got
    proj = 2.0 * B * T * sum(m.weight.numel() for m in mixer.modules() if isinstance(m, nn.Linear))
    return proj + core_fwd, proj * (1 + MATMUL_BWD) + core_fwd * (1 + core_bwd)
