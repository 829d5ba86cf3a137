"""EngineConfig.cpu_threads: a CPU engine computes with the cores other processes leave free."""
from __future__ import annotations

import os

import pytest
import torch

from atom import EngineConfig
from atom.engine import cpu_threads


@pytest.fixture
def threads(monkeypatch):
    """torch's thread count restored afterwards; 8 cores, OMP_NUM_THREADS unset."""
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_chosen", None)  # as in a fresh process
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    torch.set_num_threads(8)
    yield monkeypatch
    torch.set_num_threads(before)


def busy(monkeypatch, cores: float) -> None:
    monkeypatch.setattr(cpu_threads, "busy_cores_of_others", lambda window=0.3: cores)


@pytest.mark.parametrize("load, expected", [(0.2, 8), (3.4, 5), (7.6, 1), (30.0, 1)])
def test_auto_uses_the_free_cores(threads, load, expected):
    busy(threads, load)
    cpu_threads.apply_cpu_threads(0)
    assert torch.get_num_threads() == expected


def test_without_proc_stat_the_load_average_stands_in(threads):
    threads.setattr(cpu_threads, "_sample", lambda: None)
    threads.setattr(os, "getloadavg", lambda: (3.4, 3.4, 3.4))
    assert cpu_threads.busy_cores_of_others() is None
    cpu_threads.apply_cpu_threads(0)
    assert torch.get_num_threads() == 5


def test_busy_cores_are_the_machines_minus_this_process(monkeypatch):
    """1.5 s of the machine's CPU time in a 0.5 s window of which this process used 0.25 s:
    the others kept 2.5 cores busy."""
    samples = iter([(1000.0, 3.0, 10.0), (1001.5, 3.25, 10.5)])
    monkeypatch.setattr(cpu_threads, "_sample", lambda: next(samples))
    assert cpu_threads.busy_cores_of_others(window=0.01) == pytest.approx(2.5)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_busy_cores_measured_here():
    """The real measure: a number of cores between 0 and the machine's."""
    busy = cpu_threads.busy_cores_of_others(window=0.05)
    assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 0.5
