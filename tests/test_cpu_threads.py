"""EngineConfig.cpu_threads: a CPU engine computes with the cores the machine's load leaves free."""
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


@pytest.mark.parametrize("load, expected", [(0.2, 8), (3.4, 5), (7.6, 1), (30.0, 1)])
def test_auto_uses_the_free_cores(threads, load, expected):
    threads.setattr(os, "getloadavg", lambda: (load, load, load))
    cpu_threads.apply_cpu_threads(0)
    assert torch.get_num_threads() == expected


def test_explicit_settings_win(threads):
    threads.setattr(os, "getloadavg", lambda: (7.9, 7.9, 7.9))
    cpu_threads.apply_cpu_threads(3)
    assert torch.get_num_threads() == 3
    cpu_threads.apply_cpu_threads(-1)  # keep
    assert torch.get_num_threads() == 3
    threads.setenv("OMP_NUM_THREADS", "3")  # the user's own choice stays
    cpu_threads.apply_cpu_threads(0)
    assert torch.get_num_threads() == 3
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig(model="x", cpu_threads=-2)


def test_a_cpu_engine_applies_it_once_per_process(threads, tiny_llama_path):
    from atom import RolloutEngine
    threads.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    RolloutEngine(tiny_llama_path, device="cpu", num_kv_blocks=16)
    assert torch.get_num_threads() == 2
    threads.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # the load changed: later engines keep 2
    RolloutEngine(tiny_llama_path, device="cpu", num_kv_blocks=16)
    assert torch.get_num_threads() == 2
