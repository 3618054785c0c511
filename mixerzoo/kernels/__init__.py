"""Ops behind the mixers: Triton kernels on CUDA, plain-PyTorch references on CPU (torch.library custom ops)."""

__all__: list[str] = []
