"""A trainer for HybridLM: one CPU to several GPUs (FSDP2 under torchrun), AdamW with warm-up and cosine
decay, the eviction sparsity controller, evaluation, and torch.distributed.checkpoint checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..mixers.eviction_swa import EvictionSWA
from ..models import HybridLM, HybridLMConfig
from ..models.blocks import Block
from ..models.config import PRESETS
from .mqar import RecallTask, batch_generator
from .sparsity import SparsityController

__all__ = ["TokenFileData", "TrainConfig", "Trainer", "add_train_parsers", "lr_at", "main_train"]

EVAL_SEED_OFFSET = 1 << 40  # evaluation draws from streams that training never reaches


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a run (the model is given separately).

    steps:            optimiser steps in all.
    batch_size:       sequences per step over all ranks (split evenly between them).
    seq_len:          tokens per training sequence (a curriculum may use shorter ones early).
    lr, min_lr_ratio: peak learning rate; the cosine decays to lr * min_lr_ratio at the last step.
    warmup:           linear warm-up steps (from lr / warmup to lr).
    weight_decay:     AdamW decay of the matrices (not of embeddings, norms, biases, router convs).
    betas, eps:       AdamW moments.
    grad_clip:        max global gradient norm (0: no clipping).
    seed:             model initialisation, data streams and dropout all derive from it.
    data_shards:      pieces the global batch is drawn in (None: the world size); a rank's batch is
                      the draw of its shards, so a run on one process with data_shards=N sees the global
                      batches of an N-rank run.
    amp:              "auto" (bf16 autocast on CUDA, none on the CPU), "bf16" or "none".
    data_device:      "auto" (a data source that can, RecallTask, draws a CUDA run's batches on the GPU; others
                      on a background CPU thread) or "cpu" (always the CPU thread; the CPU's streams).
    compile:          torch.compile each block (False, True for Inductor, or a backend name).
    activation_checkpointing: recompute each block in the backward instead of storing its activations.
    log_every, eval_every, eval_batches: progress line and evaluation (0: never) cadence.
    record_every:     also keep the loss and accuracy of every this many steps in the history (0: only logged
                      steps), without waiting for the device: they are read back at the next logged step (or the
                      end) all at once, so a per-step loss curve does not stop the host queueing steps.
    checkpoint_dir, checkpoint_every: where and how often to save (0: only at the end; None: never).
    controller:       keyword arguments for SparsityController (used when the model has a learned router).
    curriculum:       ((from_step, seq_len, num_pairs), ...): a recall task's length and pairs change at
                      those steps (num_pairs 0: the task's own).
    """

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    data_shards: int | None = None
    amp: str = "auto"
    data_device: str = "auto"
    compile: bool | str = False
    activation_checkpointing: bool = False
    log_every: int = 10
    record_every: int = 0
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    controller: dict = dataclasses.field(default_factory=dict)
    curriculum: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        ints = {
            "steps": (self.steps, 1),
            "batch_size": (self.batch_size, 1),
            "seq_len": (self.seq_len, 2),
            "warmup": (self.warmup, 0),
            "seed": (self.seed, 0),
            "log_every": (self.log_every, 0),
            "record_every": (self.record_every, 0),
            "eval_every": (self.eval_every, 0),
            "eval_batches": (self.eval_batches, 1),
            "checkpoint_every": (self.checkpoint_every, 0),
        }
        for name, (v, lo) in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"TrainConfig: {name} must be an int >= {lo}, got {v!r}")
        if self.data_shards is not None and (not isinstance(self.data_shards, int) or self.data_shards < 1):
            raise ValueError(f"TrainConfig: data_shards must be None or an int >= 1, got {self.data_shards!r}")
        for name, v, ok, allowed in (
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("grad_clip", self.grad_clip, self.grad_clip >= 0, ">= 0 (0: no clipping)"),
            ("amp", self.amp, self.amp in ("auto", "bf16", "none"), "'auto', 'bf16' or 'none'"),
            ("data_device", self.data_device, self.data_device in ("auto", "cpu"), "'auto' or 'cpu'"),
        ):
            if not ok:
                raise ValueError(f"TrainConfig: {name} must be {allowed}, got {v!r}")
        for stage in self.curriculum:
            if len(stage) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in stage):
                raise ValueError(
                    f"TrainConfig: curriculum stages are (from_step, seq_len, num_pairs) ints >= 0, got {stage!r}"
                )

    def stage(self, step: int) -> tuple[int, int | None]:
        """(seq_len, num_pairs or None) of the optimiser step ``step`` (0-based) under the curriculum."""
        seq_len, pairs = self.seq_len, None
        for start, T, n in sorted(self.curriculum):
            if step >= start:
                seq_len, pairs = T, (n or None)
        return seq_len, pairs


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of the 0-based optimiser step: linear warm-up, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TokenFileData:
    """Random windows of a flat binary file of token ids (uint16 or int32, e.g. written by
    ``array.tofile``): inputs are ``seq_len`` tokens, targets the same shifted by one. The last
    ``eval_fraction`` of the file is held out for evaluation.

    ``data.batch(batch_size, seq_len, seed=, step=, rank=)`` -> inputs, targets: [B, T] int64.
    """

    def __init__(self, path: str | os.PathLike, *, dtype: str = "uint16", eval_fraction: float = 0.01):
        dtypes = {"uint16": torch.uint16, "int32": torch.int32}
        if dtype not in dtypes:
            raise ValueError(f"TokenFileData: dtype must be 'uint16' or 'int32', got {dtype!r}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TokenFileData: no file {str(path)!r}")
        size = dtypes[dtype].itemsize
        n = path.stat().st_size // size
        self.tokens = torch.from_file(str(path), shared=False, size=n, dtype=dtypes[dtype])
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"TokenFileData: eval_fraction must be in [0, 1), got {eval_fraction!r}")
        self.split = n - int(n * eval_fraction)
        self.path = path
        # the largest id, read in pieces (a whole-file int32 copy could be large; uint16 has no max kernel)
        step = 1 << 24
        self.vocab_size = 1 + max((int(self.tokens[i : i + step].int().max()) for i in range(0, n, step)), default=-1)

    def batch(
        self,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        step: int,
        rank: int = 0,
        num_pairs: int | None = None,
        evaluation: bool = False,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        lo, hi = (self.split, len(self.tokens)) if evaluation else (0, self.split)
        if hi - lo < seq_len + 1:
            part = "held-out" if evaluation else "training"
            raise ValueError(
                f"TokenFileData: the {part} part of {str(self.path)!r} has {hi - lo} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}"
            )
        g = batch_generator(seed, step, rank)
        start = torch.randint(lo, hi - seq_len, (batch_size,), generator=g)
        idx = start[:, None] + torch.arange(seq_len + 1)
        w = self.tokens[idx].to(torch.int64)  # [B, T + 1]
        return w[:, :-1].to(device), w[:, 1:].to(device)


class _CheckpointedBlock(Block):
    """A Block whose forward is recomputed in the backward (activation checkpointing); its parameters and
    state-dict keys are the Block's (the instance's class is swapped, as fully_shard does)."""

    def forward(self, x, state=None, *, attention_mask=None):
        if state is not None or not torch.is_grad_enabled():
            return super().forward(x, state, attention_mask=attention_mask)
        return checkpoint(super().forward, x, None, attention_mask=attention_mask, use_reentrant=False)


@contextlib.contextmanager
def _single_process_ok():
    """torch.distributed.checkpoint warns that it assumes one process when none is initialised: that is
    intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.dim() < 2 or "embed" in name or ".router." in name
        (rest if plain else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]


class _Drawn:
    """The batch of a step drawn when asked for (``_Prefetch``'s interface)."""

    def __init__(self, make: Callable[[int], Any]):
        self.get = make


class _Prefetch:
    """Draws the batches of the coming steps on a background thread (data generation runs on the CPU while
    the device computes; torch releases the GIL in its kernels)."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2):
        self._make, self._next, self._stop = make, start, stop
        self._ready: dict[int, Any] = {}
        self._cv = threading.Condition()
        self._depth = depth
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = self._next
        while step < self._stop:
            with self._cv:
                while len(self._ready) >= self._depth:
                    self._cv.wait()
            try:
                item = self._make(step)
            except BaseException as e:  # handed to the consumer, which raises it
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._ready[step] = item
                self._cv.notify_all()
            step += 1

    def get(self, step: int) -> Any:
        with self._cv:
            while step not in self._ready and self._error is None:
                self._cv.wait()
            if step not in self._ready:
                raise self._error
            item = self._ready.pop(step)
            self._cv.notify_all()
            return item


class Trainer:
    """Trains a HybridLM on a data source with ``batch(batch_size, seq_len, *, seed, step, rank, num_pairs,
    device)`` (RecallTask, TokenFileData).

        trainer = Trainer(model, data, TrainConfig(steps=1000, batch_size=64, seq_len=1024), device="cuda")
        history = trainer.fit()            # list of dicts, one per logged step

    Under torchrun (torch.distributed initialised) each block, then the model, is sharded with FSDP2
    (``fully_shard``); each rank draws its own part of every global batch, and the loss is the mean over
    the global batch's targets. One process runs the model as it is. With an eviction_swa layer that has a
    learned router, a SparsityController adds its penalty and adapts its lambdas after every step (its
    statistics are all-reduced, so every rank holds the same lambdas). ``save(dir)`` / ``load(dir)``
    write and read torch.distributed.checkpoint checkpoints (model, optimiser, controller, step, seed):
    a run resumed on the same world size repeats the steps it would have run, bit for bit where the kernels
    are deterministic (the CPU references are: tests/training/test_trainer.py checks it).
    """

    def __init__(
        self,
        model: HybridLM,
        data: Any,
        cfg: TrainConfig,
        *,
        device: torch.device | str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if not isinstance(model, HybridLM):
            raise TypeError(f"Trainer: model must be a HybridLM, got {type(model).__name__}")
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"Trainer: cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.data = data
        self.rank = dist.get_rank() if _is_dist() else 0
        self.world = dist.get_world_size() if _is_dist() else 1
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        shards = cfg.data_shards or self.world
        if shards % self.world or cfg.batch_size % shards:
            raise ValueError(
                f"Trainer: batch_size ({cfg.batch_size}) must split into data_shards ({shards}) pieces, and "
                f"data_shards into the world size ({self.world})"
            )
        self.shards = shards
        self._log = log if log is not None else (lambda s: print(s, flush=True))
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        # A data source that can draw on the GPU (RecallTask) does so there: on the CPU its [B, T] operations run
        # in the intra-op thread pool, and in a container whose CPU quota is below the cores it sees, a batch
        # took 3 s against a 17 ms training step.
        self._draw_on_device = (
            cfg.data_device == "auto" and self.device.type == "cuda" and getattr(data, "draws_on_device", False)
        )

        model.to(self.device)
        for block in model.stack.layers:
            if cfg.activation_checkpointing and type(block) is Block:
                block.__class__ = _CheckpointedBlock
            if cfg.compile:
                block.compile(backend="inductor" if cfg.compile is True else cfg.compile)
        if self.world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in model.stack.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        self.model = model
        self.opt = torch.optim.AdamW(
            _param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=self.device.type == "cuda"
        )
        routers = [m for m in model.modules() if isinstance(m, EvictionSWA) and m.router is not None]
        self.controller = SparsityController(model, **cfg.controller) if routers else None
        self.step = 0
        self.steps_run = 0  # steps done by the last fit()
        self.history: list[dict] = []

    # -- one step ----------------------------------------------------------------------------------
    def _local_batch(self, step: int, seq_len: int, num_pairs: int | None, *, evaluation: bool = False):
        per = self.cfg.batch_size // self.shards
        mine = range(self.rank * self.shards // self.world, (self.rank + 1) * self.shards // self.world)
        seed = self.cfg.seed + (EVAL_SEED_OFFSET if evaluation else 0)
        kw = {"evaluation": True} if evaluation and isinstance(self.data, TokenFileData) else {}
        if self._draw_on_device:
            kw["device"] = self.device
        parts = [self.data.batch(per, seq_len, seed=seed, step=step, rank=j, num_pairs=num_pairs, **kw) for j in mine]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _sum_all(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def train_step(self, batch: tuple[Tensor, Tensor] | None = None, *, sync: bool = True) -> dict:
        """One optimiser step; returns its statistics (loss and accuracy over the global batch, lr, tokens,
        gradient norm, the controller's retained counts and lambdas). ``sync=False`` leaves loss and accuracy
        as device tensors and skips the rest, so that the host does not wait for the device."""
        cfg = self.cfg
        step = self.step
        seq_len, pairs = cfg.stage(step)
        if batch is None:
            batch = self._local_batch(step, seq_len, pairs)
        inputs, targets = (t.to(self.device, non_blocking=True) for t in batch)
        # Dropout draws from a stream fixed by (seed, step, rank): a resumed run repeats it.
        torch.manual_seed(batch_generator(cfg.seed, step, self.rank).initial_seed())
        lr = lr_at(step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        with self._autocast():
            logits, _ = self.model(inputs)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        count = self._sum_all((targets >= 0).sum().to(torch.float64))  # targets in the global batch
        # FSDP averages gradients over ranks: scaling by the world size makes them those of the global mean.
        loss = ce * (self.world / count.clamp(min=1).to(ce.dtype))
        penalty = self.controller.penalty() if self.controller is not None else None
        (loss + penalty if penalty is not None else loss).backward()
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        stats = {"step": step + 1, "lr": lr, "seq_len": seq_len, "tokens": cfg.batch_size * seq_len}
        with torch.no_grad():
            hit = ((logits.argmax(-1) == targets) & (targets >= 0)).sum().to(torch.float64)
            ce_all = self._sum_all(torch.stack([ce.detach().to(torch.float64), hit]))
        stats["loss"] = ce_all[0] / count.clamp(min=1)
        stats["acc"] = ce_all[1] / count.clamp(min=1)
        c = self.controller.step() if self.controller is not None else None
        self.step += 1
        if not sync:
            return stats
        stats["loss"], stats["acc"] = stats["loss"].item(), stats["acc"].item()
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if c is not None:
            stats["penalty"] = float(penalty.detach())
            stats["retained"] = c["retained"].tolist()
            stats["lambda"] = c["lambda"].tolist()
            stats["band"] = [list(b) for b in c["band"]]
        return stats

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, seq_len: int | None = None, *, batches: int | None = None) -> dict:
        """Loss and accuracy (argmax at the targets) on held-out batches, in eval mode, over all ranks."""
        seq_len = seq_len or self.cfg.stage(self.step)[0]
        pairs = self.cfg.stage(self.step)[1]
        self.model.eval()
        tot = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i in range(batches or self.cfg.eval_batches):
            inputs, targets = (t.to(self.device) for t in self._local_batch(i, seq_len, pairs, evaluation=True))
            with self._autocast():
                logits, _ = self.model(inputs)
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            hit = ((logits.argmax(-1) == targets) & (targets >= 0)).sum()
            tot += torch.stack([ce.double(), hit.double(), (targets >= 0).sum().double()])
        tot = self._sum_all(tot)
        self.model.train()
        n = tot[2].clamp(min=1)
        return {"eval_loss": (tot[0] / n).item(), "eval_acc": (tot[1] / n).item(), "eval_seq_len": seq_len}

    # -- checkpoints -----------------------------------------------------------------------------------
    def _extra(self) -> dict:
        ctrl = self.controller.state_dict() if self.controller is not None else None
        return {"step": self.step, "seed": self.cfg.seed, "world_size": self.world, "controller": ctrl}

    def save(self, path: str | os.PathLike) -> None:
        """A torch.distributed.checkpoint directory: model and optimiser (sharded as they are), and one
        ``trainer`` object (step, seed, world size, controller state), the same on every rank."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        buf = io.BytesIO()
        torch.save(self._extra(), buf)
        buf.seek(0)
        with _single_process_ok():
            dcp.save({"model": msd, "optim": osd, "trainer": buf}, checkpoint_id=str(path))
        if self.rank == 0:
            with open(Path(path) / "train_config.json", "w") as f:
                json.dump(_config_json(self.model, self.cfg), f, indent=1)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by ``save`` (same model and world size)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        sd = {"model": msd, "optim": osd, "trainer": io.BytesIO()}
        with _single_process_ok():
            dcp.load(sd, checkpoint_id=str(path))
        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        extra = sd["trainer"]
        if isinstance(extra, io.BytesIO):
            extra.seek(0)
            extra = torch.load(extra, weights_only=True)
        if extra["world_size"] != self.world:
            raise ValueError(
                f"Trainer.load: {str(path)!r} was saved by {extra['world_size']} ranks, this run has {self.world}; "
                "a bit-exact resume needs the same world size"
            )
        if extra["seed"] != self.cfg.seed:
            raise ValueError(
                f"Trainer.load: {str(path)!r} was saved with seed {extra['seed']}, this run has {self.cfg.seed}"
            )
        if (extra["controller"] is None) != (self.controller is None):
            raise ValueError("Trainer.load: the checkpoint and this model disagree on having a sparsity controller")
        if self.controller is not None:
            self.controller.load_state_dict(extra["controller"])
        self.step = extra["step"]

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self, steps: int | None = None) -> list[dict]:
        """Train up to ``steps`` (default: cfg.steps), logging, evaluating and saving as configured."""
        cfg = self.cfg
        stop = cfg.steps if steps is None else steps
        start = self.step
        self.steps_run = 0
        draw = lambda s: self._local_batch(s, *cfg.stage(s))  # noqa: E731
        if self.device.type == "cuda" and not self._draw_on_device:
            # pinned: the step's non-blocking copy to the device then neither waits for the device nor blocks
            cpu_draw = draw
            draw = lambda s: tuple(t.pin_memory() for t in cpu_draw(s))  # noqa: E731
        # Drawn on the GPU: the draw is a few hundred launches, queued ahead of the step's.
        prefetch = _Drawn(draw) if self._draw_on_device else _Prefetch(draw, start, stop)
        t_last, tokens = time.perf_counter(), 0
        pending: list[dict] = []  # recorded, unlogged steps: loss and accuracy still on the device

        def flush() -> None:
            for p in pending:
                p["loss"], p["acc"] = float(p["loss"]), float(p["acc"])
            self.history.extend(pending)
            pending.clear()

        while self.step < stop:
            s = self.step + 1  # the step about to run, counted from 1
            last = s == stop
            evaluate = bool(cfg.eval_every) and (s % cfg.eval_every == 0 or last)
            log = bool(cfg.log_every) and (s % cfg.log_every == 0 or last or s == start + 1) or evaluate
            stats = self.train_step(prefetch.get(self.step), sync=log)
            tokens += stats["tokens"]
            self.steps_run += 1
            if not log and cfg.record_every and s % cfg.record_every == 0:
                pending.append(stats)
            if log:
                flush()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                stats["tokens_per_s"] = tokens / max(now - t_last, 1e-9)
                t_last, tokens = now, 0
                if evaluate:
                    stats.update(self.evaluate())
                    t_last = time.perf_counter()  # evaluation time is not training throughput
                self.history.append(stats)
                if self.rank == 0:
                    self._log(format_progress(stats, cfg.steps))
            if cfg.checkpoint_dir is not None and ((cfg.checkpoint_every and s % cfg.checkpoint_every == 0) or last):
                self.save(Path(cfg.checkpoint_dir) / f"step-{s:07d}")
                t_last = time.perf_counter()
        flush()
        return self.history


def format_progress(stats: dict, total: int) -> str:
    """One progress line: step, loss, accuracy, lr, tokens/s, and per eviction layer the retained count."""
    line = (
        f"step {stats['step']:>6}/{total}  loss {stats['loss']:.4f}  acc {stats['acc']:.3f}  "
        f"lr {stats['lr']:.2e}  T {stats['seq_len']}  {stats.get('tokens_per_s', 0):,.0f} tok/s"
    )
    if "grad_norm" in stats:
        line += f"  |g| {stats['grad_norm']:.2f}"
    if "eval_loss" in stats:
        line += f"  eval loss {stats['eval_loss']:.4f} acc {stats['eval_acc']:.3f}"
    if "retained" in stats:
        kept = " ".join(
            f"{sum(r) / len(r):.0f}[{b[0]:.0f}-{b[1]:.0f}]"
            for r, b in zip(stats["retained"], stats["band"], strict=True)
        )
        lam = " ".join(f"{max(lam):.1e}" for lam in stats["lambda"])
        line += f"  retained {kept}  lambda {lam}"
    return line


def _config_json(model: HybridLM, cfg: TrainConfig) -> dict:
    out = {"train": dataclasses.asdict(cfg)}
    if model.config is not None:
        out["model"] = model.config.to_dict()
    return out


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``step-NNNNNNN`` directory with the highest step under ``directory`` (None when there is none)."""
    d = Path(directory)
    steps = sorted(p for p in d.glob("step-*") if p.is_dir() and (p / ".metadata").exists()) if d.is_dir() else []
    return steps[-1] if steps else None


# --------------------------------------------------------------------------------------------------
# command line: python -m mixerzoo train
# --------------------------------------------------------------------------------------------------


def _parse_defaults(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _parse_curriculum(text: str | None) -> tuple[tuple[int, int, int], ...]:
    """``"0:256:8,300:1024:32"`` -> ((0, 256, 8), (300, 1024, 32)): from step, seq_len, num_pairs."""
    if not text:
        return ()
    stages = []
    for part in text.split(","):
        bits = part.split(":")
        if len(bits) != 3 or not all(b.strip().isdigit() for b in bits):
            raise ValueError(f"--curriculum takes STEP:SEQ_LEN:PAIRS[,...], got {part!r}")
        stages.append(tuple(int(b) for b in bits))
    return tuple(stages)


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``recall`` to the ``mixerzoo`` command's subcommands."""
    from .recall import add_recall_parser

    p = sub.add_parser(
        "train",
        help="train a HybridLM on recall data or a token file (one process, or FSDP2 under torchrun)",
        description="Train a HybridLM. Under `torchrun --nproc_per_node N -m mixerzoo train ...` the model is "
        "sharded with FSDP2 and every rank draws its part of each global batch.",
    )
    p.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="model preset (flags below replace its settings)"
    )
    p.add_argument("--pattern", default=None, help="hybrid pattern, e.g. '(gdn eviction_swa)*2'")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: the preset's, or 128)")
    p.add_argument("--heads", type=int, default=None, help="heads (default: the preset's, or 2)")
    p.add_argument("--mlp-ratio", type=float, default=None, help="SwiGLU width ratio (default: the preset's, or 4)")
    p.add_argument(
        "--vocab", type=int, default=None, help="vocabulary (default: the preset's, the task's, or the file's)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a stack-wide mixer default")
    p.add_argument("--data", default="mqar", help="'mqar', 'mqar_uniform', 'needle', or a path to a .bin token file")
    p.add_argument("--token-dtype", default="uint16", choices=["uint16", "int32"], help="dtype of a token file")
    p.add_argument("--pairs", type=int, default=32, help="key-value pairs per recall sequence (default 32)")
    p.add_argument("--power", type=float, default=1.0, help="power law of the recall distances (default 1)")
    p.add_argument(
        "--noise-vocab", type=int, default=0, help="filler drawn from the last N tokens (default 0: token 0)"
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32, help="global batch, sequences per step over all ranks")
    p.add_argument("--T", "--seq-len", dest="seq_len", type=int, default=256, help="sequence length")
    p.add_argument("--curriculum", default=None, help="STEP:SEQ_LEN:PAIRS[,...]: stages of a recall task")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-shards", type=int, default=None, help="draw the global batch in N pieces (default: ranks)")
    p.add_argument(
        "--data-device",
        choices=("auto", "cpu"),
        default="auto",
        help="auto: recall data drawn on the GPU in a CUDA run; cpu: on a CPU thread (default auto)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"])
    p.add_argument("--compile", default="off", help="compile each block: off, inductor, or another backend")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--record-every",
        type=int,
        default=0,
        help="also keep the loss of every N steps in the history (--json) without waiting for the device (default 0)",
    )
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--json", default=None, help="write the logged steps (and the final evaluation) to this file")
    p.set_defaults(func=main_train)
    add_recall_parser(sub)


