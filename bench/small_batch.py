"""Micro-benchmarks of the small-batch decode kernels (the decode-moe-bs1 workload: one token,
Qwen3-30B-A3B shapes): `python -m bench.small_batch`. Each section times the fused / specialised
kernel against the path it replaces, inside a CUDA graph (launch overhead out), and prints
microseconds and the share of the copy bandwidth for the bytes the kernel must move."""
from __future__ import annotations

import torch
import triton

COPY_BW = 4.25e12  # bytes read + written per s, measured on the H200 (BENCHMARKS.md)


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, replayed `reps` times inside one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median") / 1e3 / reps


def report(name: str, seconds: float, nbytes: int | None = None) -> None:
    frac = f"  {nbytes / seconds / COPY_BW:6.1%} of copy bw" if nbytes else ""
    print(f"{name:<60} {seconds * 1e6:8.1f} us{frac}", flush=True)


SECTIONS = []  # functions taking no arguments; each prints its rows


# ---- sections (one per kernel family; add yours below its own marker) ----

# [moe-small]

# [attn-prologue]

# [sampling-small]

# [skinny-gemm]


def main() -> None:
    import atom.ops.triton  # noqa: F401  (registers the triton ops)
    for section in SECTIONS:
        section()


if __name__ == "__main__":
    main()
