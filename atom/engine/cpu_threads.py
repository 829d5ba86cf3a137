"""How many threads a CPU engine computes with (torch's intra-op threads, process-wide).

torch starts one OpenMP thread per core. When other work shares the cores, its threads wait on
each other at every op: on the 2-core development machine with a load of ~9, generation with two
threads took 14x as long as with one (152 s against 10.8 s, same tokens). So by default
(`EngineConfig.cpu_threads=0`) a CPU engine uses the cores the rest of the machine leaves free:
the core count minus the 1-minute load average, at least 1, at most torch's own choice. An
explicit OMP_NUM_THREADS in the environment is the user's choice and is left alone, as is
`cpu_threads=-1`; `cpu_threads=n` sets n. The automatic choice is made once per process (by
its first CPU engine), so engines built later compute with the same threads, hence the same
float summation order, whatever the load does meanwhile.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
_chosen: int | None = None  # the automatic choice of this process, once made


def free_cores() -> int:
    """Cores this process may use minus the machine's 1-minute load average, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def apply_cpu_threads(setting: int) -> None:
    """Set torch's thread count for a CPU engine from EngineConfig.cpu_threads (see the module doc)."""
    if setting > 0:
        torch.set_num_threads(setting)
        return
    global _chosen
    if setting < 0 or "OMP_NUM_THREADS" in os.environ or _chosen is not None:
        return
    current = torch.get_num_threads()
    chosen = _chosen = min(current, free_cores())
    if chosen < current:
        log.info("CPU engine: %d thread(s) instead of %d (the other cores are busy; EngineConfig.cpu_threads "
                 "sets it)", chosen, current)
        torch.set_num_threads(chosen)
