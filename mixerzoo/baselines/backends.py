"""Causal attention backends of full_attention: torch SDPA, flash-attn (4 or 2), xformers, FlexAttention.

Each backend is a function ``attend(q, k, v, valid, scale) -> o`` with
  q: [B, T, HQ, Dh], k and v: [B, T, HKV, Dh] (HQ % HKV == 0, query head h reads key/value head
  h // (HQ / HKV)), valid: [B, T] bool (False = left padding) or None, o: [B, T, HQ, Dh].
Real tokens see the real tokens at or before them; padding queries get finite outputs (unspecified).

``load_backend(name)`` imports what the backend needs and raises ImportError with the install hint when
the package is missing, or RuntimeError when it cannot run on this machine: there is no fallback.
A backend that cannot run on the device or dtype of its inputs raises at the first forward.
``load_flash_attn`` (flash-attn 4, else 2; windows and a differentiable log-sum-exp) also serves swa and swa_sink.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BACKENDS", "FlashAttn", "load_backend", "load_flash_attn"]

BACKENDS = ("sdpa", "flash_attn", "xformers", "flex")

AttendFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]

_INSTALL = {
    "flash_attn_4": "pip install flash-attn-4 (with a CUDA 13 build of torch: pip install 'flash-attn-4[cu13]')",
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


def _instead(mixer: str) -> str:
    """The backend to suggest instead: full_attention's portable ones, or the Triton op of swa / swa_sink."""
    return "backend='sdpa' (or 'flex')" if mixer == "full_attention" else "backend='triton'"


def _need_cuda(backend: str, mixer: str = "full_attention") -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{mixer}: backend {backend!r} runs on NVIDIA GPUs only and no CUDA device is available; "
            f"use {_instead(mixer)} on this machine"
        )


