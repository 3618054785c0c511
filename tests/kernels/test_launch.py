"""kernels/_triton.launch: ``kernel[grid](...)`` with less host work. On a GPU (Triton 3.6) a repeated launch skips
Triton's JITFunction.run and calls the compiled kernel's launcher; these tests check that it then launches the
kernel compiled for exactly those arguments (the pointers' alignment, the integers Triton specialises), that it
gives the outputs of Triton's own launch, and that it leaves the shortcut where it must (a launch hook installed,
the shortcut turned off). Elsewhere (Triton's interpreter) launch is kernel[grid] itself: every kernel test runs
through it."""

import pytest
import torch

from mixerzoo.kernels import _triton
from mixerzoo.kernels._triton import HAS_TRITON, launch, tl, triton

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")


@triton.jit
def _strided_scale_kernel(x, y, n, stride, scale, BLOCK: tl.constexpr):
    # y[i] = x[i * stride] * scale for i < n
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(y + i, tl.load(x + i * stride, mask=m) * scale, mask=m)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(x, n, stride, scale=2.0, block=128):
    y = torch.full((n,), -1.0, device=x.device, dtype=x.dtype)
    launch(_strided_scale_kernel, (triton.cdiv(n, block),), x, y, n, stride, scale, BLOCK=block, num_warps=4)
    return y


def _expect(x, n, stride, scale=2.0):
    return x[: n * stride : stride] * scale


def test_launch_gives_triton_outputs():
    """Any device: the outputs of the kernel for several strides and lengths, launched three times each (on a GPU
    the third launch takes the shortcut)."""
    x = torch.randn(4096, device=_device())
    for n, stride in ((1000, 1), (333, 3), (100, 16), (1, 1)):
        for _ in range(3):
            torch.testing.assert_close(_run(x, n, stride), _expect(x, n, stride), rtol=0, atol=0)


def test_launch_refuses_a_keyword_the_kernel_does_not_take():
    """Any device: a launch keyword that is neither a kernel parameter nor a launch option fails, as a GPU launch
    does (Triton's interpreter alone would drop it; tests/conftest.py holds it to the GPU's rule), so that a
    kernel's wrapper that leaks a config key fails the CPU tests too. Launch options themselves pass."""
    x = torch.randn(64, device=_device())
    y = torch.empty(64, device=x.device)
    with pytest.raises(KeyError, match="SPLIT"):
        launch(_strided_scale_kernel, (1,), x, y, 64, 1, 2.0, BLOCK=64, SPLIT=True, num_warps=4)
    launch(_strided_scale_kernel, (1,), x, y, 64, 1, 2.0, BLOCK=64, num_warps=4, num_stages=2, maxnreg=128)
    torch.testing.assert_close(y, x * 2.0, rtol=0, atol=0)


cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not _triton._FAST_LAUNCH, reason="the shortcut runs on a GPU with Triton 3.6"
)


@pytest.fixture
def jit_runs(monkeypatch):
    """The number of calls of Triton's JITFunction.run (the slow path) since the fixture was made, as a list."""
    from triton.runtime.jit import JITFunction

    calls = []
    real = JITFunction.run

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted)
    return calls


@cuda
def test_repeated_launch_skips_triton_run(jit_runs):
    x = torch.randn(4096, device="cuda")
    for _ in range(2):  # the first launch makes the binder, the second keeps the compiled kernel
        _run(x, 1000, 1)
    before = len(jit_runs)
    for _ in range(5):
        torch.testing.assert_close(_run(x, 1000, 1, scale=0.5), _expect(x, 1000, 1, 0.5), rtol=0, atol=0)
    assert len(jit_runs) == before  # five launches, none through JITFunction.run


@cuda
def test_each_specialisation_gets_its_own_kernel(jit_runs):
    """A misaligned pointer, and strides of 1, 16 and 3 (Triton specialises the integer equal to 1 and those
    divisible by 16) each launch their own compiled kernel, after the first of each through Triton's run. A
    kernel compiled for a 16-byte-aligned x that loads at x + 4 bytes would fault (vectorised loads) or read
    wrong values."""
    buf = torch.randn(8192, device="cuda")
    cases = [(buf, 1), (buf[1:], 1), (buf, 16), (buf, 3), (buf[1:], 3)]
    n = 500

    def one_round():
        for x, stride in cases:
            torch.testing.assert_close(_run(x, n, stride), _expect(x, n, stride), rtol=0, atol=0)

    for _ in range(2):
        one_round()
    before = len(jit_runs)
    one_round()
    torch.cuda.synchronize()
    assert len(jit_runs) == before  # every case from its own compiled kernel, by the shortcut
    keys = [k for k in _strided_scale_kernel._mixerzoo_launches if k[0] == torch.cuda.current_device()]
    assert len(keys) >= len(cases)  # (other tests of this module add theirs)


@cuda
def test_launch_hook_takes_triton_run(jit_runs):
    """With a launch hook installed (as a profiler installs one) every launch goes through Triton's run, which
    calls the hook."""
    from triton import knobs

    x = torch.randn(4096, device="cuda")
    for _ in range(3):
        _run(x, 700, 1)
    seen = []

    def hook(metadata):
        seen.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        before = len(jit_runs)
        torch.testing.assert_close(_run(x, 700, 1), _expect(x, 700, 1), rtol=0, atol=0)
        assert len(jit_runs) == before + 1 and len(seen) == 1
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


@cuda
def test_shortcut_off(jit_runs, monkeypatch):
    """MIXERZOO_FAST_LAUNCH=0 (read at import) leaves every launch to Triton."""
    monkeypatch.setattr(_triton, "_FAST_LAUNCH", False)
    x = torch.randn(4096, device="cuda")
    for _ in range(3):
        torch.testing.assert_close(_run(x, 900, 1), _expect(x, 900, 1), rtol=0, atol=0)
    assert len(jit_runs) == 3


@cuda
def test_launch_in_cuda_graph():
    """The shortcut launches on the current stream: captured into a CUDA graph (whose capture runs on a side stream;
    a launch on another stream would fail the capture or be left out of the graph), replayed on new inputs."""
    x = torch.randn(4096, device="cuda")
    y = torch.empty(1000, device="cuda")
    for _ in range(3):
        launch(_strided_scale_kernel, (8,), x, y, 1000, 1, 3.0, BLOCK=128, num_warps=4)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(_strided_scale_kernel, (8,), x, y, 1000, 1, 3.0, BLOCK=128, num_warps=4)
    x.copy_(torch.randn(4096, device="cuda"))
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, x[:1000] * 3.0, rtol=0, atol=0)


@cuda
def test_pre_run_hook_takes_triton_run(jit_runs):
    """A kernel given a pre-run hook (JITFunction.add_pre_run_hook) launches through Triton's run, which calls it."""
    x = torch.randn(4096, device="cuda")
    for _ in range(3):
        _run(x, 600, 1)
    seen = []
    _strided_scale_kernel.add_pre_run_hook(lambda *args, **kwargs: seen.append(1))
    try:
        before = len(jit_runs)
        torch.testing.assert_close(_run(x, 600, 1), _expect(x, 600, 1), rtol=0, atol=0)
        assert len(jit_runs) == before + 1 and seen == [1]
    finally:
        _strided_scale_kernel.pre_run_hooks.clear()
