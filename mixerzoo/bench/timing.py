"""Timing and memory of one benchmarked call: CUDA events (queued calls, median), wall clock on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["cuda_graphed", "peak_mem_mb", "sync", "time_ms"]

# How the figures are taken, written into every results file.
TIMING = {
    "cuda": (
        "median of the timed calls, queued back to back after a warm-up, each between two CUDA events, one "
        "synchronisation at the end (as triton.testing.do_bench): device time per call"
    ),
    "cpu": "median of the timed calls after a warm-up, wall clock (time.perf_counter) per call",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of one ``fn()`` over ``repeat`` calls after ``warmup`` calls.

    On CUDA the calls are queued back to back, each between two CUDA events, with one synchronisation at
    the end: an event pair measures the device's time for its call, not the host's launch latency before
    a call that found the device idle (where the host is the slower side, as in an eager decode step of
    small kernels, the pairs measure the host's time per call instead). On the CPU each call is timed by
    the wall clock.
    """
    if repeat < 1:
        raise ValueError(f"time_ms: repeat must be >= 1, got {repeat}")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory allocated while ``fn()`` runs once, in MiB above what was allocated before; None on
    a device whose allocator keeps no such statistics (the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cuda_graphed(fn: Callable[[], Any], *, warmup: int = 3) -> tuple[Callable[[], None], Any]:
    """Capture ``fn()`` in a CUDA graph: returns ``(replay, out)``, ``out`` being fn's output tensors, which
    every replay overwrites. ``fn`` runs ``warmup`` times eagerly first, on a side stream (Triton compiles,
    the allocator warms up); its inputs must sit in fixed buffers. A step that updates a state in place
    advances it on each of those runs and on each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out
