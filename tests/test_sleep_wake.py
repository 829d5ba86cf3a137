"""RolloutEngine.sleep / wake_up: the state machine, and generation after wake equals before.

What sleep does inside the engine (the KV tensors kept in place, the pools' backing, the block
manager, CUDA graphs) is tested on the engine core a RolloutEngine wraps (LLMEngine), built on its
own (`make_core`), through the calls RolloutEngine makes of it: release_memory / restore_memory."""
from __future__ import annotations

import pytest
import torch

from _rl_util import PROMPTS, core_generate, core_rollout, engine_kwargs, make_core, make_engine, rollout, same
from atom import RolloutEngine, SamplingParams
from atom.engine import model_runner
from atom.engine.memory import EngineMemory
from atom.models.weights import iter_checkpoint

SP = SamplingParams(max_tokens=3)


@pytest.fixture(scope="module")
def path(make_tiny_model):
    return make_tiny_model("qwen3_moe")


@pytest.fixture(scope="module")
def expected(path):
    return rollout(make_engine(path))


def kv_tensors(core) -> list[torch.Tensor]:
    return core.runner.k_caches + core.runner.v_caches


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


def test_sleep_during_generate_is_refused(path, monkeypatch):
    engine = make_engine(path)
    execute, errors = model_runner.ModelRunner.execute, []

    def execute_and_try_to_sleep(runner, *args, **kwargs):  # calls from inside generate (the lock is re-entrant)
        for call in (lambda: engine.sleep(), lambda: engine.wake_up(),
                     lambda: engine.update_weights(iter_checkpoint(path))):
            try:
                call()
            except RuntimeError as e:
                errors.append(str(e))
        return execute(runner, *args, **kwargs)

    with monkeypatch.context() as patch:  # every step of generate runs the model through the class's execute
        patch.setattr(model_runner.ModelRunner, "execute", execute_and_try_to_sleep)
        engine.generate(PROMPTS, SamplingParams(max_tokens=2))
    assert errors and all("requests are in flight" in e for e in errors)
    assert not engine.is_sleeping and engine.weight_version == 0
    # The same for a request added with add_request, before and after its first step.
    engine.add_request("live", PROMPTS[0], SamplingParams(max_tokens=2))
    for _ in range(2):
        for call in (lambda: engine.sleep(), lambda: engine.release_memory_occupation(["kv_cache"]),
                     lambda: engine.wake_up(), lambda: engine.update_weights(iter_checkpoint(path))):
            with pytest.raises(RuntimeError, match="requests are in flight"):
                call()
        engine.step()
    assert not engine.has_unfinished_requests()
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
    for n, p in engine.named_parameters():  # the same Parameter objects, same values
        assert p is weights_before[n][0] and torch.equal(p, weights_before[n][1]), n
    engine.reset_prefix_cache()  # a kept KV cache still holds the prompts: same batch shapes as `expected`
    assert same(rollout(engine), expected)


@pytest.mark.parametrize("how", sorted(SLEEPS))
def test_core_keeps_the_kv_tensors_across_sleep(path, expected, how):
    """The engine core under each call above (the pools it releases and whether the weights are
    kept, as the test above pins them), called as RolloutEngine calls it: the KV tensors after the
    wake are the very same objects (modules, lists and CUDA graphs that hold them stay valid), and
    zeroed when the KV cache was released."""
    _, released, kept = SLEEPS[how]
    core = make_core(path)
    assert same(core_rollout(core), expected)
    kv_before = kv_tensors(core)
    assert kv_before and all(float(t.abs().sum()) > 0.0 for t in kv_before)  # the rollout wrote every one
    core.release_memory(set(released), offload_weights=kept and "weights" in released)
    assert core.asleep == released
    if "weights" in released:
        core.restore_memory({"weights"})
        if not kept:
            if "kv_cache" in released:
                core.restore_memory({"kv_cache"})
            core.apply_weights(iter_checkpoint(path), partial=False, check_finite=False)
    if core.asleep:
        core.restore_memory(set(core.asleep))
    assert not core.asleep
    kv_after = kv_tensors(core)
    assert len(kv_after) == len(kv_before) and all(a is b for a, b in zip(kv_before, kv_after))
    if "kv_cache" in released:
        assert all(float(t.abs().sum()) == 0.0 for t in kv_after)  # fresh KV is zeroed
    core.reset_prefix_cache()
    assert same(core_rollout(core), expected)


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


