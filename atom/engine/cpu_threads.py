"""How many threads a CPU engine computes with (torch's intra-op threads, process-wide).

torch starts one OpenMP thread per core. When other work shares the cores, its threads wait on
each other at every op: on the 2-core development machine with a load of ~9, generation with two
threads took 14x as long as with one (152 s against 10.8 s, same tokens); with the CPU backend,
one competing busy process made two threads 2.3x slower than one, two made them 2.5-6.5x slower,
while on the idle machine two threads were 1.5x faster (BENCHMARKS.md, "CPU threads"). So by
default (`EngineConfig.cpu_threads=0`) a CPU engine uses the cores the rest of the machine leaves
free: the core count minus the cores other processes keep busy, at least 1, at most torch's own
choice. "Busy" is measured, not guessed from the load average: the machine's CPU time over a
short window (/proc/stat: user, nice, system, irq, softirq, steal) minus this process's own. The
load average counts this process itself and tasks waiting on I/O: on the development machine it
sat at ~1 with both cores idle, which made the old rule (cores minus load) take one thread of
two. Without /proc/stat (not Linux) the 1-minute load average stands in. An explicit
OMP_NUM_THREADS in the environment is the user's choice and is left alone, as is
`cpu_threads=-1`; `cpu_threads=n` sets n. The automatic choice is made once per process (by its
first CPU engine), so engines built later compute with the same threads, hence the same float
summation order, whatever the load does meanwhile.
"""
from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)
_chosen: int | None = None  # the automatic choice of this process, once made


_WINDOW_S = 0.3  # how long the other processes' CPU use is watched


def _sample() -> tuple[float, float, float] | None:
    """(the machine's busy CPU seconds since boot per /proc/stat, this process's CPU seconds, a
    wall clock in seconds), or None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, time.process_time(), time.monotonic()


def busy_cores_of_others(window: float = _WINDOW_S) -> float | None:
    """Cores the other processes kept busy over the next `window` seconds (the machine's busy
    CPU time minus this process's, per second); None where /proc/stat cannot be read."""
    first = _sample()
    if first is None:
        return None
    time.sleep(window)
    last = _sample()
    if last is None:
        return None
    machine, own, wall = (b - a for a, b in zip(first, last))
    return max(0.0, machine - own) / max(wall, 1e-9)


def free_cores() -> int:
    """Cores this process may use minus those other processes keep busy, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores_of_others()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def apply_cpu_threads(setting: int) -> None:
    """Set torch's thread count for a CPU engine from EngineConfig.cpu_threads (see the module doc)."""
    if setting > 0:
        torch.set_num_threads(setting)
        return
    global _chosen
    if setting < 0 or "OMP_NUM_THREADS" in os.environ or _chosen is not None:
        return
    current = torch.get_num_threads()
    chosen = _chosen = min(current, free_cores()) if current > 1 else current  # one thread: nothing to measure
    if chosen < current:
        log.info("CPU engine: %d thread(s) instead of %d (the other cores are busy; EngineConfig.cpu_threads "
                 "sets it)", chosen, current)
        torch.set_num_threads(chosen)
