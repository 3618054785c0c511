"""Worker of tests/training/test_distributed.py: trains a tiny eviction_swa model for a few steps, alone or
as one rank under torchrun (FSDP2 over gloo), and writes this rank's losses and controller lambdas as JSON.

    python tests/training/dist_worker.py OUT_DIR [DATA_SHARDS]
    python -m torch.distributed.run --nproc_per_node 2 tests/training/dist_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from mixerzoo.models import HybridLM
from mixerzoo.training import RecallTask, TrainConfig, Trainer
from mixerzoo.training.trainer import setup_distributed

PATTERN = "swa[window_size=4] eviction_swa[window_size=8,capacity=6,num_sinks=2,dropout=0.0]"
STEPS = 8


def main() -> None:
    out = Path(sys.argv[1])
    shards = int(sys.argv[2]) if len(sys.argv) > 2 else None
    torch.set_num_threads(1)
    device = setup_distributed("cpu")
    torch.manual_seed(0)
    model = HybridLM(32, PATTERN, hidden_size=32, num_heads=2, mlp_ratio=2.0)
    cfg = TrainConfig(steps=STEPS, batch_size=8, seq_len=48, lr=3e-3, warmup=2, log_every=1, data_shards=shards)
    trainer = Trainer(model, RecallTask("mqar", 4, 32), cfg, device=device, log=lambda s: None)
    history = trainer.fit()
    record = {
        "world": trainer.world,
        "loss": [h["loss"] for h in history],
        "acc": [h["acc"] for h in history],
        "lambda": [h["lambda"] for h in history],
        "retained": [h["retained"] for h in history],
    }
    (out / f"rank{trainer.rank}-of-{trainer.world}.json").write_text(json.dumps(record))
    if trainer.world > 1:
        # both ranks past their last collective before either closes its connections: a rank that tore down
        # while its peer was still finishing had the peer's gloo threads abort it (once in CI, SIGABRT)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
