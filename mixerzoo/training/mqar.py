"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): synthetic key-value recall data."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mqar_batch"]


def mqar_batch(
    batch_size: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int,
    *,
    num_queries: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch of recall sequences.

    Layout: ``k1 v1 k2 v2 ... kn vn`` (keys drawn without repetition from ``[1, V/2)``, values from
    ``[V/2, V)``), then filler token 0 with ``num_queries`` (default n) of the keys repeated at random
    later positions. The target at a repeated key is its value; every other target is -100.

    returns inputs: [B, T] int64, targets: [B, T] int64 (-100 = ignored).
    """
    B, T, n, V = batch_size, seq_len, num_pairs, vocab_size
    nq = n if num_queries is None else num_queries
    if V // 2 - 1 < n or 2 * n + nq > T or nq > n:
        raise ValueError(
            f"mqar_batch: need num_pairs <= vocab_size/2 - 1, num_queries <= num_pairs and "
            f"2*num_pairs + num_queries <= seq_len; got n={n}, queries={nq}, V={V}, T={T}"
        )
    g = generator
    keys = torch.rand(B, V // 2 - 1, generator=g).argsort(-1)[:, :n] + 1  # [B, n] distinct
    vals = torch.randint(V // 2, V, (B, n), generator=g)
    inputs = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = vals
    which = torch.rand(B, n, generator=g).argsort(-1)[:, :nq]  # [B, nq] pairs asked about
    where = torch.rand(B, T - 2 * n, generator=g).argsort(-1)[:, :nq] + 2 * n  # [B, nq] positions
    inputs.scatter_(1, where, keys.gather(1, which))
    targets.scatter_(1, where, vals.gather(1, which))
    return inputs.to(device), targets.to(device)
