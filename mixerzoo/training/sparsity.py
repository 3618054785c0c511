"""Sparsity regulariser and lambda controller for eviction_swa routers: keeps the number of retained
tokens per sequence in a target band tied to the buffer capacity."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..mixers.eviction_swa import EvictionSWA

__all__ = ["SparsityController"]


class SparsityController:
    """Holds the retained count per sequence of every eviction_swa layer in a target band: a budget
    penalty on the router scores, whose strength lambda (one per layer and KV head) adapts to the task.

    Two rules (``rule=``): "budget" (the default, described below) and "paper", the rule of He & Garner
    2025 (docs/paper.md#controller): a price ``lambda * relu(r)`` on every counted score, and every
    ``update_every`` (32) steps lambda *= ``alpha_up`` (1.5) above the band, /= ``alpha_down`` (2) below it,
    clamped to ``lambda_max`` (1.0), set to 0 below ``lambda_min`` (1e-9) and restarted at ``lambda_min``
    from 0 when above; the count excludes the forced sinks (a sink counts when its own score is > 0) and
    its EMA (rate ``2 / (1 + update_every // 2)``) starts at ``seq_len``; lambda starts at 0 and the first
    update sets it to ``lambda_init`` (1e-9) where the count is above the band, else 0. Both rules
    all-reduce their statistics over the data-parallel ranks at each update when torch.distributed is
    initialised.

    Either rule also takes the paper's schedule: ``warmup_steps`` (routers off: every token retained, the
    router's input detached, for the first steps), ``freeze_steps`` (router parameters get no gradient
    for the first steps) and ``lambda_initial_steps`` (lambda held at 0 for the first steps).

    Use, once per optimiser step::

        ctrl = SparsityController(model)
        loss = task_loss + ctrl.penalty()      # after the model's training-mode forward
        loss.backward(); opt.step(); opt.zero_grad()
        stats = ctrl.step()                    # stats["retained"]: [layers, heads] EMA of the count

    Band: ``[lo, hi] = [band[0] * C * s, band[1] * C * s]`` retained tokens per sequence, sinks
    included, C the layer's capacity and ``s = n / target_length`` with n the counted positions of the
    sequence, so a layer keeps the density that fills C slots at ``target_length`` tokens (the context
    length the capacity is meant for). ``target_length=None`` gives s = 1: C tokens per training sequence.

    Penalty, the proportional action. Per sequence and KV head the counted positions are ranked by score
    r, sinks first (they are kept whatever their score). Tokens ranked ``floor(hi)`` or later with
    ``r > -margin`` cost ``lambda * relu(r + margin)``: the excess is pushed below the threshold. Tokens
    ranked before ``ceil(lo)`` with ``r < margin`` cost ``lambda * relu(margin - r)``: the shortfall is
    pushed above it. The penalty is the mean of these over layers, and over heads, batch and counted
    positions (``router_mask``: real tokens except the last m, whose router context is cut by the end of
    the sequence). So each sequence is pushed in proportion to how far its count is outside the band,
    from above or below, and not at all inside it beyond the margin. The router keeps its own ranking
    (the task decides which tokens are worth the budget); only the cut through it is enforced. The
    margin keeps kept and evicted scores apart (2 * margin in r), so that the small shifts of every
    optimiser step do not carry tokens across the threshold; without it the count swings around the band
    with the optimiser's momentum (measured on a small recall task at C = 12: the worst head's count had a
    standard deviation of 1.5 to 2.2 tokens with margin 0.05, at most 1.1 with 0.15).

    Why not ``lambda * relu(r)`` on every retained token, a price per token: the count then follows
    lambda only as far as the router's scores are spread, and a fresh router's scores lie within about
    0.01 logits of each other, so a price keeps nearly every token or nearly none, and a layer the task
    does not use has no price at which it keeps C. The price also pushes every retained score towards
    the threshold, which bunches them there. Measured on examples/train_eviction.py: the count jumped
    between 2 and 90 of 90 tokens whatever the rule for lambda.

    Lambda, the integral action: the task pulls on the router too, so the penalty must be strong enough
    to win at the band's edges, and only the count says how strong that is. The count (mean over the
    batch) and the violation (``violation()``: how far, in router logits, each sequence's cut is from the
    band, margin included) feed EMAs. Every ``update_every`` steps (k) the EMAs are averaged over the
    data-parallel ranks (when torch.distributed is initialised, so that every rank computes the same
    lambdas) and::

        a        = log(ema / hi) above the band, log(lo / ema) below it (both > 0)
        progress = (violation k steps ago - violation now) / k        # logits per step towards the cut
        log(lambda) += gain * k * min(a, 1) * clip(1 - progress / speed, 0, 1)   outside the band
        log(lambda) -= gain * k * leak                                           inside it
        lambda clamped to [floor, lambda_max]

    Steps in log(lambda) cover any scale the task needs (lambda's unit depends on the loss and the
    sequence length): with ``gain = 0.2`` a count a factor e or more off the band multiplies lambda by
    e every 5 steps, from ``floor`` to 1 in under 50 steps. Lambda grows only while the router is not
    already closing in on the cut at ``speed`` logits per step: that is the anti-windup. A start with
    every token (or none) retained leaves the count stuck at its limit for tens of steps while the
    scores travel, and a lambda grown through all of them is far too strong once they arrive; the
    optimiser's second moments then remember it for hundreds of steps and the task stops training the
    router (measured: from a router keeping no token, lambda reached 800 and recall accuracy stayed at
    chance, against lambda near 20 and recall learning with the progress term). The violation, unlike
    the count, keeps moving in that phase, and logits move as fast when saturated as near 0. Inside the
    band lambda leaks (a factor e per ``1 / (gain * leak)`` = 500 steps) so that it follows a task that
    relaxes; ``floor`` keeps it away from 0, so that recovery never starts from a vanishing value.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rule: str = "budget",
        update_every: int | None = None,
        ema_decay: float = 0.8,
        band: tuple[float, float] = (0.95, 1.0),
        target_length: int | None = None,
        margin: float = 0.15,
        gain: float = 0.2,
        leak: float = 0.01,
        speed: float = 0.02,
        floor: float = 1e-4,
        lambda_init: float | None = None,
        lambda_max: float | None = None,
        seq_len: int | None = None,
        lambda_min: float = 1e-9,
        alpha_up: float = 1.5,
        alpha_down: float = 2.0,
        warmup_steps: int = 0,
        freeze_steps: int = 0,
        lambda_initial_steps: int = 0,
    ):
        self.layers = [m for m in model.modules() if isinstance(m, EvictionSWA) and m.router is not None]
        if not self.layers:
            raise ValueError("SparsityController: the model has no eviction_swa layer with a learned router")
        if rule not in ("budget", "paper"):
            raise ValueError(f"SparsityController: rule must be 'budget' or 'paper', got {rule!r}")
        if rule == "budget":
            relu = [i for i, m in enumerate(self.layers) if m.config.scoring != "sigmoid"]
            if relu:
                raise ValueError(
                    f"SparsityController: rule 'budget' needs scoring='sigmoid' (it ranks scores in (-0.5, 0.5)); "
                    f"eviction_swa layer(s) {relu} use scoring='relu': use rule='paper'"
                )
        paper = rule == "paper"
        update_every = (32 if paper else 1) if update_every is None else update_every
        lambda_max = (1.0 if paper else 1000.0) if lambda_max is None else lambda_max
        lambda_init = (lambda_min if paper else floor) if lambda_init is None else lambda_init
        low = 0.0 if paper else floor
        for name, value in (("warmup_steps", warmup_steps), ("freeze_steps", freeze_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SparsityController: {name} must be an int >= 0, got {value!r}")
        checks = [
            ("lambda_initial_steps", lambda_initial_steps, lambda_initial_steps >= 0, ">= 0"),
            ("seq_len", seq_len, seq_len is None or seq_len >= 1, "None or >= 1"),
            ("lambda_min", lambda_min, lambda_min > 0.0, "> 0"),
            ("alpha_up", alpha_up, alpha_up > 1.0, "> 1"),
            ("alpha_down", alpha_down, alpha_down > 1.0, "> 1"),
            ("update_every", update_every, update_every >= 1, ">= 1"),
            ("ema_decay", ema_decay, 0.0 <= ema_decay < 1.0, "in [0, 1)"),
            ("band", band, len(band) == 2 and 0.0 < band[0] <= band[1], "(lo, hi) with 0 < lo <= hi"),
            ("target_length", target_length, target_length is None or target_length >= 1, "None or >= 1"),
            ("margin", margin, 0.0 <= margin < 0.5, "in [0, 0.5) (scores r lie in (-0.5, 0.5))"),
            ("gain", gain, gain > 0.0, "> 0"),
            ("leak", leak, leak >= 0.0, ">= 0"),
            ("speed", speed, speed > 0.0, "> 0"),
            ("floor", floor, floor > 0.0, "> 0"),
            ("lambda_max", lambda_max, lambda_max >= low, f">= floor ({low})"),
            ("lambda_init", lambda_init, low <= lambda_init <= lambda_max, "in [floor, lambda_max]"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"SparsityController: {name} must be {allowed}, got {value!r}")
        self.rule = rule
        self.seq_len = seq_len
        self.lambda_init, self.lambda_min = lambda_init, lambda_min
        self.alpha_up, self.alpha_down = alpha_up, alpha_down
        self.warmup_steps, self.freeze_steps = warmup_steps, freeze_steps
        self.lambda_initial_steps = lambda_initial_steps
        self.update_every = update_every
        self.ema_decay = ema_decay
        self.band = band
        self.target_length = target_length
        self.margin, self.gain, self.leak, self.speed = margin, gain, leak, speed
        self.floor, self.lambda_max = floor, lambda_max
        # the paper's lambdas start at 0 and live in float32, as its buffers do
        start, dtype = (0.0, torch.float32) if paper else (float(lambda_init), torch.float64)
        self.lambdas = [
            torch.full((m.config.kv_heads,), start, dtype=dtype, device=_device_of(m)) for m in self.layers
        ]  # on the layers' device: penalty() then copies nothing to the device (a CUDA copy waits for the device)
        self.ema: list[Tensor | None] = [None] * len(self.layers)
        self.gap: list[Tensor | None] = [None] * len(self.layers)  # EMA of violation()
        self.gap_prev: list[Tensor | None] = [None] * len(self.layers)  # self.gap at the last adaptation
        self.steps = 0
        self._cache: dict[int, tuple] = {}
        self._schedule()

    def _schedule(self) -> None:
        """Routers on or off (warm-up) and trainable or frozen for the step about to run (self.steps + 1)."""
        for m in self.layers:  # untouched without a schedule: a user's own freezing stays
            if self.warmup_steps:
                m.router_enabled = self.steps >= self.warmup_steps
            if self.freeze_steps:
                for p in m.router.parameters():
                    p.requires_grad_(self.steps >= self.freeze_steps)

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

    def _scale(self, counted: Tensor | float) -> Tensor | float:
        return 1.0 if self.target_length is None else counted / self.target_length

    def band_for(self, layer: int, counted: Tensor | float) -> tuple[float, float]:
        """The target band of one layer; counted: positions counted per sequence (a float)."""
        C = self.layers[layer].config.capacity
        s = float(self._scale(float(counted)))
        return self.band[0] * C * s, self.band[1] * C * s

    def _ranking(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per sequence and KV head of the layer's last forward: ``rank`` [B, T, H] of each position (0 = highest
        score; sinks first, positions not counted last), ``ranked`` [B, T, H] the keys in that order (r, sinks 1,
        not counted -1), ``lo``, ``hi`` [B, 1, 1] the band in whole tokens, ``real`` [B, T, H] counted non-sinks."""
        r, mask, _ = self._records()[layer]
        hit = self._cache.get(layer)
        if hit is not None and hit[0] is r:
            return hit[1]
        B, T, H = r.shape
        c = self.layers[layer].config
        sink = (mask & (mask.cumsum(1) <= c.num_sinks))[..., None]  # the first S real tokens
        key = torch.where(sink, 1.0, torch.where(mask[..., None], r.detach(), -1.0))  # r lies in (-0.5, 0.5)
        order = key.argsort(dim=1, descending=True, stable=True)
        pos = torch.arange(T, device=r.device)[None, :, None].expand(B, T, H)
        rank = torch.empty_like(order).scatter_(1, order, pos)
        s = self._scale(mask.sum(1).to(torch.float64))  # [B] or 1.0
        # made on the device: a Python number copied there would make the host wait for the device
        lo, hi = (_float64_on(f * c.capacity * s, r.device) for f in self.band)
        out = (
            rank,
            key.gather(1, order),
            lo.ceil().reshape(-1, 1, 1),
            hi.floor().reshape(-1, 1, 1),
            mask[..., None] & ~sink,
        )
        self._cache[layer] = (r, out)
        return out

    def flagged(self, layer: int) -> tuple[Tensor, Tensor]:
        """The tokens the penalty acts on in the layer's last forward: ``(excess, shortfall)``, [B, T, H]
        bool each (see the class docstring)."""
        r = self._records()[layer][0]
        rank, _, lo, hi, real = self._ranking(layer)
        excess = real & (rank >= hi) & (r > -self.margin)
        shortfall = real & (rank < lo) & (r < self.margin)
        return excess, shortfall

    def violation(self, layer: int) -> Tensor:
        """How far the layer's cut sits from the band, in router logits z (r = sigmoid(z) - 0.5): [H], the
        mean over the batch of ``relu(z[hi] + zm) + relu(zm - z[lo - 1])``, z[k] the logit ranked k (0 =
        highest) in the sequence, zm the margin as a logit. 0 when every sequence keeps between lo and hi
        tokens, with the margin; unlike the count, it keeps shrinking while the scores move towards the cut
        with every token (or none) retained, and logits move as fast when saturated as near 0."""
        _, ranked, lo, hi, _ = self._ranking(layer)
        B, T, H = ranked.shape
        at_hi = ranked.gather(1, hi.clamp(max=T - 1).long().expand(B, 1, H))
        at_hi = torch.where(hi < T, at_hi, -1.0)  # a budget as long as the sequence: no excess
        # a band above the sequence's length (a short training sequence, a large capacity): its last token
        at_lo = ranked.gather(1, (lo - 1).clamp(min=0, max=T - 1).long().expand(B, 1, H))
        at_lo = torch.where(lo >= 1, at_lo, 1.0)
        z_hi, z_lo = (torch.logit(t.double() + 0.5, eps=1e-6) for t in (at_hi, at_lo))  # sentinels +-1: +-13.8
        zm = math.log((0.5 + self.margin) / (0.5 - self.margin))
        return ((z_hi + zm).relu() + (zm - z_lo).relu())[:, 0].mean(0)

    def penalty(self) -> Tensor:
        """The regulariser for the last forward, a scalar with gradient to the routers."""
        if self.rule == "paper":  # mean of lambda * relu(r) over layers, batch, counted positions, heads
            terms = []
            for i, (r, mask, _) in enumerate(self._records()):
                per = r.relu() * mask[..., None] * self._lambda_on(i, r.device).to(r.dtype)
                terms.append(per.sum() / (mask.sum() * r.shape[-1]).clamp(min=1))
            return torch.stack(terms).mean()
        terms = []
        for i, (r, mask, _) in enumerate(self._records()):
            excess, shortfall = self.flagged(i)
            d = self.margin
            per = (r + d).relu() * excess + (d - r).relu() * shortfall  # [B, T, H]
            per = per * self._lambda_on(i, r.device).to(r.dtype)
            terms.append(per.sum() / (mask.sum() * r.shape[-1]).clamp(min=1))
        return torch.stack(terms).mean()

    def _lambda_on(self, i: int, device: torch.device) -> Tensor:
        """Layer i's lambda on ``device``, kept there (a model moved after the controller was built, or lambdas
        loaded from a checkpoint on the CPU, are copied once, not every step)."""
        if self.lambdas[i].device != device:
            self.lambdas[i] = self.lambdas[i].to(device)
        return self.lambdas[i]

    def _adapt(self, i: int, lo: float, hi: float) -> Tensor:
        """One step of the lambda law of layer i -> new lambda [H] float64, on the EMA's device (no host sync)."""
        c = self.ema[i].clamp(min=1e-6)
        outside = (c > hi) | (c < lo)
        a = torch.where(c > hi, (c / hi).log(), (lo / c).log()).clamp(0.0, 1.0)
        violation = self.gap[i]
        if self.gap_prev[i] is not None:
            progress = (self.gap_prev[i] - violation) / self.update_every  # logits per step towards the cut
            a = a * (1.0 - progress / self.speed).clamp(0.0, 1.0)
        self.gap_prev[i] = violation
        rate = torch.where(outside, a, -self.leak)
        lam = self.lambdas[i].to(c.device).clamp(min=self.floor) * torch.exp(self.gain * self.update_every * rate)
        return lam.clamp(self.floor, self.lambda_max)

    def _ema(self, old: Tensor | None, new: Tensor) -> Tensor:
        return new if old is None else self.ema_decay * old.to(new.device) + (1 - self.ema_decay) * new

    @torch.no_grad()
    def step(self) -> dict[str, Tensor | list]:
        """Call once per optimiser step. Returns ``retained`` (EMA) and ``count`` (this batch):
        [layers, heads] retained tokens per sequence; ``lambda``: [layers, heads]; ``band``: per layer;
        ``violation`` (rule "budget" only): [layers, heads]. The tensors stay on the layers' device and the
        step never waits for it (with ``target_length`` set, the budget rule's band reads the counted length
        back once per step): a trainer reads them only when it logs, so the host keeps queueing steps."""
        if self.rule == "paper":
            stats = self._step_paper()
        else:
            stats = self._step_budget()
        self._schedule()
        return stats

    def _step_paper(self) -> dict[str, Tensor | list]:
        self.steps += 1
        k = self.update_every
        rate = 2.0 / (1 + k // 2)
        counts = []
        for i, (r, mask, _) in enumerate(self._records()):
            count = ((r.detach() > 0) & mask[..., None]).sum(1).float().mean(0)  # [H], sinks not forced
            if self.ema[i] is None:
                start = float(self.seq_len if self.seq_len is not None else r.shape[1])
                self.ema[i] = torch.full_like(count, start)
            self.ema[i] = self.ema[i] * (1 - rate) + count * rate
            counts.append(count)
        bands = [self.band_for(i, 1.0) for i in range(len(self.layers))]  # the paper's band is not scaled
        if self.steps > self.lambda_initial_steps and self.steps % k == 0:
            if dist.is_available() and dist.is_initialized():
                flat = torch.cat(self.ema)
                home = flat.device
                dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
                flat = flat.to(dev)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat = (flat / dist.get_world_size()).to(home)
                self.ema = list(flat.split([e.numel() for e in self.ema]))
            first = self.steps // k == self.lambda_initial_steps // k + 1
            for i, (lo, hi) in enumerate(bands):
                self.lambdas[i] = self._adapt_paper(self.lambdas[i], self.ema[i], lo, hi, first)
        return {
            "retained": torch.stack([e.float() for e in self.ema]),
            "count": torch.stack(counts),
            "lambda": torch.stack(self.lambdas),
            "band": bands,
        }

    def _adapt_paper(self, lam: Tensor, kept: Tensor, lo: float, hi: float, first: bool) -> Tensor:
        """The paper's multiplicative law for one layer: lam, kept [H] -> new lam [H] float32."""
        large, small = kept > lo, kept < hi  # both inside (lo, hi): no change
        lam = lam.to(kept.device)
        if first:
            return torch.where(large, self.lambda_init, 0.0).float()
        coeff = torch.where(large & ~small, self.alpha_up, torch.where(small & ~large, 1 / self.alpha_down, 1.0))
        lam = (lam * coeff.float()).clamp(max=self.lambda_max)
        lam = torch.where(lam < self.lambda_min, 0.0, lam)
        return torch.where((lam == 0) & large, self.lambda_min, lam).float()

    def _step_budget(self) -> dict[str, Tensor | list]:
        self.steps += 1
        adapt = self.steps % self.update_every == 0
        counts, counted = [], []
        for i, (_, mask, retained) in enumerate(self._records()):
            count = (retained & mask[..., None]).sum(1).double().mean(0)  # [H] per sequence
            self.ema[i] = self._ema(self.ema[i], count)
            self.gap[i] = self._ema(self.gap[i], self.violation(i))
            counts.append(count)
            counted.append(mask.sum(1).double().mean().reshape(1))
        if adapt and dist.is_available() and dist.is_initialized():
            # One collective for every layer: the EMAs (and the counted length that sets the band) become
            # the same on every rank, and so do the lambdas computed from them.
            L = len(self.layers)
            flat = torch.cat([*self.ema, *self.gap, *counted])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= dist.get_world_size()
            parts = flat.split([*(e.numel() for e in self.ema), *(g.numel() for g in self.gap), *(1,) * L])
            self.ema, self.gap, counted = list(parts[:L]), list(parts[L : 2 * L]), list(parts[2 * L :])
        # the band scales with the counted length only under target_length: read back only then
        scaled = self.target_length is not None
        bands = [self.band_for(i, c.item() if scaled else 1.0) for i, c in enumerate(counted)]
        if adapt:
            for i, (lo, hi) in enumerate(bands):
                self.lambdas[i] = self._adapt(i, lo, hi)
        return {
            "retained": torch.stack([e.float() for e in self.ema]),
            "count": torch.stack([c.float() for c in counts]),
            "lambda": torch.stack(self.lambdas),
            "band": bands,
            "violation": torch.stack([g.float() for g in self.gap]),
        }

    def state_dict(self) -> dict:
        """Lambdas, the EMAs and the step count: what a resumed run needs to continue the same."""

        def copy(ts: list[Tensor | None]) -> list[Tensor | None]:
            return [None if t is None else t.detach().cpu().clone() for t in ts]

        return {
            "rule": self.rule,
            "lambdas": copy(self.lambdas),
            "ema": copy(self.ema),
            "violation": copy(self.gap),
            "violation_prev": copy(self.gap_prev),
            "steps": self.steps,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore ``state_dict()``; the rule must match, and routers' warm-up and freezing follow the step."""
        n = len(self.layers)
        rule = sd.get("rule", "budget")
        if rule != self.rule:
            raise ValueError(
                f"SparsityController.load_state_dict: the state is of rule {rule!r}, this controller's is {self.rule!r}"
            )
        for key in ("lambdas", "ema", "violation", "violation_prev"):
            if len(sd[key]) != n:
                raise ValueError(
                    f"SparsityController.load_state_dict: {key!r} has {len(sd[key])} entries, the model has "
                    f"{n} eviction_swa layers with a router"
                )
        dtype = torch.float32 if self.rule == "paper" else torch.float64
        devs = [_device_of(m) for m in self.layers]  # where step() computes with them: the layers' device

        def place(ts: list[Tensor | None], cast: torch.dtype | None = None) -> list[Tensor | None]:
            pairs = zip(ts, devs, strict=True)
            return [None if t is None else t.detach().to(d, cast or t.dtype).clone() for t, d in pairs]

        self.lambdas = place(sd["lambdas"], dtype)
        self.ema = place(sd["ema"])
        self.gap = place(sd["violation"])
        self.gap_prev = place(sd["violation_prev"])
        self.steps = sd["steps"]
        self._schedule()


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def _float64_on(x: Tensor | float, device: torch.device) -> Tensor:
    """x as a float64 tensor on device; a Python number is filled in there, not copied from the host."""
    if isinstance(x, Tensor):
        return x.to(device, torch.float64)
    return torch.full((), x, dtype=torch.float64, device=device)
