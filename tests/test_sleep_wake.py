"""RolloutEngine.sleep / wake_up: the state machine, and generation after wake equals before."""
from __future__ import annotations

import pytest
import torch

from _rl_util import PROMPTS, engine_kwargs, make_engine, rollout, same
from atom import RolloutEngine, SamplingParams
from atom.models.weights import iter_checkpoint

SP = SamplingParams(max_tokens=3)


@pytest.fixture(scope="module")
def path(make_tiny_model):
    return make_tiny_model("qwen3_moe")


@pytest.fixture(scope="module")
def expected(path):
    return rollout(make_engine(path))


def kv_tensors(engine):
    return engine._engine.runner.k_caches + engine._engine.runner.v_caches


def test_state_machine_errors_leave_state_unchanged(path):
    engine = make_engine(path)
    assert not engine.is_sleeping
    with pytest.raises(RuntimeError, match="not sleeping"):
        engine.wake_up()
    with pytest.raises(ValueError, match="level"):
        engine.sleep(level=3)
    with pytest.raises(ValueError, match="level"):
        engine.sleep(level=True)
    with pytest.raises(TypeError):
        engine.sleep(level=2, offload_weights=True)  # level 1 is the offloading sleep now
    with pytest.raises(ValueError, match="offload_weights needs the 'weights' tag"):
        engine.release_memory_occupation(["kv_cache"], offload_weights=True)
    with pytest.raises(ValueError, match="unknown tag"):
        engine.release_memory_occupation(["activations"])
    with pytest.raises(ValueError, match="tags is empty"):
        engine.release_memory_occupation([])
    assert not engine.is_sleeping

    engine.release_memory_occupation(["kv_cache"])  # what `sleep(level=1)` did before: weights stay
    assert engine.is_sleeping and engine.sleeping_tags == {"kv_cache"}
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate(PROMPTS, SP)
    with pytest.raises(RuntimeError, match="already sleeping"):
        engine.sleep(level=1)
    with pytest.raises(RuntimeError, match="already sleeping"):
        engine.sleep(level=2)
    with pytest.raises(RuntimeError, match="kv_cache already released"):
        engine.release_memory_occupation()
    with pytest.raises(RuntimeError, match="weights not asleep"):
        engine.wake_up(["weights"])
    with pytest.raises(ValueError, match="unknown tag"):
        engine.wake_up(["activations"])
    with pytest.raises(ValueError, match="tags is empty"):
        engine.wake_up([])
    assert engine.sleeping_tags == {"kv_cache"}
    engine.release_memory_occupation("weights", offload_weights=True)  # the other pool, later
    assert engine.sleeping_tags == {"kv_cache", "weights"} and engine.weights_complete
    engine.resume_memory_occupation("kv_cache")
    assert engine.sleeping_tags == {"weights"}
    engine.wake_up()
    assert not engine.is_sleeping
    with pytest.raises(RuntimeError, match="not sleeping"):
        engine.wake_up()
    engine.generate(PROMPTS, SP)


def test_sleep_during_generate_is_refused(path):
    engine = make_engine(path)
    runner = engine._engine.runner
    execute, errors = runner.execute, []

    def execute_and_try_to_sleep(*args, **kwargs):
        for call in (lambda: engine.sleep(), lambda: engine.wake_up(),
                     lambda: engine.update_weights(iter_checkpoint(path))):
            try:
                call()
            except RuntimeError as e:
                errors.append(str(e))
        return execute(*args, **kwargs)

    runner.execute = execute_and_try_to_sleep
    try:
        engine.generate(PROMPTS, SamplingParams(max_tokens=2))
    finally:
        runner.execute = execute
    assert errors and all("requests are in flight" in e for e in errors)
    assert not engine.is_sleeping and engine.weight_version == 0


# How each call leaves the pools: (released tags, weights kept).
SLEEPS = {
    "level1": (lambda e: e.sleep(level=1), {"weights", "kv_cache"}, True),          # vLLM: offload + drop KV
    "level2": (lambda e: e.sleep(level=2), {"weights", "kv_cache"}, False),         # vLLM: drop both
    "release_kv": (lambda e: e.release_memory_occupation(["kv_cache"]), {"kv_cache"}, True),   # SGLang tags
    "release_all": (lambda e: e.release_memory_occupation(), {"weights", "kv_cache"}, False),
    "release_weights_offload": (lambda e: e.release_memory_occupation(["weights"], offload_weights=True),
                                {"weights"}, True),
}


