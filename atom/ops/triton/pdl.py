"""Programmatic dependent launch (Hopper and later) for the decode path's Triton kernels.

Inside a CUDA graph a kernel starts only after the one before it has finished, and its programs
then ramp up while the SMs idle: ~0.5 µs a boundary on the H200 (bench/trace_gaps.py), ~850
boundaries in a Moonlight decode step. Launched with PDL, a kernel's programs are scheduled as soon as every
program of the previous kernel has passed its own wait (`gdc_launch_dependents`), and wait in
`gdc_wait` for that kernel to finish and flush its writes before touching memory.

Every kernel that takes part starts with `grid_dependency(PDL)`, before any load or store and on
every path (a kernel launched with PDL that ended without waiting could finish before the one
before it, and the next kernel's wait would then no longer cover that one). Kernels launched
without PDL (cuBLAS, torch) wait for everything before them as usual, so the chain holds.

Off in Triton's interpreter and below sm_90; `set_enabled(False)` turns it off (benchmarks).
Measured (BENCHMARKS.md, session 17): grpo-mla-moe 18.06 -> 17.92 s with it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_ON = {"PDL": True, "launch_pdl": True}
_options: dict | None = None  # decided at the first launch (or by set_enabled)


def set_enabled(on: bool) -> None:
    """Launch the participating kernels with PDL (when the device supports it) or not."""
    global _options
    _options = _ON if on and _supported() else {}


def _supported() -> bool:
    """CUDA sm_90+ (the active Triton target: the device's, or scripts/compile_kernels.py's)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    target = triton.runtime.driver.active.get_current_target()
    return target.backend == "cuda" and int(target.arch) >= 90


def options() -> dict:
    """Launch keywords of a participating kernel (unpack, do not change): {} (off) or PDL=True
    with launch_pdl."""
    if _options is None:
        set_enabled(True)
    return _options


@triton.jit
def grid_dependency(PDL: tl.constexpr):
    """First statement of a participating kernel: wait for the previous kernel, then let the
    next one's programs launch (no-op when PDL is off). Waiting first keeps at most one waiting
    kernel resident beside a running one."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