def _check_input(
    backend: str, q: Tensor, dtypes: tuple[torch.dtype, ...] | None = None, mixer: str = "full_attention"
) -> None:
    if torch.compiler.is_compiling():
        return
    if q.device.type != "cuda":
        raise RuntimeError(
            f"{mixer}: backend {backend!r} runs on CUDA tensors only, got a tensor on {q.device}; "
            f"use {_instead(mixer)} for {q.device.type}"
        )
    if dtypes is not None and q.dtype not in dtypes:
        raise RuntimeError(
            f"{mixer}: backend {backend!r} takes {', '.join(str(d) for d in dtypes)}, got {q.dtype}; "
            f"cast the model (e.g. mixer.to(torch.bfloat16)) or use {_instead(mixer)}"
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
#
# flash-attn 4 (``flash_attn.cute``, PyPI ``flash-attn-4``; CuTe DSL kernels for sm80 and later, backward on sm90
# and later) and flash-attn 2 (``flash_attn``, PyPI ``flash-attn``) take the same layout as ours: q [B, T, HQ, Dh],
# k and v [B, T, HKV, Dh], query head h reading kv head h // (HQ / HKV), so GQA needs no copy. Their
# ``window_size=(left, right)`` lets query i see keys i - left <= j <= i + right (both bounds inclusive, lower-right
# aligned, which is the ordinary alignment when query and key lengths match); our window W (keys t - W < j <= t) is
# ``(W - 1, 0)``. Padding runs the variable-length kernel over the real tokens only (``cu_seqlens``), so positions
# restart at each row's first real token, as ours do.


class FlashAttn:
    """Causal (sliding-window) attention through flash-attn 4, or flash-attn 2 where 4 is not installed.

    Built by ``load_flash_attn``; ``version`` is 4 or 2, ``name`` names the package and its version.
    """

    def __init__(self, mixer: str, version: int, module) -> None:
        self.mixer = mixer
        self.version = version
        self._fa = module
        package = "flash-attn-4" if version == 4 else "flash-attn"
        try:
            release = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            release = getattr(module, "__version__", "unknown version")
        self.name = f"flash-attn {version} ({module.__name__} {release})"

    def __repr__(self) -> str:
        return f"FlashAttn({self.name})"

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        valid: Tensor | None,
        scale: float,
        *,
        window: int | None = None,
        return_lse: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Causal attention, optionally windowed; real tokens only see real tokens.

        q: [B, T, HQ, Dh], k and v: [B, T, HKV, Dh] (float16 / bfloat16 on CUDA), valid: [B, T] bool (False =
        padding; the real tokens of a row are contiguous) or None, window: W (query t sees keys t - W < j <= t)
        or None (every key j <= t). Returns o [B, T, HQ, Dh] (padding queries: 0) and, with ``return_lse``
        (flash-attn 4 only), the natural-log log-sum-exp of each query's scaled scores, lse [B, T, HQ] float32
        (padding queries: -inf), differentiable.
        """
        backend = f"{self.mixer}: backend 'flash_attn'"
        _check_input("flash_attn", q, (torch.float16, torch.bfloat16), mixer=self.mixer)
        if return_lse and self.version != 4:
            raise RuntimeError(f"{backend}: the log-sum-exp with a gradient needs flash-attn 4, this is {self.name}")
        if self.version == 4 and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            major = torch.cuda.get_device_capability(q.device)[0]
            if major < 9:
                raise RuntimeError(
                    f"{backend}: {self.name} has no backward on compute capability {major}.x (it needs 9.0 or "
                    f"later); run it under torch.no_grad(), install flash-attn 2 alone, or use {_instead(self.mixer)}"
                )
        B, T, HQ, D = q.shape
        left = None if window is None or window >= T else window - 1
        if valid is None:
            o, lse = self._call(q, k, v, scale, left, return_lse)
            return o, lse.transpose(1, 2) if return_lse else None  # [B, HQ, T] -> [B, T, HQ]
        # Padding: drop the padding tokens and run the variable-length kernel; with equal query and key lengths
        # per row its causal mask (and window) is the ordinary one. Data-dependent shapes: eager only.
        idx = valid.reshape(-1).nonzero().squeeze(1)  # [N] flat slots of the real tokens
        cu = F.pad(valid.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))  # [B + 1]
        flat = (x.reshape(B * T, *x.shape[2:])[idx] for x in (q, k, v))  # [N, H, Dh]
        o_real, lse_real = self._call(*flat, scale, left, return_lse, cu=cu, max_len=T)
        o = q.new_zeros(B * T, HQ, D).index_copy(0, idx, o_real).reshape(B, T, HQ, D)
        if not return_lse:  # flash-attn 4 also returns it when inputs require grad: not ours to keep
            return o, None
        lse = lse_real.new_full((B * T, HQ), float("-inf")).index_copy(0, idx, lse_real.t())  # [HQ, N] -> [N, HQ]
        return o, lse.reshape(B, T, HQ)

    def _call(self, q, k, v, scale, left, return_lse, *, cu=None, max_len=None):
        """One flash-attn call (batched, or variable-length with ``cu``): (o, lse in flash-attn's layout or None)."""
        fa = self._fa
        if self.version == 4:
            window = (left, 0)  # (None, 0): causal
            if cu is None:
                return fa.flash_attn_func(
                    q, k, v, softmax_scale=scale, causal=True, window_size=window, return_lse=return_lse
                )
            return fa.flash_attn_varlen_func(
                q,
                k,
                v,
                cu_seqlens_q=cu,
                cu_seqlens_k=cu,
                max_seqlen_q=max_len,
                max_seqlen_k=max_len,
                softmax_scale=scale,
                causal=True,
                window_size=window,
                return_lse=return_lse,
            )
        window = (-1, -1) if left is None else (left, 0)  # flash-attn 2: -1 = unbounded
        if cu is None:
            return fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window), None
        o = fa.flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True, window_size=window
        )
        return o, None


# Head dims both versions take in float16 / bfloat16 (flash-attn 4 on sm90: 8 <= Dh <= 256, Dh % 8 == 0).
FLASH_ATTN_HEAD_DIMS = "a multiple of 8 in [8, 256]"


def _missing(e: ImportError, module: str) -> bool:
    """True when ``e`` says ``module`` (or a parent package of it) is not installed, not that it failed to load."""
    name = getattr(e, "name", None)
    return isinstance(e, ModuleNotFoundError) and (name is None or module == name or module.startswith(name + "."))


