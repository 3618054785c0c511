"""Single-needle retrieval on synthetic token sequences: a key and its value hidden in random tokens,
the key repeated at the end; the model must continue with the value."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["make_needle", "needle_retrieval"]


def make_needle(
    length: int, depth: float, *, key_len: int, value_len: int, low: int, high: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One sample: ``prompt`` [length - value_len] int64 = haystack with ``key + value`` inserted at ``depth``
    (0: the start, 1: just before the final key) and the key again at the end; ``value`` [value_len].
    Every token is drawn uniformly from [low, high)."""
    hay_len = length - 2 * key_len - 2 * value_len
    if hay_len < 0:
        raise ValueError(f"needle: length {length} is too short for key_len={key_len} and value_len={value_len}")

    def draw(n: int) -> Tensor:
        return torch.randint(low, high, (n,), generator=generator)

    key, value, hay = draw(key_len), draw(value_len), draw(hay_len)
    at = round(depth * hay_len)
    prompt = torch.cat((hay[:at], key, value, hay[at:], key))
    return prompt, value


@torch.no_grad()
def needle_retrieval(
    model: nn.Module,
    *,
    lengths: Sequence[int] = (1024, 2048, 4096, 8192, 16384),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 4,
    key_len: int = 8,
    value_len: int = 8,
    token_range: tuple[int, int] | None = None,
    seed: int = 0,
    generate: bool = False,
    device: torch.device | str | None = None,
) -> list[dict[str, float | int]]:
    """Accuracy of retrieving one needle at each (length, depth), over ``trials`` seeded samples.

    Sample: random tokens from ``token_range`` (default: the model's whole vocabulary), with ``key + value``
    inserted at ``depth`` and the key repeated at the end (total ``length`` tokens with the value). A
    sample is right when the greedy continuation is the value: with ``generate=False`` (default) one
    parallel eval forward of prompt + value reads the argmax at each value position (teacher forcing: all
    right exactly when greedy generation is); ``generate=True`` runs ``model.generate`` (prefill + decode).

    returns one row per (length, depth): {"length", "depth", "accuracy" (exact value), "token_accuracy",
    "trials"}.
    """
    vocab = model.vocab_size
    low, high = (0, vocab) if token_range is None else token_range
    if not 0 <= low < high <= vocab:
        raise ValueError(f"needle_retrieval: token_range must satisfy 0 <= low < high <= {vocab}, got {(low, high)}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle_retrieval: every depth must be in [0, 1], got {d!r}")
    device = next(model.parameters()).device if device is None else device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for length in lengths:
            for depth in depths:
                exact, right = 0, 0
                for _ in range(trials):
                    prompt, value = make_needle(
                        length, depth, key_len=key_len, value_len=value_len, low=low, high=high, generator=gen
                    )
                    if generate:
                        out = model.generate(prompt[None].to(device), value_len, compile=False)[0].cpu()
                    else:
                        ids = torch.cat((prompt, value))[None].to(device)
                        logits, _ = model(ids[:, :-1])
                        out = logits[0, -value_len:].argmax(-1).cpu()
                    hits = out == value
                    exact += int(hits.all())
                    right += int(hits.sum())
                rows.append(
                    {
                        "length": length,
                        "depth": depth,
                        "accuracy": exact / trials,
                        "token_accuracy": right / (trials * value_len),
                        "trials": trials,
                    }
                )
    finally:
        model.train(was_training)
    return rows