class _MemoryWithoutSleepMode(EngineMemory):
    """A CPU engine's pools answering as a CUDA engine's without enable_sleep_mode do: they cannot
    sleep (CUDA graphs hold their addresses)."""

    def __init__(self, device: torch.device, sleep_mode: bool) -> None:
        super().__init__(device, sleep_mode)
        self.sleep_capable = False


def test_sleep_on_cuda_without_sleep_mode_is_refused_cleanly(path, monkeypatch):
    # Where the answer comes from (no CUDA needed to build these: plain tensor pools, empty).
    assert not EngineMemory(torch.device("cuda"), sleep_mode=False).sleep_capable
    assert EngineMemory(torch.device("cpu"), sleep_mode=False).sleep_capable
    # An engine whose model runner got such pools (the GPU test below builds the real one).
    with monkeypatch.context() as patch:
        patch.setattr(model_runner, "EngineMemory", _MemoryWithoutSleepMode)
        engine = make_engine(path)
    for call in (lambda: engine.sleep(), lambda: engine.release_memory_occupation(["kv_cache"])):
        with pytest.raises(RuntimeError, match="enable_sleep_mode"):
            call()
        assert not engine.is_sleeping
    engine.generate(PROMPTS, SP)  # still usable


def test_kv_backed_on_demand_gives_the_same_rollouts(path, expected):
    """What a lazily woken KV pool does on the GPU (KvVmmPool), with the device's part played by a
    function: blocks are backed a few at a time, and no more than `limit` of them when the rest
    of the device is taken. On the engine core: the block manager is one of its parts."""
    core = make_core(path)
    bm = core.block_manager
    asked = []

    def device(limit):
        def back(n):
            asked.append(n)
            return min(-(-n // 4) * 4, limit)
        return back

    bm.set_backing(4, device(limit=64))
    assert same(core_rollout(core), expected)
    assert asked and 4 < bm.backed < bm.num_blocks
    # Room for 3 blocks only: sequences wait their turn; the results stay the same.
    roomy_steps = core.stats.steps
    bm.set_backing(1, device(limit=3))
    got = core_rollout(core)  # other batch shapes: the same tokens, logprobs to float rounding
    assert [t for t, _, _ in got] == [t for t, _, _ in expected]
    assert max(abs(a - b) for (_, x, _), (_, y, _) in zip(got, expected) for a, b in zip(x, y)) < 1e-4
    assert bm.backed == 3 and core.stats.steps > roomy_steps
    # Room for 1 block: the 20-token prompt cannot run at all; a clear error, nothing held.
    bm.set_backing(1, device(limit=1))
    with pytest.raises(RuntimeError, match="only 1 of its 64 blocks could be given device memory"):
        core_rollout(core)
    assert bm.num_free == 1 and all(b.ref_count == 0 for b in bm.blocks)
    bm.set_backing(bm.num_blocks)
    assert same(core_rollout(core), expected)


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
    # The weights' addresses (the KV tensors' and the CUDA graphs: test_cuda_core_sleep_keeps_kv_addresses...).
    ptrs = [p.data_ptr() for _, p in engine.named_parameters()]
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
    assert [p.data_ptr() for _, p in engine.named_parameters()] == ptrs
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


@pytest.mark.gpu
@pytest.mark.parametrize("lazy_kv_wake", [True, False])
def test_cuda_core_sleep_keeps_kv_addresses_and_cuda_graphs(path, lazy_kv_wake):
    """The engine core under the test above's two sleeps (the KV cache released, then both pools
    with the weights offloaded), called as RolloutEngine calls it: the KV tensors and the weights
    keep their device addresses, and the CUDA graphs are replayed after the wake, never re-captured."""
    core = make_core(path, device="cuda", num_kv_blocks=None, kv_cache_memory_bytes=2 << 30, enable_sleep_mode=True,
                     dtype="float32", lazy_kv_wake=lazy_kv_wake)
    expected = core_rollout(core)
    ptrs = [t.data_ptr() for t in kv_tensors(core)] + [p.data_ptr() for _, p in core.named_parameters()]
    decode = getattr(core.runner, "decode_runner", None)  # CUDA graphs captured so far
    graphs = dict(decode.graphs) if decode is not None else {}
    for tags, offload in (({"kv_cache"}, False), ({"kv_cache", "weights"}, True)):
        core.reset_prefix_cache()
        core.release_memory(tags, offload_weights=offload)
        assert core.asleep == tags
        core.restore_memory(tags)
        assert not core.asleep
        assert same(core_rollout(core), expected)
    after = [t.data_ptr() for t in kv_tensors(core)] + [p.data_ptr() for _, p in core.named_parameters()]
    assert after == ptrs
    if decode is not None:  # replayed after wake, never re-captured
        assert core.runner.decode_runner is decode
        assert all(decode.graphs.get(k) is g for k, g in graphs.items())


@pytest.mark.gpu
def test_cuda_sleep_without_sleep_mode_is_refused_cleanly(path):
    """The real case the CPU test above simulates: a CUDA engine built without enable_sleep_mode
    refuses every releasing call, and stays awake and usable."""
    engine = RolloutEngine(path, **engine_kwargs(device="cuda", dtype="float32"))
    expected = rollout(engine)
    for call in (lambda: engine.sleep(level=1), lambda: engine.sleep(level=2), lambda: engine.release_memory_occupation(),
                 lambda: engine.release_memory_occupation(["kv_cache"])):
        with pytest.raises(RuntimeError, match="enable_sleep_mode"):
            call()
        assert not engine.is_sleeping and engine.weights_complete
    assert engine.reset_prefix_cache()
    assert same(rollout(engine), expected)


def _close(got, want) -> bool:
    """Same tokens; logprobs equal to float rounding (other batch shapes, other reduction splits)."""
    return [t for t, _ in got] == [t for t, _ in want] and all(
        abs(a - b) < 1e-4 for (_, x), (_, y) in zip(got, want) for a, b in zip(x, y))


@pytest.mark.gpu
def test_cuda_lazy_kv_wake_backs_blocks_as_needed_and_survives_a_full_device(make_tiny_model):
    """After a wake the KV pool gets memory as blocks are first used; when another tenant took
    the device meanwhile, generation runs in the blocks that could be backed. On the engine core
    (its memory pool and block manager are read), released and woken as RolloutEngine's
    release_memory_occupation(["kv_cache"]) / wake_up() do."""
    # 64 KiB per block and KV tensor (fp32): 32 blocks per 2 MiB granule.
    path = make_tiny_model("qwen3", head_dim=128, num_attention_heads=8, num_key_value_heads=8)
    core = make_core(path, device="cuda", num_kv_blocks=None, kv_cache_memory_bytes=1 << 30, enable_sleep_mode=True,
                     dtype="float32", max_num_seqs=64)
    memory, bm = core.runner.memory, core.block_manager
    pool = memory.pools["kv_cache"]
    pool.chunks = pool.span // pool.granularity  # back one granule at a time
    prompts = [[(7 * i + j) % 250 + 2 for j in range(120)] for i in range(48)]  # 9 blocks each
    sp = SamplingParams(temperature=0.0, max_tokens=16, logprobs=0, ignore_eos=True)

    def run():
        return core_generate(core, prompts, sp)

    def sleep_and_wake_kv():
        core.release_memory({"kv_cache"}, offload_weights=False)
        assert core.asleep == {"kv_cache"}
        core.restore_memory({"kv_cache"})
        assert not core.asleep

    want = run()
    used = bm.next_fresh  # blocks this rollout took
    sleep_and_wake_kv()
    first = pool.backed_blocks
    assert 0 < first < used and memory.resident_bytes("kv_cache") == pool.granularity * len(pool.offsets)
    assert _close(run(), want) and first < used <= pool.backed_blocks
    # Each backing step at least doubled what was backed: few segments for sleep to unmap.
    assert len(pool.segments) <= len(pool.offsets) * ((pool.chunks - 1).bit_length() + 1)
    # Another tenant takes all but 64 MiB between wake and generate (less than backing
    # on demand must leave free), so the rollout runs in the first granule's blocks.
    sleep_and_wake_kv()
    hog = torch.empty(_free() - (64 << 20), dtype=torch.uint8, device="cuda")
    try:
        assert _close(run(), want)
        assert bm.backed == first
    finally:
        del hog
        torch.cuda.empty_cache()
    assert _close(run(), want) and bm.backed >= used
