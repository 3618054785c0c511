"""kernels/_ops.run_op: which of the three paths a call takes (the op, the autograd function, the forward body). The
decision reads only ``is_cuda``, ``requires_grad`` and the grad mode, so stand-ins for CUDA tensors check it on any
machine; the `op_paths` tests beside each op (`pytest tests/kernels -k op_paths`) check the real paths on a GPU."""

from types import SimpleNamespace

import torch

from mixerzoo.kernels._ops import records_grad, run_op


def _paths():
    calls = []

    class Function:
        @staticmethod
        def apply(*a):
            calls.append("function")
            return a

    def op(*a):
        calls.append("op")
        return a

    def body(*a):
        calls.append("body")
        return a

    return calls, op, Function, body


def test_run_op_paths():
    calls, op, function, body = _paths()
    cuda = SimpleNamespace(is_cuda=True, requires_grad=False)
    cuda_grad = SimpleNamespace(is_cuda=True, requires_grad=True)
    cpu_grad = torch.zeros(1, requires_grad=True)
    assert run_op(op, function, body, (cpu_grad, 3), (cpu_grad,)) == (cpu_grad, 3)  # CPU: the op, grad or not
    assert run_op(op, function, body, (cuda, 3), (cuda, None)) == (cuda, 3)  # no input records a gradient: body
    assert run_op(op, function, body, (cuda, 3), (cuda, cuda_grad)) == (cuda, 3)  # one does: the function
    with torch.no_grad():
        run_op(op, function, body, (cuda, 3), (cuda_grad,))  # grad mode off: the body
    assert calls == ["op", "body", "function", "body"]
    assert not records_grad(None, cuda) and records_grad(None, cuda_grad)
    with torch.no_grad():
        assert not records_grad(cuda_grad)


def test_run_op_without_gradients():
    # an op without gradients (function None, no grad_inputs): the body on CUDA whatever the grad mode, the op on
    # the CPU
    calls, op, _, body = _paths()
    cuda, cpu = SimpleNamespace(is_cuda=True, requires_grad=True), torch.zeros(1)
    run_op(op, None, body, (cuda, 1), ())
    run_op(op, None, body, (cpu, 1), ())
    assert calls == ["body", "op"]
