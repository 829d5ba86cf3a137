"""Timers for device-side benchmarks: CUDA events around each call (the median), and `calls`
calls of a function captured in one CUDA graph (launch overhead out, as in decode)."""
from __future__ import annotations


def graph_of(fn, calls: int):
    """A CUDA graph of `calls` calls of fn (fn runs once first, outside it: compiles, allocations)."""
    import torch
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g


def cuda_median_s(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of `reps` calls of fn, each between two CUDA events, after `warmup` calls."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]
