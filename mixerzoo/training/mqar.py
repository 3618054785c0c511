"""Synthetic recall data: multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), MQAR with
power-law key-to-query distances, and a single needle; seeded per (seed, step, rank)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["RecallTask", "batch_generator", "mqar_batch", "needle_batch", "recall_batch"]

_MASK64 = (1 << 64) - 1


def batch_generator(seed: int, step: int, rank: int = 0, device: torch.device | str | None = None) -> torch.Generator:
    """A generator whose stream depends only on ``(seed, step, rank)``: a data-parallel rank's batch
    at a step is the same whatever ran before it (a resumed run draws the same data), and ranks differ.
    The three integers are mixed with the splitmix64 finaliser, so nearby seeds give unrelated streams.
    ``device`` (default the CPU): where it draws; a CUDA generator draws another stream than the CPU's from
    the same seed."""
    for name, v in (("seed", seed), ("step", step), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"batch_generator: {name} must be an int >= 0, got {v!r}")
    h = 0
    for v in (seed, step, rank):
        h = (h ^ v) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return torch.Generator(device=device or "cpu").manual_seed(h & ((1 << 63) - 1))


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
    dev = _draw_device(g)
    keys = torch.rand(B, V // 2 - 1, generator=g, device=dev).argsort(-1)[:, :n] + 1  # [B, n] distinct
    vals = torch.randint(V // 2, V, (B, n), generator=g, device=dev)
    inputs = torch.zeros(B, T, dtype=torch.long, device=dev)
    targets = torch.full((B, T), -100, dtype=torch.long, device=dev)
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = vals
    which = torch.rand(B, n, generator=g, device=dev).argsort(-1)[:, :nq]  # [B, nq] pairs asked about
    where = torch.rand(B, T - 2 * n, generator=g, device=dev).argsort(-1)[:, :nq] + 2 * n  # [B, nq] positions
    inputs.scatter_(1, where, keys.gather(1, which))
    targets.scatter_(1, where, vals.gather(1, which))
    return inputs.to(device), targets.to(device)


def _vocab_split(where: str, vocab_size: int, noise_vocab: int, need_keys: int) -> tuple[int, int]:
    """(number of key tokens K, number of value tokens); keys are [1, 1 + K), values follow, noise last."""
    if isinstance(noise_vocab, bool) or not isinstance(noise_vocab, int) or noise_vocab < 0:
        raise ValueError(f"{where}: noise_vocab must be an int >= 0, got {noise_vocab!r}")
    K = (vocab_size - 1 - noise_vocab) // 2
    if K < need_keys:
        raise ValueError(
            f"{where}: vocab_size={vocab_size} with noise_vocab={noise_vocab} leaves {K} key tokens, "
            f"need >= {need_keys} (vocab_size >= 1 + noise_vocab + 2 * {need_keys})"
        )
    return K, K


def _draw_device(g: torch.Generator | None) -> torch.device:
    """Where a batch is drawn: on its generator's device (a CUDA generator draws on the GPU, with no host
    work but the launches), else on the CPU; ``device=`` is where the result goes."""
    return g.device if g is not None else torch.device("cpu")


def _filler(B: int, T: int, vocab_size: int, noise_vocab: int, g: torch.Generator | None) -> Tensor:
    dev = _draw_device(g)
    if noise_vocab == 0:
        return torch.zeros(B, T, dtype=torch.long, device=dev)
    return torch.randint(vocab_size - noise_vocab, vocab_size, (B, T), generator=g, device=dev)


def _check_ints(where: str, **values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {name} must be an int >= 1, got {v!r}")


def recall_batch(
    batch_size: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int,
    *,
    power: float = 1.0,
    min_distance: int = 2,
    noise_vocab: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """MQAR with power-law distances: each of ``num_pairs`` (n) key-value pairs ``k v`` sits somewhere in the
    sequence and its key is asked once, ``d`` tokens after the key, with ``P(d) ~ d**-power`` on
    ``[min_distance, d_max]``, ``d_max = T - 10 n - 2`` (``power = 1``: as many distances in [64, 128) as in
    [512, 1024), so a good share lies beyond any short window; 0: uniform). The query is the key token
    again; its target is the value. Keys are distinct within a sequence, drawn from ``[1, 1 + K)``, values
    from the next K tokens, and every other position holds filler: token 0, or with ``noise_vocab = N`` a
    random token of the last N of the vocabulary (K = (V - 1 - N) // 2).

    Pairs are placed longest distance first, each at a uniformly drawn free spot where its key, value and
    query all fit; d_max leaves room for every pair whatever was placed before.

    returns inputs: [B, T] int64, targets: [B, T] int64 (-100 everywhere but at the n queries).
    """
    where = "recall_batch"
    _check_ints(where, batch_size=batch_size, seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size)
    _check_ints(where, min_distance=min_distance)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 <= power < math.inf:
        raise ValueError(f"{where}: power must be a finite number >= 0, got {power!r}")
    B, T, n, V = batch_size, seq_len, num_pairs, vocab_size
    K, _ = _vocab_split(where, V, noise_vocab, n)
    d_lo, d_hi = max(min_distance, 2), T - 10 * n - 2
    if d_hi < d_lo:
        raise ValueError(
            f"{where}: seq_len={T} is too short for {n} pairs at distance >= {d_lo}: needs seq_len >= "
            f"{d_lo + 10 * n + 2} (the farthest distance is seq_len - 10 * num_pairs - 2)"
        )
    g = generator
    dev = _draw_device(g)
    # Distances by inverse CDF of the continuous power law on [d_lo, d_hi + 1), floored.
    u = torch.rand(B, n, generator=g, dtype=torch.float64, device=dev)
    a, b = float(d_lo), float(d_hi + 1)
    if abs(power - 1.0) < 1e-9:
        d = a * (b / a) ** u
    else:
        e = 1.0 - power
        d = (a**e + u * (b**e - a**e)) ** (1.0 / e)
    dist = d.floor().long().clamp(d_lo, d_hi).sort(-1, descending=True).values  # [B, n]
    keys = torch.rand(B, K, generator=g, device=dev).argsort(-1)[:, :n] + 1  # [B, n] distinct
    vals = torch.randint(1 + K, 1 + 2 * K, (B, n), generator=g, device=dev)

    inputs = _filler(B, T, V, noise_vocab, g)
    targets = torch.full((B, T), -100, dtype=torch.long, device=dev)
    free = torch.ones(B, T + 1, dtype=torch.bool, device=dev)  # a spare column so that shifted reads stay in range
    free[:, T] = False
    pos = torch.arange(T, device=dev)
    rows = torch.arange(B, device=dev)
    for i in range(n):
        di = dist[:, i : i + 1]  # [B, 1]
        # query at q, key at q - d, value at q - d + 1 (d >= 2, so the three differ)
        kpos = (pos[None] - di).clamp(min=0)  # [B, T]
        ok = free[:, :T] & (pos[None] >= di) & free.gather(1, kpos) & free.gather(1, kpos + 1)
        # a uniform choice among the allowed positions (d_hi guarantees one: <= 9 blocked per pair placed)
        q = torch.where(ok, torch.rand(B, T, generator=g, device=dev), -1.0).argmax(-1)  # [B]
        k = q - di[:, 0]
        free[rows, q] = free[rows, k] = free[rows, k + 1] = False
        inputs[rows, k] = keys[:, i]
        inputs[rows, k + 1] = vals[:, i]
        inputs[rows, q] = keys[:, i]
        targets[rows, q] = vals[:, i]
    return inputs.to(device), targets.to(device)


def needle_batch(
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    *,
    needle_range: float = 0.125,
    noise_vocab: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """A single needle: one key-value pair ``k v`` early (the key at a uniform position in the first
    ``needle_range`` of the sequence), filler everywhere else, and the key again as the last token, whose
    target is the value. Tokens as for ``recall_batch`` (keys ``[1, 1 + K)``, values the next K, filler 0
    or noise from the last ``noise_vocab`` tokens).

    returns inputs: [B, T] int64, targets: [B, T] int64 (-100 everywhere but at the last position).
    """
    where = "needle_batch"
    _check_ints(where, batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size)
    if isinstance(needle_range, bool) or not isinstance(needle_range, (int, float)) or not 0 < needle_range <= 1:
        raise ValueError(f"{where}: needle_range must be a number in (0, 1], got {needle_range!r}")
    if seq_len < 3:
        raise ValueError(f"{where}: seq_len must be >= 3 (key, value, query), got {seq_len}")
    B, T = batch_size, seq_len
    K, _ = _vocab_split(where, vocab_size, noise_vocab, 1)
    g = generator
    dev = _draw_device(g)
    span = max(1, min(T - 2, int(needle_range * T)))
    at = torch.randint(0, span, (B,), generator=g, device=dev)
    key = torch.randint(1, 1 + K, (B,), generator=g, device=dev)
    val = torch.randint(1 + K, 1 + 2 * K, (B,), generator=g, device=dev)
    inputs = _filler(B, T, vocab_size, noise_vocab, g)
    targets = torch.full((B, T), -100, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    inputs[rows, at] = key
    inputs[rows, at + 1] = val
    inputs[:, T - 1] = key
    targets[:, T - 1] = val
    return inputs.to(device), targets.to(device)


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """A recall data source for training and evaluation: ``kind`` "mqar" (power-law distances,
    ``recall_batch``), "mqar_uniform" (the pairs first, then the queries: ``mqar_batch``) or "needle"
    (``needle_batch``).

    ``task.batch(batch_size, seq_len, seed=, step=, rank=)`` draws the batch of one data-parallel rank at
    one step; it depends only on those arguments (``batch_generator``) and on the device type: with
    ``device=`` a CUDA device it draws there, another stream than the CPU's (the Trainer draws there).
    """

    draws_on_device: ClassVar[bool] = True  # the Trainer passes device= and draws each batch there

    kind: str = "mqar"
    num_pairs: int = 32
    vocab_size: int = 4096
    power: float = 1.0
    noise_vocab: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("mqar", "mqar_uniform", "needle"):
            raise ValueError(f"RecallTask: kind must be 'mqar', 'mqar_uniform' or 'needle', got {self.kind!r}")
        _check_ints("RecallTask", num_pairs=self.num_pairs, vocab_size=self.vocab_size)

    def batch(
        self,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        step: int,
        rank: int = 0,
        num_pairs: int | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """inputs, targets: [batch_size, seq_len] int64 (targets -100 where nothing is asked);
        ``num_pairs`` replaces the task's (a curriculum's stage)."""
        g = batch_generator(seed, step, rank, device=device)
        n = self.num_pairs if num_pairs is None else num_pairs
        if self.kind == "mqar":
            return recall_batch(
                batch_size,
                seq_len,
                n,
                self.vocab_size,
                power=self.power,
                noise_vocab=self.noise_vocab,
                generator=g,
                device=device,
            )
        if self.kind == "mqar_uniform":
            return mqar_batch(batch_size, seq_len, n, self.vocab_size, generator=g, device=device)
        return needle_batch(
            batch_size, seq_len, self.vocab_size, noise_vocab=self.noise_vocab, generator=g, device=device
        )