@pytest.mark.parametrize("how", sorted(SLEEPS))
def test_generation_after_wake_equals_before(path, expected, how):
    engine = make_engine(path)
    assert same(rollout(engine), expected)
    kv_before = [t for t in kv_tensors(engine)]
    weights_before = {n: (p, p.detach().clone()) for n, p in engine.named_parameters()}
    kv_bytes, w_bytes = engine.memory_bytes("kv_cache", resident=False), engine.memory_bytes("weights", resident=False)
    assert kv_bytes > 0 and w_bytes > 0
    sleep, released, kept = SLEEPS[how]
    sleep(engine)
    assert engine.sleeping_tags == released and engine.weights_complete == kept
    assert engine.memory_bytes("kv_cache") == (0 if "kv_cache" in released else kv_bytes)
    assert engine.memory_bytes("weights") == (0 if "weights" in released else w_bytes)
    if "weights" in released:
        engine.wake_up(["weights"])
        assert engine.sleeping_tags == released - {"weights"}
        if not kept:
            if "kv_cache" in released:
                engine.resume_memory_occupation(["kv_cache"])
            with pytest.raises(RuntimeError, match="incomplete"):
                engine.generate(PROMPTS, SP)
            engine.update_weights(iter_checkpoint(path))
    if engine.is_sleeping:
        engine.wake_up()
    assert not engine.is_sleeping and engine.weights_complete
    # The very same tensor objects (modules, lists and CUDA graphs that hold them stay valid).
    assert all(a is b for a, b in zip(kv_before, kv_tensors(engine)))
    if "kv_cache" in released:
        assert all(float(t.abs().sum()) == 0.0 for t in kv_tensors(engine))  # fresh KV is zeroed
    for n, p in engine.named_parameters():  # the same Parameter objects, same values
        assert p is weights_before[n][0] and torch.equal(p, weights_before[n][1]), n
    engine.reset_prefix_cache()  # a kept KV cache still holds the prompts: same batch shapes as `expected`
    assert same(rollout(engine), expected)


def test_many_cycles_leave_memory_where_it_started(path, expected):
    engine = make_engine(path)
    start = engine.memory_bytes()
    for i in range(200):
        if i % 2:
            engine.sleep(level=1)
        else:
            engine.release_memory_occupation(["kv_cache"])
        assert engine.memory_bytes("kv_cache") == 0
        engine.wake_up()
        assert engine.memory_bytes() == start
    assert same(rollout(engine), expected)


def test_sleep_on_cuda_without_sleep_mode_is_refused_cleanly(path, monkeypatch):
    from atom.engine.memory import EngineMemory
    engine = make_engine(path)
    monkeypatch.setattr(engine._engine.runner.memory, "sleep_capable", False)
    with pytest.raises(RuntimeError, match="enable_sleep_mode"):
        engine.sleep()
    assert not engine.is_sleeping
    assert EngineMemory(torch.device("cpu"), sleep_mode=False).sleep_capable


