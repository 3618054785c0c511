"""Training: the trainer (one CPU to several GPUs with FSDP2), the eviction_swa sparsity regulariser / lambda
controller, synthetic recall data, and the recall experiment."""

from .mqar import RecallTask, batch_generator, mqar_batch, needle_batch, recall_batch
from .recall import RecallRecipe, run_recall
from .sparsity import SparsityController
from .trainer import TokenFileData, TrainConfig, Trainer, lr_at

__all__ = [
    "RecallRecipe",
    "RecallTask",
    "SparsityController",
    "TokenFileData",
    "TrainConfig",
    "Trainer",
    "batch_generator",
    "lr_at",
    "mqar_batch",
    "needle_batch",
    "recall_batch",
    "run_recall",
]
