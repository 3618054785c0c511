"""Two GPUs against one: the same training run of ``python -m mixerzoo train`` in one process and under
``torchrun --nproc_per_node 2`` (FSDP2, each rank half of every global batch), with the same seed and global
batches, compared step by step: the loss curves and the tokens/s.

    python benchmarks/fsdp2.py                 # (gdn eviction_swa)*2, hidden 1024, vocab 32000 (~100M params),
                                               # compiled blocks, 50 steps of 16 x 2048 tokens; needs 2 GPUs
    python benchmarks/fsdp2.py --smoke         # the same plumbing on the CPU (gloo), tiny sizes

The one-process run draws each global batch in the same two shards as the two ranks (``--data-shards 2``), so
both runs see the same tokens in every step. Reported: the largest relative loss difference over the steps (each
step's loss is recorded without making the host wait for the device), and the median tokens/s of the 10-step
windows after --skip (compiles, warm-up; steps queued back to back, the device synchronised only at the ends of a
window) for each run and their ratio. Rows op
``fsdp2`` (impls ``1 gpu``, ``2 gpus``) go to results/<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, refuse, require_gpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--pattern", "(gdn eviction_swa)*2", "--hidden", "32", "--heads", "2", "--vocab", "64", "--pairs", "4"]
SMOKE += ["--set", "window_size=8", "--set", "capacity=8", "--steps", "4", "--batch", "4", "--T", "64"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="fsdp2.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pattern", default="(gdn eviction_swa)*2")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences per step over both ranks)")
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--compile", default="inductor", help="compile each block: off, inductor, or a backend")
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the tokens/s (compiles)")
    ap.add_argument("--data-device", choices=("auto", "cpu"), default="auto", help="the train command's --data-device")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 CPU processes over gloo")
    args = ap.parse_args(argv)
    if args.batch % 2:
        refuse(f"fsdp2.py: --batch must be even (two ranks), got {args.batch}")
    if args.steps <= args.skip and not args.smoke:
        refuse(f"fsdp2.py: --steps ({args.steps}) must exceed --skip ({args.skip})")
    if args.smoke:
        args.pattern, args.batch, args.T, args.skip = SMOKE[1], 4, 64, 0
    return args


# every step's loss recorded without waiting for the device; a progress line, and so a tokens/s figure over the
# steps queued since the last one, every 10 steps
_LOGGING = ["--log-every", "10", "--record-every", "1"]


def _train_args(args, device: str) -> list[str]:
    if args.smoke:
        return [*SMOKE, "--device", device, *_LOGGING, "--data-shards", "2", "--seed", "0"]
    return [
        "--pattern", args.pattern, "--hidden", str(args.hidden), "--heads", str(args.heads), "--vocab",
        str(args.vocab), "--steps", str(args.steps), "--batch", str(args.batch), "--T", str(args.T),
        "--compile", args.compile, "--device", device, *_LOGGING, "--data-shards", "2", "--seed", "0",
        "--eval-batches", "1", "--data-device", args.data_device,
    ]  # fmt: skip


def _run(cmd: list[str], json_path: Path, env: dict) -> list[dict]:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run([*cmd, "--json", str(json_path)], cwd=ROOT, env=env, text=True, capture_output=True)
    print(done.stdout[-3000:], flush=True)
    if done.returncode != 0:
        print(done.stderr[-5000:], file=sys.stderr, flush=True)
        raise SystemExit(f"fsdp2.py: the run failed with exit status {done.returncode}")
    return json.loads(json_path.read_text())["history"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke:
        require_gpu("fsdp2.py", "(the default mode)", cpu="fsdp2.py --smoke")
        import torch

        if torch.cuda.device_count() < 2:
            refuse(f"fsdp2.py: needs 2 CUDA GPUs of one host, torch sees {torch.cuda.device_count()}")
    device = "cpu" if args.smoke else "cuda"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    train = [sys.executable, "-m", "mixerzoo", "train", *_train_args(args, device)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two += ["-m", "mixerzoo", "train", *_train_args(args, device)]
    with tempfile.TemporaryDirectory() as tmp:
        one_h = _run(
            train, Path(tmp) / "one.json", {**env, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0")}
        )
        two_h = _run(two, Path(tmp) / "two.json", env)
    if [h["step"] for h in one_h] != [h["step"] for h in two_h]:
        raise SystemExit("fsdp2.py: the two runs logged different steps")
    diffs = [abs(b["loss"] - a["loss"]) / max(abs(a["loss"]), 1e-12) for a, b in zip(one_h, two_h, strict=True)]
    skip = args.skip
    tps = [statistics.median(h["tokens_per_s"] for h in hist[skip:] if "tokens_per_s" in h) for hist in (one_h, two_h)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    print(f"loss: largest relative difference {diffs[worst]:.2e} at step {one_h[worst]['step']}", flush=True)
    print(f"tokens/s: 1 process {tps[0]:,.0f}, 2 processes {tps[1]:,.0f}: {tps[1] / tps[0]:.2f}x", flush=True)
    note = (
        f"{args.pattern}; python -m mixerzoo train (--data-device {args.data_device}), FSDP2 over 2 ranks vs one "
        f"process on the same global batches; loss max rel. diff {diffs[worst]:.1e} over {len(diffs)} steps; "
        f"median tokens/s of 10-step windows after step {skip}; 2 / 1: {tps[1] / tps[0]:.2f}x"
    )
    rows = [
        dict(op="fsdp2", impl=impl, B=args.batch, T=args.T, tokens_per_s=round(t), note=note)
        for impl, t in (("1 gpu", tps[0]), ("2 gpus", tps[1]))
    ]
    return finish("fsdp2", rows, args.smoke)


if __name__ == "__main__":
    raise SystemExit(main())
