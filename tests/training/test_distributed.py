"""Two CPU processes (torchrun, gloo) train with FSDP2 (``fully_shard`` runs on the CPU over gloo in this
torch, so no DDP stand-in is needed) and match one process over the same global batches; the sparsity
controller's lambdas are identical on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_ranks_match_one_process(tmp_path):
    _run(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path)],
        tmp_path,
    )
    _run([str(WORKER), str(tmp_path), "2"], tmp_path)  # one process drawing the same two shards per step
    r0, r1, one = (
        json.loads((tmp_path / f).read_text()) for f in ("rank0-of-2.json", "rank1-of-2.json", "rank0-of-1.json")
    )

    # Every rank reports the loss of the global batch and holds the same controller state.
    assert r0["loss"] == r1["loss"]
    assert r0["lambda"] == r1["lambda"], "the ranks' lambdas differ"
    assert r0["retained"] == r1["retained"]
    lam = [max(max(h) for h in step) for step in r0["lambda"]]
    assert lam[-1] > lam[0], f"the lambdas never moved ({lam}): the check above would hold trivially"

    # Sharded training follows the single-process run on the same global batches (summation order aside).
    for step, (a, b) in enumerate(zip(r0["loss"], one["loss"], strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step + 1}: loss {a} with 2 ranks, {b} with one process"
    for step, (a, b) in enumerate(zip(r0["lambda"], one["lambda"], strict=True)):
        for x, y in zip(sum(a, []), sum(b, []), strict=True):
            assert abs(x - y) <= 1e-5 * abs(y), f"step {step + 1}: lambda {x} with 2 ranks, {y} with one process"
    assert one["loss"][-1] < one["loss"][0], "the loss did not fall: the comparison would say little"
