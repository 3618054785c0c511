"""Causal attention backends of full_attention: torch SDPA, flash-attn, xformers, FlexAttention.

Each backend is a function ``attend(q, k, v, valid, scale) -> o`` with
  q: [B, T, HQ, Dh], k and v: [B, T, HKV, Dh] (HQ % HKV == 0, query head h reads key/value head
  h // (HQ / HKV)), valid: [B, T] bool (False = left padding) or None, o: [B, T, HQ, Dh].
Real tokens see the real tokens at or before them; padding queries get finite outputs (unspecified).

``load_backend(name)`` imports what the backend needs and raises ImportError with the install hint when
the package is missing, or RuntimeError when it cannot run on this machine: there is no fallback.
A backend that cannot run on the device or dtype of its inputs raises at the first forward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BACKENDS", "load_backend"]

BACKENDS = ("sdpa", "flash_attn", "xformers", "flex")

AttendFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]

_INSTALL = {
    "flash_attn": "pip install flash-attn --no-build-isolation (or pip install 'mixerzoo[flash-attn]')",
    "xformers": "pip install xformers (or pip install 'mixerzoo[xformers]')",
    "flex": "upgrade torch to >= 2.5 (torch.nn.attention.flex_attention)",
}


def _import(backend: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"full_attention: backend {backend!r} needs the module {module!r}, which is not importable "
            f"({e}); install it with: {_INSTALL[backend]}; or use backend='sdpa'"
        ) from e


def _need_cuda(backend: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"full_attention: backend {backend!r} runs on NVIDIA GPUs only and no CUDA device is available; "
            f"use backend='sdpa' (or 'flex') on this machine"
        )


def _check_input(backend: str, q: Tensor, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if torch.compiler.is_compiling():
        return
    if q.device.type != "cuda":
        raise RuntimeError(
            f"full_attention: backend {backend!r} runs on CUDA tensors only, got a tensor on {q.device}; "
            f"use backend='sdpa' for {q.device.type}"
        )
    if dtypes is not None and q.dtype not in dtypes:
        raise RuntimeError(
            f"full_attention: backend {backend!r} takes {', '.join(str(d) for d in dtypes)}, got {q.dtype}; "
            f"cast the model (e.g. mixer.to(torch.bfloat16)) or use backend='sdpa'"
        )


def _padding_mask(valid: Tensor) -> Tensor:
    """valid: [B, T] -> [B, T, T] bool: causal, padding keys hidden, every query sees itself."""
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    return (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, T, HKV, Dh] -> [B, T, HKV * groups, Dh], head h reading kv head h // groups."""
    if groups == 1:
        return x
    B, T, H, D = x.shape
    return x[:, :, :, None, :].expand(B, T, H, groups, D).reshape(B, T, H * groups, D)


# -- sdpa ----------------------------------------------------------------------------------------


def _sdpa(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float) -> Tensor:
    # Without padding, is_causal lets torch pick its fastest kernel (cuDNN or flash on NVIDIA GPUs).
    mask = None if valid is None else _padding_mask(valid)[:, None]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=valid is None,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)


# -- flex ----------------------------------------------------------------------------------------


def _load_flex() -> AttendFn:
    fa = _import("flex", "torch.nn.attention.flex_attention")

    def attend(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float) -> Tensor:
        B, T = q.shape[:2]
        if q.device.type == "cpu" and q.requires_grad and not torch.compiler.is_compiling():
            raise RuntimeError(
                "full_attention: backend 'flex' has no backward on the CPU (torch FlexAttention); run it "
                "under torch.no_grad() / torch.inference_mode() there, or use backend='sdpa'"
            )
        if valid is None:

            def mask_mod(b, h, qi, ki):
                return qi >= ki

            block_mask = fa.create_block_mask(mask_mod, None, None, T, T, device=q.device)
        else:

            def mask_mod(b, h, qi, ki):
                return ((qi >= ki) & valid[b, ki]) | (qi == ki)

            block_mask = fa.create_block_mask(mask_mod, B, None, T, T, device=q.device)
        o = fa.flex_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=block_mask,
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return o.transpose(1, 2)

    return attend


# -- flash_attn ----------------------------------------------------------------------------------


def _load_flash_attn() -> AttendFn:
    fa = _import("flash_attn", "flash_attn")
    _need_cuda("flash_attn")

    def attend(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float) -> Tensor:
        _check_input("flash_attn", q, (torch.float16, torch.bfloat16))
        if valid is None:
            # flash-attn takes GQA natively (HQ % HKV == 0, same grouping as ours).
            return fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
        # Left padding: drop the padding tokens and run the variable-length kernel. With equal query and
        # key lengths per sequence its causal mask is the ordinary one. Data-dependent shapes: eager only.
        B, T, HQ, D = q.shape
        flat = valid.reshape(-1)
        idx = flat.nonzero().squeeze(1)  # [N]
        lengths = valid.sum(1, dtype=torch.int32)  # [B]
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # [B + 1]
        max_len = int(lengths.max())
        o_real = fa.flash_attn_varlen_func(
            q.reshape(B * T, HQ, D)[idx],
            k.reshape(B * T, *k.shape[2:])[idx],
            v.reshape(B * T, *v.shape[2:])[idx],
            cu,
            cu,
            max_len,
            max_len,
            softmax_scale=scale,
            causal=True,
        )  # [N, HQ, D]
        o = q.new_zeros(B * T, HQ, D).index_copy(0, idx, o_real)  # padding queries: 0
        return o.reshape(B, T, HQ, D)

    return attend


# -- xformers ------------------------------------------------------------------------------------


def _load_xformers() -> AttendFn:
    xops = _import("xformers", "xformers.ops")
    _need_cuda("xformers")
    xformers = importlib.import_module("xformers")
    if not getattr(xformers, "_has_cpp_library", True):
        # xformers imports without its compiled ops (built for another torch / CUDA runtime) and then
        # dispatches to whatever is left; fail here rather than run something else.
        error = getattr(importlib.import_module("xformers._cpp_lib"), "_cpp_library_load_exception", None)
        raise ImportError(
            f"full_attention: backend 'xformers' is installed but its CUDA ops did not load ({error}); "
            f"install an xformers build for torch {torch.__version__}: {_INSTALL['xformers']} "
            f"(a wheel built for CUDA 12 also needs the CUDA 12 runtime: pip install nvidia-cuda-runtime-cu12, "
            f"its lib folder on LD_LIBRARY_PATH); or use backend='sdpa'"
        )

    def attend(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float) -> Tensor:
        _check_input("xformers", q)
        B, T, HQ, _ = q.shape
        groups = HQ // k.shape[2]
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        if valid is None:
            bias = xops.LowerTriangularMask()
        else:
            # An additive bias; xformers wants its rows 16-byte aligned, so pad the last dim to 8.
            Tp = -(-T // 8) * 8
            bias = q.new_zeros(B, HQ, T, Tp)[..., :T]
            bias.masked_fill_(~_padding_mask(valid)[:, None], float("-inf"))
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)

    return attend


def load_backend(name: str) -> AttendFn:
    """The attention function of backend ``name`` (one of BACKENDS); fails now if it cannot run here."""
    if name == "sdpa":
        return _sdpa
    if name == "flex":
        return _load_flex()
    if name == "flash_attn":
        return _load_flash_attn()
    if name == "xformers":
        return _load_xformers()
    raise ValueError(f"full_attention: backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {name!r}")
