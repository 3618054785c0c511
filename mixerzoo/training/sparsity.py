"""Sparsity regulariser and lambda controller for eviction_swa routers (SPEC 4.3): keeps the number of
retained tokens per sequence in a target band tied to the buffer capacity."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..mixers.eviction_swa import EvictionSWA

__all__ = ["SparsityController"]


class SparsityController:
    """One lambda per (eviction_swa layer, KV head), adapted from the retained count.

    Use, once per optimiser step::

        ctrl = SparsityController(model)
        loss = task_loss + ctrl.penalty()      # after the model's training-mode forward
        loss.backward(); opt.step(); opt.zero_grad()
        stats = ctrl.step()                    # stats["retained"]: [layers, heads] EMA of the count

    Penalty: ``mean over layers, heads, batch and positions of lambda[layer, head] * relu(r)``, over the
    positions each mixer lists in ``router_mask`` (real tokens except the last m, whose router context
    is cut by the end of the sequence). It reads the scores the layers kept from their last
    training-mode forward (``EvictionSWA.router_scores``), so no global state is involved.

    Controller: every step the retained count per sequence (mean over the batch, sinks included) of
    each (layer, head) feeds an EMA. Every ``update_every`` steps the EMA is averaged over the
    data-parallel ranks (when torch.distributed is initialised) and compared with the band
    ``[band[0] * C * s, band[1] * C * s]``: above it lambda *= grow (from ``floor`` when it is 0),
    below it lambda *= shrink, then lambda is clamped to ``[0, lambda_max]``.

    Scaling to the training length: ``s = n / target_length``, with n the number of counted positions
    per sequence, so a layer retains the density that fills C slots at ``target_length`` tokens (the
    context length the capacity is meant for). ``target_length=None`` gives s = 1: C retained tokens
    per training sequence, the band of SPEC 4.3 as written.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        update_every: int = 32,
        ema_decay: float = 0.9,
        band: tuple[float, float] = (0.95, 1.0),
        target_length: int | None = None,
        grow: float = 1.5,
        shrink: float = 0.5,
        floor: float = 1e-9,
        lambda_init: float = 0.0,
        lambda_max: float = 1.0,
    ):
        self.layers = [m for m in model.modules() if isinstance(m, EvictionSWA) and m.router is not None]
        if not self.layers:
            raise ValueError("SparsityController: the model has no eviction_swa layer with a learned router")
        if update_every < 1 or not 0.0 <= ema_decay < 1.0 or not 0.0 < band[0] <= band[1]:
            raise ValueError(
                f"SparsityController: need update_every >= 1, 0 <= ema_decay < 1 and 0 < band[0] <= band[1]; "
                f"got {update_every}, {ema_decay}, {band}"
            )
        self.update_every = update_every
        self.ema_decay = ema_decay
        self.band = band
        self.target_length = target_length
        self.grow, self.shrink, self.floor, self.lambda_max = grow, shrink, floor, lambda_max
        self.lambdas = [torch.full((m.config.kv_heads,), float(lambda_init), dtype=torch.float64) for m in self.layers]
        self.ema: list[Tensor | None] = [None] * len(self.layers)
        self.steps = 0

    def _records(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        out = []
        for i, m in enumerate(self.layers):
            if m.router_scores is None:
                raise RuntimeError(
                    f"SparsityController: eviction_swa layer {i} has no router scores; run the model's "
                    f"training-mode forward (model.train()) before penalty() / step()"
                )
            out.append((m.router_scores, m.router_mask, m.router_retained))
        return out

    def penalty(self) -> Tensor:
        """The regulariser for the last forward, a scalar with gradient to the routers."""
        terms = []
        for lam, (r, mask, _) in zip(self.lambdas, self._records(), strict=True):
            w = mask[..., None].to(r.dtype) * lam.to(r.device, r.dtype)  # [B, T, H]
            terms.append((r.relu() * w).sum() / (mask.sum() * r.shape[-1]).clamp(min=1))
        return torch.stack(terms).mean()

    def band_for(self, layer: int, counted: Tensor) -> tuple[float, float]:
        """The target band of one layer; counted: positions counted per sequence (a float)."""
        C = self.layers[layer].config.capacity
        s = 1.0 if self.target_length is None else float(counted) / self.target_length
        return self.band[0] * C * s, self.band[1] * C * s

    @torch.no_grad()
    def step(self) -> dict[str, Tensor | list]:
        """Call once per optimiser step. Returns ``retained`` (EMA) and ``count`` (this batch):
        [layers, heads] retained tokens per sequence; ``lambda``: [layers, heads]; ``band``: per layer."""
        self.steps += 1
        adapt = self.steps % self.update_every == 0
        counts, bands = [], []
        for i, (_, mask, retained) in enumerate(self._records()):
            count = (retained & mask[..., None]).sum(1).double().mean(0)  # [H] per sequence
            ema = self.ema[i]
            ema = count if ema is None else self.ema_decay * ema + (1 - self.ema_decay) * count
            counted = mask.sum(1).double().mean()
            lo, hi = self.band_for(i, counted)
            if adapt:
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(ema, op=dist.ReduceOp.SUM)
                    ema /= dist.get_world_size()
                lam = self.lambdas[i]
                e = ema.cpu()
                up = torch.where(lam == 0, torch.full_like(lam, self.floor), lam * self.grow)
                lam = torch.where(e > hi, up, torch.where(e < lo, lam * self.shrink, lam))
                self.lambdas[i] = lam.clamp(0.0, self.lambda_max)
            self.ema[i] = ema
            counts.append(count)
            bands.append((lo, hi))
        return {
            "retained": torch.stack([e.float().cpu() for e in self.ema]),
            "count": torch.stack([c.float().cpu() for c in counts]),
            "lambda": torch.stack(self.lambdas),
            "band": bands,
        }

    def state_dict(self) -> dict:
        return {"lambdas": [t.clone() for t in self.lambdas], "ema": list(self.ema), "steps": self.steps}

    def load_state_dict(self, sd: dict) -> None:
        self.lambdas = [t.clone() for t in sd["lambdas"]]
        self.ema = list(sd["ema"])
        self.steps = sd["steps"]
