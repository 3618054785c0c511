"""Fixtures of the kernel tests: the GPU's tl.dot bounds in Triton's interpreter, and compiling for sm_90 in a
child process (the tests' TRITON_INTERPRET=1 makes every @triton.jit function an interpreted one, which cannot
be compiled)."""

import os
import subprocess
import sys

import pytest


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
