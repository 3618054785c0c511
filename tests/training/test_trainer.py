"""The trainer on the CPU: a tiny recall run learns, checkpoints resume bit for bit, activation
checkpointing changes nothing, the schedule, the ``train`` command, and refusals of bad settings."""

import dataclasses
import json
import math
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixerzoo.cli import main
from mixerzoo.models import HybridLM
from mixerzoo.training import RecallTask, TrainConfig, Trainer, lr_at

EVICT = "swa[window_size=4] eviction_swa[window_size=8,capacity=6,num_sinks=2]"


def _model(pattern: str, vocab: int = 32, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(vocab, pattern, hidden_size=32, num_heads=2, mlp_ratio=2.0)


@pytest.mark.slow  # 80 training steps (2.4 s); the default run checks the steps themselves (resume, recorded losses)
def test_tiny_recall_run_learns():
    """A 2-layer stack with attention (a 4-token window to pair each value with its key, then full
    attention) learns power-law MQAR far above chance in 80 steps (0.68 when written)."""
    task = RecallTask("mqar", num_pairs=3, vocab_size=32)  # 15 keys and values: chance 1/15
    cfg = TrainConfig(steps=80, batch_size=16, seq_len=48, lr=3e-3, warmup=10, log_every=0)
    trainer = Trainer(_model("swa[window_size=4] full_attention"), task, cfg, device="cpu")
    trainer.fit()
    acc = trainer.evaluate(batches=8)["eval_acc"]
    assert acc > 0.4, f"recall accuracy {acc:.3f} after 80 steps; chance is {1 / 15:.3f}"


@pytest.mark.slow  # the full run only: the conformance autocast check covers each mixer in the fast run
def test_bf16_autocast_steps_with_every_mixer():
    """The Trainer's default on CUDA, bf16 autocast, here on the CPU: a stack of every mixer takes finite steps and
    the loss falls (a gdn layer once refused the bfloat16 activations its conv met there)."""
    task = RecallTask("mqar", num_pairs=3, vocab_size=32)
    cfg = TrainConfig(steps=12, batch_size=8, seq_len=48, lr=3e-3, warmup=2, log_every=0, amp="bf16")
    pattern = "gdn swa_sink[window_size=4] eviction_swa[window_size=8,capacity=6] nsa[block_size=16] full_attention"
    trainer = Trainer(_model(pattern), task, cfg, device="cpu")
    assert trainer.amp
    losses = [float(trainer.train_step()["loss"]) for _ in range(12)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert min(losses[-3:]) < losses[0], losses


# aten operations that read a tensor's value back to the host (on CUDA, a synchronisation): a scalar's value, and
# ops whose output shape depends on the data
_HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_")


class _HostReads(TorchDispatchMode):
    """Records where host reads happen, except in torch.optim: the optimiser's step counters live on the CPU
    on every device (AdamW's default), so reading them makes no CUDA device wait."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(_HOST_READS):
            stack = traceback.extract_stack()
            if not any("/torch/optim/" in f.filename for f in stack):
                self.where.append(f"{func} at " + " <- ".join(f"{f.name}:{f.lineno}" for f in stack[-4:-1][::-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rule", ["budget", "paper"])
def test_unlogged_step_never_waits_for_the_device(rule):
    """``train_step(sync=False)`` of a model with an eviction router, its controller included, issues no
    operation that reads a tensor's value back to the host: a CUDA host can then queue step after step. (The
    controller once read its band and counts back every step, so every step waited for the one before.)"""
    task = RecallTask("mqar", num_pairs=3, vocab_size=32)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=40, lr=3e-3, warmup=2, log_every=0)
    cfg = dataclasses.replace(cfg, controller={"rule": rule, "update_every": 2})
    trainer = Trainer(_model(EVICT), task, cfg, device="cpu")
    batches = [trainer._local_batch(s, *cfg.stage(s)) for s in range(4)]
    trainer.train_step(batches[0], sync=False)  # the first step's set-up (EMAs start) is not the steady state
    with _HostReads() as reads:
        for b in batches[1:]:  # an adapting step and two others
            trainer.train_step(b, sync=False)
    assert not reads.where, "host reads in unlogged steps:\n" + "\n".join(reads.where[:10])
    assert trainer.train_step(batches[0])["lambda"], "a logged step still reports the controller"


def test_recorded_steps_give_the_logged_run_s_loss_curve():
    """record_every=1 with a progress line every 4 steps keeps every step's loss in the history, read back at the
    logged steps: the same curve as logging every step, with tokens/s only on the logged steps."""
    task = RecallTask("mqar", num_pairs=3, vocab_size=32)
    runs = []
    for log_every, record_every in ((1, 0), (4, 1)):
        cfg = TrainConfig(steps=6, batch_size=4, seq_len=40, lr=3e-3, warmup=2, log_every=log_every, seed=3)
        cfg = dataclasses.replace(cfg, record_every=record_every)
        runs.append(Trainer(_model(EVICT), task, cfg, device="cpu").fit())
    every, recorded = runs
    assert [h["step"] for h in recorded] == [1, 2, 3, 4, 5, 6] == [h["step"] for h in every]
    assert [h["loss"] for h in recorded] == [h["loss"] for h in every]
    assert all(isinstance(h["loss"], float) and isinstance(h["acc"], float) for h in recorded)
    assert [h["step"] for h in recorded if "tokens_per_s" in h] == [1, 4, 6]
    with pytest.raises(ValueError, match="record_every"):
        TrainConfig(record_every=-1)


def test_checkpoint_resume_is_bit_exact(tmp_path):
    """Save after 3 steps, run a 4th; a fresh model loading the checkpoint runs the same 4th step: the same
    loss, parameters and controller lambdas, bit for bit (router dropout included)."""
    task = RecallTask("mqar", num_pairs=3, vocab_size=32)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=40, lr=3e-3, warmup=2, log_every=0, seed=7)
    a = Trainer(_model(EVICT), task, cfg, device="cpu")
    assert a.controller is not None, "an eviction_swa layer with a learned router brings the controller"
    a.fit(3)
    a.save(tmp_path / "ck")
    step_a = a.train_step()

    b = Trainer(_model(EVICT, seed=1), task, cfg, device="cpu")  # other initial weights
    b.load(tmp_path / "ck")
    assert b.step == 3
    step_b = b.train_step()
    assert step_a["loss"] == step_b["loss"] and step_a["lambda"] == step_b["lambda"]
    assert step_a["retained"] == step_b["retained"]
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs after the resumed step"
    for sa, sb in zip(a.opt.state.values(), b.opt.state.values(), strict=True):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])

    c = Trainer(_model(EVICT), task, TrainConfig(steps=6, batch_size=4, seq_len=40, seed=8), device="cpu")
    with pytest.raises(ValueError, match=r"Trainer.load: .* was saved with seed 7, this run has 8"):
        c.load(tmp_path / "ck")


def test_activation_checkpointing_changes_nothing():
    task = RecallTask("mqar", num_pairs=3, vocab_size=32)
    cfg = dict(steps=2, batch_size=4, seq_len=40, warmup=1, log_every=0)
    plain = Trainer(_model(EVICT), task, TrainConfig(**cfg), device="cpu")
    ckpt = Trainer(_model(EVICT), task, TrainConfig(**cfg, activation_checkpointing=True), device="cpu")
    assert type(ckpt.model.stack.layers[0]).__name__ == "_CheckpointedBlock"
    assert ckpt.model.state_dict().keys() == plain.model.state_dict().keys()
    for _ in range(2):
        s1, s2 = plain.train_step(), ckpt.train_step()
        assert abs(s1["loss"] - s2["loss"]) <= 1e-6 * s1["loss"]
    for p, q in zip(plain.model.parameters(), ckpt.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lr_schedule():
    cfg = TrainConfig(steps=110, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_train_command(tmp_path, capsys):
    out = tmp_path / "run.json"
    ck = tmp_path / "ck"
    args = ["train", "--pattern", "swa[window_size=4] full_attention", "--hidden", "32", "--vocab", "32"]
    args += ["--pairs", "3", "--T", "40", "--batch", "4", "--steps", "4", "--warmup", "1", "--log-every", "2"]
    args += ["--device", "cpu", "--checkpoint-dir", str(ck), "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "step      4/4" in text and "tok/s" in text and "final eval loss" in text
    record = json.loads(out.read_text())
    assert [h["step"] for h in record["history"]] == [1, 2, 4]
    assert (ck / "step-0000004" / "train_config.json").exists()
    # --resume finds the checkpoint at the last step: nothing is left to train
    assert main([*args, "--resume", "--steps", "4"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_bad_settings_are_refused(capsys):
    with pytest.raises(ValueError, match=r"TrainConfig: lr must be > 0, got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match=r"TrainConfig: steps must be an int >= 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"TrainConfig: data_device must be 'auto' or 'cpu', got 'gpu'"):
        TrainConfig(data_device="gpu")
    with pytest.raises(ValueError, match=r"batch_size \(6\) must split into data_shards \(4\)"):
        Trainer(_model("swa[window_size=4]"), RecallTask(), TrainConfig(batch_size=6, data_shards=4), device="cpu")
    assert main(["train", "--pattern", "nope*2", "--device", "cpu", "--steps", "1"]) == 2
    assert "train: " in capsys.readouterr().err


@pytest.mark.slow  # trains three tiny stacks end to end (the fast run keeps test_tiny_recall_run_learns)
def test_recall_command(tmp_path, capsys):
    args = ["recall", "--patterns", "swa[window_size=4] full_attention; swa[window_size=4]*2", "--T", "64"]
    args += ["--pairs", "3", "--vocab", "32", "--hidden", "32", "--window", "8", "--capacity", "8", "--batch", "8"]
    args += ["--steps", "3", "--eval-batches", "1", "--eval-batch", "4", "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "acc T=256 (12 pairs)" in out and "KV bytes/layer" in out
    record = json.loads((tmp_path / "recall-cpu.json").read_text())
    full, swa = record["rows"]
    assert list(full["accuracy"]) == ["64", "128", "256"]
    assert full["pairs"] == {"64": 3, "128": 6, "256": 12}, "evaluation asks k times the pairs at k times T"
    # a cache that holds 4T tokens against a ring of 8
    assert full["kv_bytes_per_attention_layer"] > 16 * swa["kv_bytes_per_attention_layer"]
    assert main(["recall", "--patterns", "nope*2", "--device", "cpu"]) == 2
    assert main([*args[: args.index("--vocab") + 1], "16", *args[args.index("--vocab") + 2 :]]) == 2
    assert "(evaluation at 4T = 256 asks 12 pairs)" in capsys.readouterr().err
    # in parts: a run of another pattern with the same recipe keeps the earlier rows, in the experiment's order
    # (its patterns first, others after); another recipe replaces the file
    args[2] = "gdn*4"
    assert main(args) == 0
    assert "kept 2 pattern(s) of the earlier run" in capsys.readouterr().out
    merged = json.loads((tmp_path / "recall-cpu.json").read_text())
    assert [r["pattern"] for r in merged["rows"]] == ["gdn*4", full["pattern"], swa["pattern"]]
    assert merged["rows"][1:] == record["rows"]
    args[args.index("--steps") + 1] = "4"
    assert main(args) == 0
    assert "holds another recipe or device; it is replaced" in capsys.readouterr().out
    assert [r["pattern"] for r in json.loads((tmp_path / "recall-cpu.json").read_text())["rows"]] == ["gdn*4"]


def test_recall_run_stopped_part_way_keeps_the_patterns_it_finished(tmp_path, monkeypatch):
    """The results file is written as each pattern ends: a run stopped during its second pattern (a time limit,
    Ctrl-C) leaves the first pattern's row on disk."""
    from mixerzoo.training import recall as recall_mod

    real, calls = recall_mod.Trainer, []

    def trainer(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(recall_mod, "Trainer", trainer)
    args = ["recall", "--patterns", "swa[window_size=4]*2; gdn*2", "--T", "64", "--pairs", "3", "--vocab", "32"]
    args += ["--hidden", "32", "--window", "8", "--capacity", "8", "--batch", "8", "--steps", "2"]
    args += ["--eval-batches", "1", "--eval-batch", "4", "--device", "cpu", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    rows = json.loads((tmp_path / "recall-cpu.json").read_text())["rows"]
    assert [r["pattern"] for r in rows] == ["swa[window_size=4]*2"]


def test_recall_evaluation_through_the_state_matches_the_parallel_form():
    """A constant-memory stack is evaluated by reading the sequence through its state, a chunk at a time:
    the same predictions as its parallel eval forward."""
    from mixerzoo.training.recall import evaluate_recall

    torch.manual_seed(0)
    model = HybridLM(
        32,
        "swa[window_size=8] eviction_swa[window_size=8,capacity=6,num_sinks=2]",
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2.0,
    ).eval()
    task = RecallTask("mqar", num_pairs=3, vocab_size=32)
    kw = dict(batches=2, batch_size=4, seed=3, device=torch.device("cpu"), amp=False)
    streamed = evaluate_recall(model, task, 96, chunk=40, **kw)
    hits = total = 0
    with torch.no_grad():
        for i in range(2):
            x, y = task.batch(4, 96, seed=3, step=i)
            hits += ((model(x)[0].argmax(-1) == y) & (y >= 0)).sum().item()
            total += (y >= 0).sum().item()
    assert streamed == hits / total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("data_device", ["auto", "cpu"])
def test_cuda_run_draws_recall_batches_where_asked(data_device):
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=48, warmup=1, log_every=1, data_device=data_device)
    trainer = Trainer(_model("swa[window_size=4]*2"), RecallTask("mqar", 4, 32), cfg, device="cuda", log=print)
    assert trainer._draw_on_device == (data_device == "auto")
    inputs, _ = trainer._local_batch(0, 48, 4)
    assert inputs.device.type == ("cuda" if data_device == "auto" else "cpu")
    history = trainer.fit()
    assert len(history) >= 1 and all(math.isfinite(h["loss"]) for h in history)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", ["budget", "paper"])
def test_cuda_unlogged_steps_do_not_synchronise(rule):
    """On CUDA, under torch's sync debug mode set to raise: unlogged training steps of an eviction model (bf16
    autocast, the Triton kernels, the controller adapting) make the host wait for the device nowhere."""
    task = RecallTask("mqar", num_pairs=3, vocab_size=32)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=48, lr=3e-3, warmup=2, log_every=0)
    cfg = dataclasses.replace(cfg, controller={"rule": rule, "update_every": 2})
    trainer = Trainer(_model(EVICT), task, cfg, device="cuda")
    batches = [trainer._local_batch(s, *cfg.stage(s)) for s in range(4)]
    assert batches[0][0].is_cuda
    trainer.train_step(batches[0], sync=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            trainer.train_step(b, sync=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(trainer.train_step(batches[0])["loss"])


@pytest.mark.slow  # two child processes, each importing torch and training a tiny stack
def test_recall_jobs_give_the_rows_of_one_process(tmp_path, capsys):
    """--jobs 2 trains the patterns in processes of their own; the rows are those of the one-process run."""
    args = ["recall", "--patterns", "swa[window_size=4]*2; gdn*2", "--T", "64", "--pairs", "3", "--vocab", "32"]
    args += ["--hidden", "32", "--window", "8", "--capacity", "8", "--batch", "8", "--steps", "3"]
    args += ["--eval-batches", "1", "--eval-batch", "4", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    assert "recall: started gdn*2" in capsys.readouterr().out
    one, two = (json.loads((tmp_path / d / "recall-cpu.json").read_text()) for d in ("one", "two"))
    assert one["recipe"] == two["recipe"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]  # noqa: E731
    assert strip(two["rows"]) == strip(one["rows"]) and len(two["rows"]) == 2
    assert main([*args, "--jobs", "0"]) == 2