def test_kv_backed_on_demand_gives_the_same_rollouts(path, expected):
    """What a lazily woken KV pool does on the GPU (KvVmmPool), with the device's part played by a
    function: blocks are backed a few at a time, and no more than `limit` of them when the rest
    of the device is taken."""
    engine = make_engine(path)
    bm = engine._engine.block_manager
    asked = []

    def device(limit):
        def back(n):
            asked.append(n)
            return min(-(-n // 4) * 4, limit)
        return back

    bm.set_backing(4, device(limit=64))
    assert same(rollout(engine), expected)
    assert asked and 4 < bm.backed < bm.num_blocks
    # Room for 3 blocks only: sequences wait their turn; the results stay the same.
    roomy_steps = engine.stats.steps
    bm.set_backing(1, device(limit=3))
    got = rollout(engine)  # other batch shapes: the same tokens, logprobs to float rounding
    assert [t for t, _, _ in got] == [t for t, _, _ in expected]
    assert max(abs(a - b) for (_, x, _), (_, y, _) in zip(got, expected) for a, b in zip(x, y)) < 1e-4
    assert bm.backed == 3 and engine.stats.steps > roomy_steps
    # Room for 1 block: the 20-token prompt cannot run at all; a clear error, nothing held.
    bm.set_backing(1, device(limit=1))
    with pytest.raises(RuntimeError, match="only 1 of its 64 blocks could be given device memory"):
        rollout(engine)
    assert bm.num_free == 1 and all(b.ref_count == 0 for b in bm.blocks)
    bm.set_backing(bm.num_blocks)
    assert same(rollout(engine), expected)


# ---- GPU: real CUDA virtual memory --------------------------------------------------------

def _free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


@pytest.mark.gpu
@pytest.mark.parametrize("lazy_kv_wake", [True, False])
def test_cuda_sleep_returns_memory_and_keeps_addresses(path, lazy_kv_wake):
    engine = RolloutEngine(path, **engine_kwargs(device="cuda", num_kv_blocks=None, kv_cache_memory_bytes=2 << 30,
                                                 enable_sleep_mode=True, dtype="float32", lazy_kv_wake=lazy_kv_wake))
    expected = rollout(engine)
    kv, w = engine.memory_bytes("kv_cache", resident=False), engine.memory_bytes("weights", resident=False)
    assert engine.memory_bytes("kv_cache") == kv  # the whole pool is mapped at start-up
    ptrs = [t.data_ptr() for t in kv_tensors(engine)] + [p.data_ptr() for _, p in engine.named_parameters()]
    decode = getattr(engine._engine.runner, "decode_runner", None)  # CUDA graphs captured so far
    graphs = dict(decode.graphs) if decode is not None else {}
    for kv_only in (True, False):  # release_memory_occupation(["kv_cache"]), then sleep(level=1) (offload)
        assert engine.reset_prefix_cache()
        held = engine.memory_bytes("kv_cache") + (0 if kv_only else w)
        assert not kv_only or held == kv
        before = _free()
        if kv_only:
            engine.release_memory_occupation(["kv_cache"])
        else:
            engine.sleep(level=1)
        assert _free() - before >= 0.95 * held
        engine.wake_up()
        kv_awake = engine.memory_bytes("kv_cache")
        assert kv_awake <= kv / 8 if lazy_kv_wake else kv_awake == kv
        assert same(rollout(engine), expected)
    after = [t.data_ptr() for t in kv_tensors(engine)] + [p.data_ptr() for _, p in engine.named_parameters()]
    assert after == ptrs
    if decode is not None:  # replayed after wake, never re-captured
        assert engine._engine.runner.decode_runner is decode
        assert all(decode.graphs.get(k) is g for k, g in graphs.items())
    # Discarding level 2, then a reload.
    held = engine.memory_bytes()
    before = _free()
    engine.sleep(level=2)
    assert _free() - before >= 0.95 * held and engine.memory_bytes() == 0
    engine.wake_up(["weights"])
    engine.update_weights(iter_checkpoint(path))
    engine.wake_up(["kv_cache"])
    assert same(rollout(engine), expected)
    # Many cycles: device memory ends where it started.
    start = _free()
    for _ in range(200):
        engine.release_memory_occupation(["kv_cache"])
        engine.wake_up()
    assert abs(_free() - start) <= 0.01 * torch.cuda.mem_get_info()[1]
    assert same(rollout(engine), expected)


def _close(got, want) -> bool:
    """Same tokens; logprobs equal to float rounding (other batch shapes, other reduction splits)."""
    return [t for t, _ in got] == [t for t, _ in want] and all(
        abs(a - b) < 1e-4 for (_, x), (_, y) in zip(got, want) for a, b in zip(x, y))


@pytest.mark.gpu
def test_cuda_lazy_kv_wake_backs_blocks_as_needed_and_survives_a_full_device(make_tiny_model):
    """After a wake the KV pool gets memory as blocks are first used; when another tenant took
    the device meanwhile, generation runs in the blocks that could be backed."""
    # 64 KiB per block and KV tensor (fp32): 32 blocks per 2 MiB granule.
    path = make_tiny_model("qwen3", head_dim=128, num_attention_heads=8, num_key_value_heads=8)
    engine = RolloutEngine(path, **engine_kwargs(device="cuda", num_kv_blocks=None, kv_cache_memory_bytes=1 << 30,
                                                 enable_sleep_mode=True, dtype="float32", max_num_seqs=64))
    memory, bm = engine._engine.runner.memory, engine._engine.block_manager
    pool = memory.pools["kv_cache"]
    pool.chunks = pool.span // pool.granularity  # back one granule at a time
    prompts = [[(7 * i + j) % 250 + 2 for j in range(120)] for i in range(48)]  # 9 blocks each
    sp = SamplingParams(temperature=0.0, max_tokens=16, logprobs=0, ignore_eos=True)

    def run():
        return [(c.token_ids, c.logprobs) for r in engine.generate(prompts, sp) for c in r.outputs]

    want = run()
    used = bm.next_fresh  # blocks this rollout took
    engine.release_memory_occupation(["kv_cache"])
    engine.wake_up()
    first = pool.backed_blocks
    assert 0 < first < used and memory.resident_bytes("kv_cache") == pool.granularity * len(pool.offsets)
    assert _close(run(), want) and first < used <= pool.backed_blocks
    # Each backing step at least doubled what was backed: few segments for sleep to unmap.
    assert len(pool.segments) <= len(pool.offsets) * ((pool.chunks - 1).bit_length() + 1)
    # Another tenant takes all but 64 MiB between wake and generate (less than backing
    # on demand must leave free), so the rollout runs in the first granule's blocks.
    engine.release_memory_occupation(["kv_cache"])
    engine.wake_up()
    hog = torch.empty(_free() - (64 << 20), dtype=torch.uint8, device="cuda")
    try:
        assert _close(run(), want)
        assert bm.backed == first
    finally:
        del hog
        torch.cuda.empty_cache()
    assert _close(run(), want) and bm.backed >= used
