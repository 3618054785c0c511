"""Fixtures of the kernel tests: the GPU's tl.dot bounds in Triton's interpreter, compiling for sm_90 in a
child process (the tests' TRITON_INTERPRET=1 makes every @triton.jit function an interpreted one, which cannot
be compiled), and the check that an op's eager CUDA calls skip its custom-op dispatch."""

import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture
def gpu_dot_bounds(monkeypatch):
    """In Triton's interpreter, every tl.dot is held to M, N, K >= 16 as on the GPU (the sm_90 build refuses K < 16;
    the interpreter takes any shape), so that a tile too small for the GPU fails here too."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime import interpreter

        monkeypatch.setitem(interpreter.interpreter_builder.codegen_fns, "min_dot_size", lambda lhs, rhs: (16, 16, 16))


@pytest.fixture
def compile_in_child():
    """run(script) -> its stdout: the Python source run by a child process without TRITON_INTERPRET (Triton must be
    installed; the test fails with the child's stderr if it exits non-zero)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(script: str) -> str:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    return run


@pytest.fixture
def eager_paths(monkeypatch):
    """check(module, body, call, op, inputs, *, function=None, grad_out=None): an op's eager CUDA call skips the
    custom-op dispatch and gives the op's results bit for bit.

    ``module.<body>`` is the CUDA body the op is built from and ``function`` (when the op has gradients) the
    ``torch.autograd.Function`` over it that eager calls record gradients through. ``call(*inputs)`` is the public
    entry point, ``op(*inputs)`` the custom op itself, both returning the output tensor; ``inputs`` are the
    tensors gradients flow to. With ``function``: a call recording gradients goes through the function and its
    body, one without through the body alone, and (with ``grad_out``) every input's gradient equals the op's. Without
    it: the body alone, its output equal to the op's."""

    def check(module, body, call, op, inputs, *, function=None, grad_out=None):
        calls = []
        run_body = getattr(module, body)
        monkeypatch.setattr(module, body, lambda *a: calls.append("body") or run_body(*a))
        if function is None:
            out = call(*inputs)
            assert calls == ["body"]
            assert torch.equal(out, op(*inputs))
            return
        apply = function.apply
        monkeypatch.setattr(function, "apply", lambda *a: calls.append("function") or apply(*a))
        xs = [x.clone().requires_grad_() for x in inputs]
        out = call(*xs)
        assert calls == ["function", "body"]  # the function's forward is the body
        with torch.no_grad():
            out_nograd = call(*inputs)
        assert calls == ["function", "body", "body"]
        ys = [x.clone().requires_grad_() for x in inputs]
        out_op = op(*ys)
        assert torch.equal(out.detach(), out_op.detach()) and torch.equal(out_nograd, out_op.detach())
        if grad_out is not None:
            for a, b in zip(
                torch.autograd.grad(out, xs, grad_out), torch.autograd.grad(out_op, ys, grad_out), strict=True
            ):
                assert torch.equal(a, b)

    return check