def build_model(args: argparse.Namespace, vocab_size: int) -> HybridLM:
    """The HybridLM the ``train`` flags describe."""
    if args.preset:
        cfg = HybridLMConfig.from_preset(args.preset)
    else:
        cfg = HybridLMConfig(args.pattern or "(gdn swa)*2", vocab_size=vocab_size, hidden_size=128, num_heads=2)
    changes = {
        k: v
        for k, v in (
            ("pattern", args.pattern),
            ("hidden_size", args.hidden),
            ("num_heads", args.heads),
            ("mlp_ratio", args.mlp_ratio),
            ("vocab_size", args.vocab or (None if args.preset else vocab_size)),
        )
        if v is not None
    }
    defaults = {**cfg.mixer_defaults, **_parse_defaults(args.set)}
    return HybridLM.from_config(cfg.replace(**changes, mixer_defaults=defaults))


def setup_distributed(device: str | None) -> torch.device:
    """Initialise torch.distributed when launched by torchrun (NCCL on CUDA, gloo on the CPU) and return
    this rank's device."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ and not _is_dist():
        local = int(os.environ["LOCAL_RANK"])
        if want == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want == "cuda" else "gloo")
    if want == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(want)


def main_train(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        recall = args.data in ("mqar", "mqar_uniform", "needle")
        data: Any = None if recall else TokenFileData(args.data, dtype=args.token_dtype)
        vocab = args.vocab or (4096 if recall else data.vocab_size)
        compile_: bool | str = {"off": False, "inductor": True}.get(args.compile, args.compile)
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch,
            seq_len=args.seq_len,
            lr=args.lr,
            min_lr_ratio=args.min_lr_ratio,
            warmup=args.warmup,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            seed=args.seed,
            data_shards=args.data_shards,
            data_device=args.data_device,
            amp=args.amp,
            compile=compile_,
            activation_checkpointing=args.activation_checkpointing,
            log_every=args.log_every,
            record_every=args.record_every,
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            curriculum=_parse_curriculum(args.curriculum),
        )
        device = setup_distributed(args.device)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        model = build_model(args, vocab)  # a preset keeps its vocabulary unless --vocab is given
        if recall:
            data = RecallTask(args.data, args.pairs, model.vocab_size, power=args.power, noise_vocab=args.noise_vocab)
        elif data.vocab_size > model.vocab_size:
            raise ValueError(
                f"{args.data} holds token ids up to {data.vocab_size - 1}, the model's vocabulary is "
                f"{model.vocab_size}; pass --vocab {data.vocab_size} or more"
            )
        for seq_len, pairs in {cfg.stage(s) for s in [0, *(c[0] for c in cfg.curriculum)]}:
            data.batch(1, seq_len, seed=0, step=0, num_pairs=pairs)  # the task fits every stage's length
        trainer = Trainer(model, data, cfg, device=device)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"train: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters()) * trainer.world  # sharded: each rank holds 1/world
    if trainer.rank == 0:
        print(
            f"mixerzoo train: {model.config.pattern!r}, hidden {model.config.hidden_size}, "
            f"{n_params / 1e6:.2f}M params, {trainer.world} rank(s) on {device.type}, global batch {cfg.batch_size} x "
            f"{cfg.seq_len}, {cfg.steps} steps, lr {cfg.lr}, amp {'bf16' if trainer.amp else 'off'}, "
            f"compile {cfg.compile or 'off'}, controller {'on' if trainer.controller else 'off'}",
            flush=True,
        )
    if args.resume:
        if cfg.checkpoint_dir is None:
            print("train: --resume needs --checkpoint-dir", file=sys.stderr)
            return 2
        last = latest_checkpoint(cfg.checkpoint_dir)
        if last is not None:
            trainer.load(last)
            if trainer.rank == 0:
                print(f"resumed from {last} at step {trainer.step}", flush=True)
    t0 = time.perf_counter()
    history = trainer.fit()
    elapsed = time.perf_counter() - t0
    final = trainer.evaluate()
    if trainer.rank == 0:
        run_tokens = sum(cfg.batch_size * cfg.stage(s)[0] for s in range(cfg.steps - trainer.steps_run, cfg.steps))
        print(
            f"done: {trainer.step} steps, final eval loss {final['eval_loss']:.4f} acc {final['eval_acc']:.3f}, "
            f"{elapsed:.1f}s, {run_tokens / elapsed:,.0f} tok/s over the run (first steps and compiles included)",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": _config_json(model, cfg), "history": history, "final": final}, f, indent=1)
    if _is_dist():
        dist.barrier()  # every rank done with its collectives before any closes its connections
        dist.destroy_process_group()
    return 0
