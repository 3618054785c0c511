"""Training helpers: the eviction_swa sparsity regulariser / lambda controller, synthetic recall data."""

from .mqar import mqar_batch
from .sparsity import SparsityController

__all__ = ["SparsityController", "mqar_batch"]