def load_flash_attn(mixer: str, *, head_dim: int, need_lse: bool = False) -> FlashAttn:
    """flash-attn 4 (``flash_attn.cute``) when it is installed, else flash-attn 2 (``flash_attn``).

    Raises ImportError naming both packages and their install commands when neither is installed (or flash-attn
    2 only when ``need_lse``: the sinks of swa_sink merge through flash-attn 4's differentiable log-sum-exp), or
    when an installed one does not import; RuntimeError without a CUDA device of compute capability 8.0 or later;
    ValueError for a head dim flash-attn does not take.
    """
    hint = f"install flash-attn 4: {_INSTALL['flash_attn_4']}; or flash-attn 2: {_INSTALL['flash_attn']}"
    if need_lse:
        hint += " (not enough for attention sinks, which need flash-attn 4)"
    try:
        fa, version = importlib.import_module("flash_attn.cute"), 4
    except ImportError as e:
        if not _missing(e, "flash_attn.cute"):
            raise ImportError(
                f"{mixer}: backend 'flash_attn': flash-attn 4 (flash_attn.cute) is installed but does not import "
                f"({type(e).__name__}: {e}); reinstall it with its dependencies: {_INSTALL['flash_attn_4']}"
            ) from e
        fa, version = None, 2
    if fa is None:
        try:
            fa = importlib.import_module("flash_attn")
        except ImportError as e:
            if not _missing(e, "flash_attn"):
                raise ImportError(
                    f"{mixer}: backend 'flash_attn': flash-attn 2 (flash_attn) is installed but does not import "
                    f"({type(e).__name__}: {e}); reinstall it for torch {torch.__version__}: {_INSTALL['flash_attn']}"
                ) from e
            fa = None
        if fa is None or not hasattr(fa, "flash_attn_varlen_func"):
            raise ImportError(
                f"{mixer}: backend 'flash_attn' needs flash-attn 4 (module flash_attn.cute) or flash-attn 2 "
                f"(module flash_attn), and neither is installed; {hint}; or use {_instead(mixer)}"
            )
        if need_lse:
            raise ImportError(
                f"{mixer}: backend 'flash_attn' with attention sinks needs flash-attn 4 (module flash_attn.cute): "
                f"the sinks merge with the window through its log-sum-exp, which flash-attn 2 does not differentiate; "
                f"only flash-attn 2 is installed; install flash-attn 4: {_INSTALL['flash_attn_4']}; "
                f"or use {_instead(mixer)}"
            )
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not (8 <= head_dim <= 256 and head_dim % 8 == 0):
        raise ValueError(
            f"{mixer}: backend 'flash_attn' takes head_dim {FLASH_ATTN_HEAD_DIMS}, got head_dim={head_dim!r}; "
            f"change head_dim (or hidden_size / num_heads) or use {_instead(mixer)}"
        )
    _need_cuda("flash_attn", mixer=mixer)
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(
            f"{mixer}: backend 'flash_attn' needs an NVIDIA GPU of compute capability 8.0 or later (Ampere, Hopper, "
            f"Blackwell), got {major}.{minor} ({torch.cuda.get_device_name()}); use {_instead(mixer)}"
        )
    return FlashAttn(mixer, version, fa)


def _load_flash_attn(head_dim: int) -> AttendFn:
    fa = load_flash_attn("full_attention", head_dim=head_dim)

    def attend(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float) -> Tensor:
        return fa(q, k, v, valid, scale)[0]

    attend.flash_attn = fa  # which flash-attn runs, for reports
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


def load_backend(name: str, *, head_dim: int) -> AttendFn:
    """The attention function of backend ``name`` (one of BACKENDS) for heads of ``head_dim`` channels; fails now
    if it cannot run here."""
    if name == "sdpa":
        return _sdpa
    if name == "flex":
        return _load_flex()
    if name == "flash_attn":
        return _load_flash_attn(head_dim)
    if name == "xformers":
        return _load_xformers()
    raise ValueError(f"full_attention: backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {name!r}")
