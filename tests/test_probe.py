"""EngineProbe (atom/engine/probe.py, from RolloutEngine.probe()): the benchmarks' diagnostics on
the CPU. Phase timers cover the generate call and come out cleanly; memory statistics match
the engine's public byte counts; the profiler window opens and closes at the steps asked for;
explicit KV backing and the one-shot wake policy; bad arguments raise ValueError."""
from __future__ import annotations

import time

import pytest
import torch

from _rl_util import PROMPTS, core_generate, make_core, make_engine
from atom import SamplingParams
from atom.engine.probe import PHASES, EngineProbe

SP = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def path(make_tiny_model):
    return make_tiny_model("qwen3")


@pytest.fixture(scope="module")
def engine(path):
    return make_engine(path)


def test_phase_timers_cover_generate_and_come_out(engine):
    probe = engine.probe()
    engine.generate(PROMPTS, SP)  # warm
    timers = probe.install_phase_timers()
    with pytest.raises(RuntimeError, match="installed already"):
        probe.install_phase_timers()
    t = time.perf_counter()
    engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    wall = time.perf_counter() - t
    probe.remove_phase_timers()
    phases = timers.as_dict()
    assert list(phases) == list(PHASES) and all(v > 0 for v in phases.values())
    # The phases are the loop: together nearly all of the call (building requests and outputs aside).
    assert 0.5 * wall < sum(phases.values()) <= wall
    # The prompt steps end inside the call (these prompts take one); the decode-only steps after
    # them make the other 15 of the 16 tokens (the first is sampled by the prompt step).
    assert t < timers.prompt_steps_end_at < t + wall
    assert timers.decode_steps_after == 15, timers
    frozen = dict(phases)
    engine.generate(PROMPTS, SP)
    assert timers.as_dict() == frozen  # removed: nothing times the engine any more
    assert not probe.phase_timers_installed
    with pytest.raises(RuntimeError, match="no phase timers"):
        probe.remove_phase_timers()


def test_memory_stats_and_backing_on_cpu(engine):
    probe = engine.probe()
    stats = probe.memory_stats()
    assert not stats.vmm and stats.kv_num_blocks == stats.kv_backed_blocks == engine.num_kv_blocks
    for tag, pool in stats.pools.items():
        assert pool.tag == tag and not pool.released
        assert pool.nbytes == engine.memory_bytes(tag, resident=False) > 0
        assert pool.resident_bytes == engine.memory_bytes(tag) > 0
        assert pool.segments == 0 and pool.map_seconds == {}  # CUDA virtual memory only
    n = engine.num_kv_blocks
    assert probe.back_kv(n // 2) == n  # a pool that is not backed on demand is backed whole
    for bad in (-1, n + 1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="back_kv"):
            probe.back_kv(bad)
    engine.release_memory_occupation(["kv_cache"])
    try:
        kv = probe.memory_stats().pools["kv_cache"]
        assert kv.released and kv.resident_bytes == 0
        with pytest.raises(RuntimeError, match="released"):
            probe.back_kv(1)
    finally:
        engine.wake_up()
    assert engine.generate(PROMPTS[:1], SP)[0].outputs[0].token_ids  # still usable


def test_next_kv_wake_is_one_shot_and_validated(path):
    core = make_core(path)
    probe = EngineProbe(core)
    with pytest.raises(RuntimeError, match="not asleep"):
        probe.next_kv_wake(False)
    seen = []
    restore = core.restore_kv
    core.restore_kv = lambda lazy: (seen.append(lazy), restore(lazy))
    for _ in range(2):
        core.release_memory({"kv_cache"}, offload_weights=False)
        with pytest.raises(ValueError, match="True or False"):
            probe.next_kv_wake("yes")
        if not seen:
            probe.next_kv_wake(False)
            assert probe.pending_kv_wake is False
        core.restore_memory({"kv_cache"})
        assert probe.pending_kv_wake is None
    assert core.config.lazy_kv_wake is True  # the config says what the engine was built with
    assert seen == [False, True]  # the override for one wake, then the config's policy


def _mark_steps(core) -> None:
    """Label every model step in the profiler's record (an instance wrapper, as the probe's)."""
    execute, count = core.runner.execute, [0]

    def labelled(*a, **k):
        with torch.profiler.record_function(f"test_step_{count[0]}"):
            count[0] += 1
            return execute(*a, **k)
    core.runner.execute = labelled


def _labels(window) -> set[str]:
    return {e.key for e in window.profiler.key_averages() if e.key.startswith("test_step_")}


def test_profile_window_opens_and_closes_at_the_steps(path):
    core = make_core(path)
    _mark_steps(core)
    probe = EngineProbe(core)
    for first, last in ((3, 3), (-1, 2), (1.0, 2), (True, 2), (4, 2)):
        with pytest.raises(ValueError, match="profile_steps"):
            probe.profile_steps(first, last)
    steps0 = core.stats.steps
    window = probe.profile_steps(2, 4)
    with pytest.raises(RuntimeError, match="open already"):
        probe.profile_steps(0, 1)
    core_generate(core, PROMPTS, SP)
    assert core.stats.steps - steps0 >= 6 and window.steps == core.stats.steps - steps0
    assert window.started and window.stopped and window.wall_s > 0
    assert _labels(window) == {"test_step_2", "test_step_3"}
    assert probe.finish_profile() is window
    assert "_finish_step" not in vars(core)  # the step counter is out

    # first=0 opens at once; a window longer than the run is closed by finish_profile
    before = core.stats.steps
    window = probe.profile_steps(0, 1000)
    core_generate(core, PROMPTS[:1], SP)
    assert window.started and not window.stopped
    probe.finish_profile()
    assert window.stopped
    assert _labels(window) == {f"test_step_{i}" for i in range(before, core.stats.steps)}
    with pytest.raises(RuntimeError, match="no profile window"):
        probe.finish_profile()


def test_wrappers_come_out_in_reverse_order(path):
    core = make_core(path)
    probe = EngineProbe(core)
    probe.install_phase_timers()
    probe.profile_steps(1, 2)
    with pytest.raises(RuntimeError, match="reverse order"):
        probe.remove_phase_timers()  # the profile window wraps the same step method on top
    probe.finish_profile()
    probe.remove_phase_timers()
    assert not {"_finish_step"} & set(vars(core)) and "execute" not in vars(core.runner)
    assert "schedule" not in vars(core.scheduler)


def test_decode_runner_stats_on_cpu(path):
    engine = make_engine(path, overlap_decode=True)  # the decode path's host logic, no graphs
    probe = engine.probe()
    assert probe.decode_runner_stats().timers == {}  # not built before a decode step
    engine.generate(PROMPTS, SP)
    stats = probe.decode_runner_stats()
    assert stats.timers["steps"] > 0 and stats.graphs == [] and stats.graphs_current
    probe.reset_decode_runner_timers()
    assert all(v == 0 for v in probe.decode_runner_stats().timers.values())
