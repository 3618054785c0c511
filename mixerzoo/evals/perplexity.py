"""Perplexity of a language model on a flat binary file of token ids."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TOKEN_DTYPES", "perplexity", "read_tokens"]

TOKEN_DTYPES = {"uint16": torch.uint16, "int32": torch.int32, "uint32": torch.uint32, "int64": torch.int64}


def read_tokens(path: str | os.PathLike, dtype: str = "uint16") -> Tensor:
    """The token ids of a flat binary file (native byte order, no header), as a 1-D int64 tensor.

    dtype: "uint16" (vocabularies up to 65536), "int32", "uint32" or "int64".
    """
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"read_tokens: dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    t = TOKEN_DTYPES[dtype]
    size = os.path.getsize(path)
    width = torch.empty((), dtype=t).element_size()
    if size % width:
        raise ValueError(f"read_tokens: {os.fspath(path)!r} holds {size} bytes, not a multiple of {width} ({dtype})")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if not data:
        raise ValueError(f"read_tokens: {os.fspath(path)!r} is empty")
    return torch.frombuffer(data, dtype=t).to(torch.int64)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: Tensor,
    *,
    seq_len: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """Perplexity over consecutive, non-overlapping windows of ``seq_len`` tokens (a trailing remainder is
    left out), each scored by one parallel forward in eval mode: every token but a window's first is
    predicted from the tokens before it in its window.

    model:  a HybridLM (``model(ids) -> (logits [B, T, V], _)``).
    tokens: [N] int token ids (e.g. ``read_tokens(path)``).
    returns {"ppl", "nll" (mean per predicted token), "tokens" (predicted), "windows"}.
    """
    if tokens.dim() != 1:
        raise ValueError(f"perplexity: tokens must be 1-D [N], got shape {tuple(tokens.shape)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"perplexity: seq_len must be an int >= 2, got {seq_len!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be an int >= 1, got {batch_size!r}")
    n = tokens.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"perplexity: {tokens.numel()} tokens hold no window of seq_len={seq_len}")
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and (int(tokens[: n * seq_len].max()) >= vocab or int(tokens[: n * seq_len].min()) < 0):
        raise ValueError(f"perplexity: token ids must lie in [0, {vocab}) (the model's vocabulary)")
    device = next(model.parameters()).device if device is None else device
    was_training = model.training
    model.eval()
    try:
        windows = tokens[: n * seq_len].view(n, seq_len)
        total, count = 0.0, 0
        for b0 in range(0, n, batch_size):
            ids = windows[b0 : b0 + batch_size].to(device)
            logits, _ = model(ids)
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": n}
