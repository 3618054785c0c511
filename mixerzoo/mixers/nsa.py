"""Native Sparse Attention (Yuan et al. 2025, arXiv:2502.11089): compressed, selected and sliding-window attention
mixed by learned gates. Semantics, state and cost: docs/mixers.md#nsa; the op's specification:
``mixerzoo/kernels/nsa/reference.py``.

Positions and block boundaries count real tokens from the first real one of the row: block i holds the real
tokens at positions ``i*L .. i*L+L-1``, so a left-padded row computes exactly what the unpadded row computes.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..kernels.nsa.decode import nsa_decode, nsa_decode_ref, nsa_decode_supported, nsa_step_decode
from ..kernels.nsa.ops import nsa_attention
from ..kernels.nsa.reference import (
    compressed_visible,
    masked_attend,
    nsa_branches_ref,
    nsa_compress_ref,
    nsa_select_blocks,
    nsa_selected_mask,
    window_visible,
)
from ..kernels.nsa.step import nsa_step_supported
from ..kernels.nsa.triton_launch import MAX_BLOCK_COUNT, MAX_HEAD_DIM, SUPPORTED_L
from ..registry.core import register
from .attention_common import AttentionMixer, check_attention_heads
from .base import (
    MixerConfig,
    State,
    acc_dtype,
    check_capacity,
    check_row_open,
    leading_padding,
    new_state,
    positions_and_pad,
    state_dataclass,
    state_field,
    step_projections,
    whole_prompt,
)

__all__ = ["NSA", "NSABlockCompressor", "NSAConfig", "NSAState"]

_SCORE_BYTES = 1 << 28  # the dense scores of a cached chunk are computed in query slices of about this size

COMPRESSORS = ("mean", "mlp")


@dataclasses.dataclass(frozen=True)
class NSAConfig(MixerConfig):
    """Native sparse attention: compressed blocks, selected blocks and a sliding window, gated per head.

    num_kv_heads: key/value heads (GQA, any divisor of num_heads); 1 by default, as in the paper; None = num_heads.
    head_dim:     None = hidden_size // num_heads.
    block_size:   L, tokens per block, for the compression and the selection branch.
    block_count:  n, blocks each query attends to in the selection branch (>= 3; blocks of token 0, t, t - L always).
    window_size:  W, keys of the sliding-window branch (the query's own included).
    compressor:   "mean" (block mean) or "mlp" (block mean plus a learned MLP over the block; docs/mixers.md#nsa).
    rope_theta:   RoPE base.
    max_seqlen:   KV-cache capacity of init_state when it is not given there.
    gate_bias:    whether the linear map giving the three branch gates has a bias (the paper's models have none).
    """

    num_kv_heads: int | None = 1
    head_dim: int | None = None
    block_size: int = 64
    block_count: int = 16
    window_size: int = 512
    compressor: str = "mean"
    rope_theta: float = 10000.0
    max_seqlen: int = 4096
    gate_bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_attention_heads(self)
        self.check_int("block_size", minimum=1)
        self.check_int("block_count", minimum=3)
        self.check_int("window_size", minimum=1)
        self.check_choice("compressor", COMPRESSORS)
        self.check_int("max_seqlen", minimum=1)
        if not isinstance(self.gate_bias, bool):
            raise TypeError(f"nsa: gate_bias must be a bool, got {type(self.gate_bias).__name__} {self.gate_bias!r}")


@state_dataclass
class NSAState(State):
    """Decode state of nsa: a KV cache of capacity N = max_seqlen indexed by position (slot p holds the real token
    at position p; padding is never written), and the compressed keys / values of its complete blocks.

    k_cache, v_cache: [B, N, HKV, Dh] keys (RoPE applied) and values
    k_cmp, v_cmp:     [B, N // L, HKV, Dh] float32 (float64 for float64) compressed block i, once complete
    """

    k_cache: Tensor = state_field()
    v_cache: Tensor = state_field()
    k_cmp: Tensor = state_field()
    v_cmp: Tensor = state_field()


class NSABlockCompressor(nn.Module):
    """The "mlp" compressor of one of keys or values, shared by the KV heads:
    ``c = mean_j x_j + W2 silu(W1 flatten(x + P) + b1) + b2`` over the L tokens x_j of a block, with a learned
    intra-block position embedding P [L, Dh], W1 [Dh, L*Dh], W2 [Dh, Dh]."""

    def __init__(self, block_size: int, head_dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(block_size, head_dim) * 0.02)
        self.fc1 = nn.Linear(block_size * head_dim, head_dim)
        self.fc2 = nn.Linear(head_dim, head_dim)

    def forward(self, blocks: Tensor) -> Tensor:
        """blocks [..., L, Dh] -> [..., Dh] in float32 (float64 for float64 input)."""
        mean = blocks.to(acc_dtype(blocks.dtype)).mean(-2)
        h = self.fc2(F.silu(self.fc1((blocks + self.pos.to(blocks.dtype)).flatten(-2))))
        return mean + h.to(mean.dtype)


@register("nsa", config=NSAConfig, aliases=("native_sparse_attention",))
class NSA(AttentionMixer):
    """Native sparse attention with RoPE and GQA (any HQ / HKV): per query head,
    ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` with gates ``sigmoid(W_g x)`` (3 HQ outputs).

    Parallel form: the ``mixerzoo::nsa_attention`` op (Triton on CUDA, the reference on CPU) for the "mean"
    compressor; the plain-PyTorch branches of the reference for "mlp". Left padding is moved behind each row's
    real tokens first, so blocks count from the first real token. Decode: see NSAState; a one-token step writes
    its key and value, completes the compressed block that its token fills, then attends over the N / L
    compressed blocks, gathers its n selected blocks (n*L keys) and its W window keys from the cache:
    O(N/L + n*L + W) per step, not O(T).
    """

    config: NSAConfig
    state_class = NSAState
    state_growth = "linear"
    # block 16: the smallest the Triton kernels take; 80 tokens: five blocks, so that selection chooses
    conformance_kwargs = {"block_size": 16, "block_count": 4, "window_size": 8}
    conformance_seqlen = 80
    choice_free_kwargs = {"block_count": 8}  # every one of the 80 tokens' 5 blocks selected

    def __init__(self, config: NSAConfig):
        super().__init__(config)
        self.block_size = config.block_size
        self.block_count = config.block_count
        self.window_size = config.window_size
        self.gate_proj = nn.Linear(config.hidden_size, 3 * self.num_heads, bias=config.gate_bias)
        if config.compressor == "mlp":
            self.k_compressor = NSABlockCompressor(self.block_size, self.head_dim)
            self.v_compressor = NSABlockCompressor(self.block_size, self.head_dim)
        else:
            self.k_compressor = self.v_compressor = None

    # -- state -----------------------------------------------------------------------------------
    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seqlen: int | None = None,
    ) -> NSAState:
        """An empty cache for ``batch_size`` sequences of up to ``max_seqlen`` tokens (padding included);
        ``max_seqlen=None`` takes the config's."""
        N = self.config.max_seqlen if max_seqlen is None else max_seqlen
        device, dtype = self.state_device_dtype(device, dtype)
        B, H, D, NB = batch_size, self.num_kv_heads, self.head_dim, N // self.block_size
        acc = acc_dtype(dtype)
        return new_state(
            NSAState,
            B,
            device,
            k_cache=((N, H, D), dtype),
            v_cache=((N, H, D), dtype),
            k_cmp=((NB, H, D), acc),
            v_cmp=((NB, H, D), acc),
        )

    def _state_capacity(self, state: NSAState) -> int:
        return state.k_cache.shape[1]

    # -- pieces ----------------------------------------------------------------------------------
    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> (g_cmp, g_slc, g_win), each [B, T, HQ] in (0, 1)."""
        g = rearrange(torch.sigmoid(self.gate_proj(x)), "b t (g h) -> g b t h", g=3)
        return g[0], g[1], g[2]

    def compress(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [B, S, HKV, Dh] -> the compressed complete blocks k_cmp, v_cmp [B, S // L, HKV, Dh], float32
        (float64 for float64 input)."""
        if self.k_compressor is None:
            return nsa_compress_ref(k, v, self.block_size)
        B, S, H, D = k.shape
        L = self.block_size
        nb = S // L

        def blocks(x: Tensor) -> Tensor:  # [B, S, HKV, Dh] -> [B, NB, HKV, L, Dh]
            return x[:, : nb * L].reshape(B, nb, L, H, D).transpose(2, 3)

        return self.k_compressor(blocks(k)), self.v_compressor(blocks(v))

    def _mixed(self, o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, g: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Branch outputs [B, T, HQ, Dh] (compute dtype) and gates [B, T, HQ] -> o [B, T, HQ, Dh]."""
        cd = o_cmp.dtype
        return g[0].to(cd)[..., None] * o_cmp + g[1].to(cd)[..., None] * o_slc + g[2].to(cd)[..., None] * o_win

    # -- forward ---------------------------------------------------------------------------------
    def mix(self, x: Tensor, state: NSAState | None, attention_mask: Tensor | None) -> tuple[Tensor, NSAState | None]:
        T = x.shape[1]
        if state is None:
            return self.out(self._parallel(x, attention_mask)), None
        self._check_capacity(state, T)
        if self._prefill_whole(x, state, attention_mask):
            positions_and_pad(x, state, attention_mask, self.name)  # the row's leading padding into state.pad
            o = self._parallel(x, attention_mask, fill=state)
            state.seen.add_(T)
            return self.out(o.to(x.dtype)), state
        if attention_mask is None and T == 1 and self._fused(x, state):
            check_row_open(self.name, state)  # positions_and_pad's one check for a mask-less step
            o = self._step_fused(x, state)
            state.seen.add_(1)
            return self.out(o), state
        _, pos, valid = positions_and_pad(x, state, attention_mask, self.name)
        q, k, v = self.qkv(x, pos, state.k_cache.dtype)
        g = self.gates(x)
        qpos = pos.masked_fill(~valid, -1)  # [B, T]; a padding query sees nothing
        if T == 1 and not (torch.is_grad_enabled() and q.requires_grad):
            o = self._step(q, k, v, g, qpos, state)
        else:
            o = self._chunk(q, k, v, g, pos, qpos, valid, state)
        state.seen.add_(T)
        return self.out(o.to(x.dtype)), state

    def _prefill_whole(self, x: Tensor, state: NSAState, attention_mask: Tensor | None) -> bool:
        """Whether a prompt runs as the parallel form (the Triton op) and then fills the cache: eager CUDA, the
        mean compressor, a state that has seen nothing yet, no padding after a row's last real token
        (base.whole_prompt). Elsewhere ``_chunk`` runs, which attends densely over the whole cache."""
        return x.is_cuda and self.k_compressor is None and whole_prompt(x, state, attention_mask)

    def _parallel(self, x: Tensor, attention_mask: Tensor | None, fill: NSAState | None = None) -> Tensor:
        """x [B, T, D] (padding zeroed) -> o [B, T, HQ, Dh]. With ``fill`` (a state that has seen nothing), the
        keys and values also go into its cache and the blocks they complete into its compressed cache, as
        ``_chunk`` leaves them."""
        B, T, _ = x.shape
        t = torch.arange(T, device=x.device)
        lead = None
        if attention_mask is not None:
            # Move each row's leading padding behind its tokens, so that positions and block boundaries count
            # from the first real token; trailing padding follows every real token, which causality hides.
            lead = leading_padding(attention_mask)[:, None]  # [B, 1]
            x = x.gather(1, ((t + lead) % T)[..., None].expand_as(x))
        q, k, v = self.qkv(x, t)
        g = self.gates(x)
        if self.k_compressor is None:
            if x.is_cuda:
                self.check_kernel_shapes()
            o = nsa_attention(
                q,
                k,
                v,
                *g,
                block_size=self.block_size,
                block_count=self.block_count,
                window_size=self.window_size,
                scale=self.scale,
            )
        else:
            k_cmp, v_cmp = self.compress(k, v)
            branches = nsa_branches_ref(
                q,
                k,
                v,
                k_cmp,
                v_cmp,
                block_size=self.block_size,
                block_count=self.block_count,
                window_size=self.window_size,
                scale=self.scale,
            )
            o = self._mixed(*branches, g).to(q.dtype)
        if fill is not None:
            # rows rotated: the real tokens first, at their positions; the padding after them is not written
            pos = t[None, :].expand(B, T)
            real = pos < (T if lead is None else T - lead)
            self._write(k, v, pos, real, fill)
            with torch.no_grad():
                dt = k.dtype
                # the prompt's T slots only (positions 0..T-1): the blocks past them are not complete
                k_cmp, v_cmp = self.compress(fill.k_cache[:, :T].to(dt), fill.v_cache[:, :T].to(dt))
                self._store_compressed(fill, k_cmp, v_cmp, real.sum(1, keepdim=True) - 1)
        if lead is not None:
            o = o.gather(1, ((t - lead) % T)[..., None, None].expand_as(o))
        return o

    def check_kernel_shapes(self) -> None:
        """Refuse, naming this layer's fields, a config whose prompts the Triton kernels cannot run (on CUDA the
        parallel form and a whole prompt run them; the decode step and the CPU take any head dim and block
        size)."""
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(
                f"{self.name}: head_dim={self.head_dim}: on CUDA the prompt's Triton kernels take head_dim 1 to "
                f"{MAX_HEAD_DIM} (the CPU reference takes any)"
            )
        if self.block_size not in SUPPORTED_L:
            raise ValueError(
                f"{self.name}: block_size={self.block_size}: on CUDA the prompt's Triton kernels take block_size in "
                f"{SUPPORTED_L}; choose one of those (the CPU reference takes any)"
            )
        if self.block_count > MAX_BLOCK_COUNT:
            raise ValueError(
                f"{self.name}: block_count={self.block_count}: on CUDA the prompt's Triton kernels take "
                f"block_count <= {MAX_BLOCK_COUNT} (the CPU reference takes any)"
            )

    @torch.no_grad()
    def _store_compressed(self, state: NSAState, k_cmp: Tensor, v_cmp: Tensor, last: Tensor) -> None:
        """Keep the compressed blocks k_cmp, v_cmp [B, nb, HKV, Dh] (the first nb of the state's) that are complete
        by position ``last`` ([B, 1]; -1: none) in the state; the others keep what they held."""
        nb = k_cmp.shape[1]
        done = compressed_visible(last, nb, self.block_size)[:, 0, :, None, None]  # [B, nb, 1, 1]
        for cmp, new in ((state.k_cmp[:, :nb], k_cmp), (state.v_cmp[:, :nb], v_cmp)):
            cmp.copy_(torch.where(done, new.detach(), cmp))

    def _write(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor, state: NSAState) -> Tensor:
        """Write the real tokens of a chunk (k, v [B, T, HKV, Dh], pos/valid [B, T]) into the cache at their
        positions (in place, detached); returns the index [B, T, HKV, Dh] they were written at."""
        N = state.k_cache.shape[1]
        # T <= N consecutive positions: distinct slots mod N. Padding writes back what its slot holds.
        idx = pos.remainder(N)[..., None, None].expand_as(k)
        keep = valid[..., None, None]
        for cache, new in ((state.k_cache, k), (state.v_cache, v)):
            cache.scatter_(1, idx, torch.where(keep, new.detach().to(cache.dtype), cache.gather(1, idx)))
        return idx

    def _chunk(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g: tuple[Tensor, Tensor, Tensor],
        pos: Tensor,
        qpos: Tensor,
        valid: Tensor,
        state: NSAState,
    ) -> Tensor:
        """A chunk of any length, or a step that needs gradients: write it, recompute the compressed blocks from
        the cache (differentiable in this chunk's keys and values), then attend densely over the cached
        positions: eagerly, a chunk of several tokens attends only over the ``seen + T`` slots filled so far (one
        host read; the rest are empty and invisible), a step or a compiled chunk over all N. O(T * N) at most."""
        B, T, HQ, D = q.shape
        N, L, HKV = state.k_cache.shape[1], self.block_size, self.num_kv_heads
        G = HQ // HKV
        idx = self._write(k, v, pos, valid, state)
        if T > 1 and not torch.compiler.is_compiling():  # a prompt chunk (a grad-mode step keeps one shape)
            N = min(N, int(state.seen) + T)  # the slots written so far (positions never exceed slots)
        nb = N // L
        keys, values = state.k_cache, state.v_cache
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # out-of-place copies carry this chunk's gradient; autograd never saves the cache itself (the whole
            # cache: a padding token's index, its negative position mod the capacity, may lie past the N used)
            keep = valid[..., None, None]
            keys, values = keys.to(q.dtype), values.to(q.dtype)
            keys = keys.scatter(1, idx, torch.where(keep, k, keys.gather(1, idx)))
            values = values.scatter(1, idx, torch.where(keep, v, values.gather(1, idx)))
        keys, values = keys[:, :N].to(q.dtype), values[:, :N].to(q.dtype)
        k_cmp, v_cmp = self.compress(keys, values)  # [B, nb, HKV, Dh]
        self._store_compressed(state, k_cmp, v_cmp, qpos.amax(1)[:, None])  # the row's last real position (-1: none)

        cd = k_cmp.dtype
        qf = q.to(cd).transpose(1, 2)  # [B, HQ, T, Dh]

        def heads(x: Tensor) -> Tensor:  # [B, S, HKV, Dh] -> [B, HQ, S, Dh]
            return x.to(cd).transpose(1, 2).repeat_interleave(G, dim=1)

        s_cmp = (qf @ heads(k_cmp).transpose(-1, -2)) * self.scale  # [B, HQ, T, NB]
        o_cmp, p_cmp = masked_attend(s_cmp, compressed_visible(qpos, nb, L)[:, None], heads(v_cmp))
        with torch.no_grad():
            sel = nsa_select_blocks(
                p_cmp.detach().transpose(1, 2),
                qpos,
                num_kv_heads=HKV,
                block_size=L,
                block_count=self.block_count,
                num_blocks=-(-N // L),
            )  # [B, T, HKV, n]

        def vis_slc(a: int, b: int) -> Tensor:  # the selected tokens of queries a..b-1: [B, HQ, b - a, N]
            return nsa_selected_mask(sel[:, a:b], qpos[:, a:b], N, L).repeat_interleave(G, dim=1)

        kf, vf = heads(keys), heads(values)  # [B, HQ, N, Dh]
        # The dense scores take B * HQ * rows * N floats: the chunk's queries go in slices that keep them near
        # _SCORE_BYTES (a 4K-token chunk over a 128K cache would otherwise need tens of GB).
        rows = max(1, _SCORE_BYTES // (B * HQ * N * 4))
        o_slc, o_win = [], []
        for a in range(0, T, rows):
            b = min(T, a + rows)
            s = (qf[:, :, a:b] @ kf.transpose(-1, -2)) * self.scale  # [B, HQ, rows, N]
            o_slc.append(masked_attend(s, vis_slc(a, b), vf)[0])
            o_win.append(masked_attend(s, window_visible(qpos[:, a:b], N, self.window_size)[:, None], vf)[0])
        o_slc, o_win = torch.cat(o_slc, 2), torch.cat(o_win, 2)
        return self._mixed(*(o.transpose(1, 2) for o in (o_cmp, o_slc, o_win)), g)

    @torch.no_grad()
    def _step(
        self, q: Tensor, k: Tensor, v: Tensor, g: tuple[Tensor, Tensor, Tensor], qpos: Tensor, state: NSAState
    ) -> Tensor:
        """One token without autograd, fixed shapes: write it; if it completes block i, compress block i into
        the state; then the ``nsa_decode`` op over the state (docs/kernels.md#nsa_decode): attend over the
        compressed blocks, select n blocks, attend over their tokens and the window. On CUDA (shapes that
        ``nsa_decode_supported`` accepts) that is one Triton kernel, elsewhere ``nsa_decode_ref``."""
        B, _, _, D = q.shape
        N, L, HKV, n = state.k_cache.shape[1], self.block_size, self.num_kv_heads, self.block_count
        nb = N // L
        self._write(k, v, qpos, qpos >= 0, state)
        p = qpos[:, 0]  # [B] position of the token (-1: padding)
        if nb > 0:
            tok = ((p - L + 1)[:, None] + torch.arange(L, device=q.device)).clamp(0, N - 1)  # [B, L]
            at = tok[..., None, None].expand(B, L, HKV, D)
            c_k, c_v = self.compress(state.k_cache.gather(1, at), state.v_cache.gather(1, at))  # [B, 1, HKV, Dh]
            fills = ((p >= 0) & (p % L == L - 1))[:, None, None, None]
            blk = torch.div(p, L, rounding_mode="floor").clamp(0, nb - 1)[:, None, None, None].expand(B, 1, HKV, D)
            for cmp, new in ((state.k_cmp, c_k), (state.v_cmp, c_v)):
                cmp.scatter_(1, blk, torch.where(fills, new, cmp.gather(1, blk)))

        args = (q[:, 0], state.k_cache, state.v_cache, state.k_cmp, state.v_cmp, p, g[0][:, 0], g[1][:, 0], g[2][:, 0])
        if nsa_decode_supported(q, L, n):  # CUDA: one Triton program per (row, KV head)
            o, _ = nsa_decode(*args, block_size=L, block_count=n, window_size=self.window_size, scale=self.scale)
        else:  # the same gathers in PyTorch
            o, _ = nsa_decode_ref(*args, L, n, self.window_size, self.scale)
        return o[:, None]  # [B, 1, HQ, Dh]

    def _fused(self, x: Tensor, state: NSAState) -> bool:
        """Whether a one-token step of x takes ``_step_fused``: eager CUDA without autograd, the mean compressor,
        shapes and dtypes that the step and decode kernels take. Metadata only."""
        return (
            x.is_cuda
            and self.k_compressor is None
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and nsa_decode_supported(x, self.block_size, self.block_count, head_dim=self.head_dim)
            and nsa_step_supported(x, state.k_cache, state.v_cache, state.k_cmp, state.v_cmp)
        )

    @torch.no_grad()
    def _step_fused(self, x: Tensor, state: NSAState) -> Tensor:
        """``_step`` in one launch after the projections (the eager CUDA path; Triton's interpreter runs it on the
        CPU): ``nsa_step_decode`` does RoPE, the cache write and the completed block's compression, then the
        decode with the gates' sigmoid. Nothing read on the host, so it can be captured.
        x [B, 1, D] -> o [B, 1, HQ, Dh]."""
        # q, k, v and the gate logits [B, 3 * HQ] ("(g h)"; the kernel takes their sigmoid) from one matmul
        # (step_projections), in the cache's dtype (under autocast the projections are bfloat16)
        projs = (self.q_proj, self.k_proj, self.v_proj, self.gate_proj)
        o = nsa_step_decode(
            step_projections(self, "step", projs, x.select(1, 0), state.k_cache.dtype),
            state.seen,
            state.pad,
            state.k_cache,
            state.v_cache,
            state.k_cmp,
            state.v_cmp,
            theta=self.rope_theta,
            block_size=self.block_size,
            block_count=self.block_count,
            window_size=self.window_size,
            scale=self.scale,
        )
        return o.unsqueeze(1)

    def _check_capacity(self, state: NSAState, T: int) -> None:
        check_capacity(self.name, state, T, state.k_cache.shape[1])
