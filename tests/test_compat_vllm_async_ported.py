"""vLLM's AsyncLLM tests (tests/v1/engine/test_async_llm.py: load, abort, multi-abort,
finished flag, mid-stream cancellation, abort's final output, dp rank, health, custom stat
loggers), vLLM's pause / sleep semantics and verl's way of driving AsyncLLM, rewritten for
atom.compat.vllm.AsyncLLM on tiny random models. Expected tokens come from the batch engine
(RolloutEngine.generate with the same seeds) or from arithmetic, never from the code under test."""
from __future__ import annotations

import asyncio
from unittest.mock import patch

import pytest

from atom import AsyncRolloutEngine, RolloutEngine
from atom import SamplingParams as AtomSamplingParams
from atom.compat.vllm import (AsyncEngineArgs, AsyncLLM, EngineDeadError, RequestOutputKind, SamplingParams,
                              TokensPrompt)
from helpers import random_prompts

KW = dict(num_kv_blocks=96, max_model_len=128, max_num_seqs=32)
DELTA, FINAL_ONLY, CUMULATIVE = RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY, RequestOutputKind.CUMULATIVE
PROMPT = [5, 17, 23, 42, 8, 99, 3]


def run(coro, timeout: float = 60):
    """Every test's body, with a deadline: a hang fails the test instead of the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make(path, **kw) -> AsyncLLM:
    return AsyncLLM.from_engine_args(AsyncEngineArgs(model=path, **{**KW, **kw}))


@pytest.fixture(scope="module")
def engine(tiny_llama_path):
    eng = make(tiny_llama_path)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def batch(tiny_llama_path):
    """The oracle: the synchronous batch engine on the same checkpoint."""
    return RolloutEngine(tiny_llama_path, device="cpu", **KW)


def sp(max_tokens, kind, n=1, seed=33, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, output_kind=kind, temperature=0.5, seed=seed, n=n,
                          **kw)


def want_tokens(batch, prompt, params: SamplingParams) -> list[list[int]]:
    """The batch engine's n completions for the same prompt and seed."""
    out = batch.generate([prompt], params.to_atom())[0]
    return [c.token_ids for c in out.outputs]


async def count_tokens(engine, rid, prompt, params, cancel_after=None):
    """vLLM's helper: tokens received (DELTA summed, the others the last output's), stopping
    (and so abandoning the generator) after cancel_after."""
    count = 0
    async for out in engine.generate(prompt=prompt, sampling_params=params, request_id=rid):
        got = sum(len(c.token_ids) for c in out.outputs)
        count = count + got if params.output_kind == DELTA else got
        if cancel_after is not None and count >= cancel_after:
            return count, rid
    return count, rid


async def idle_blocks(eng: AsyncLLM) -> int:
    """Free KV blocks once the aborts (commands to the loop thread) have landed."""
    for _ in range(300):
        if not await eng.async_engine.call(lambda e: e.has_unfinished_requests()):
            break
        await asyncio.sleep(0.01)
    return await eng.async_engine.call(lambda e: e.num_free_kv_blocks)


def per_index(outs) -> dict[int, list[int]]:
    """DELTA outputs joined per completion index."""
    joined: dict[int, list[int]] = {}
    for o in outs:
        for c in o.outputs:
            joined.setdefault(c.index, []).extend(c.token_ids)
    return joined


@pytest.mark.parametrize("kind", [DELTA, FINAL_ONLY])
def test_load_counts_and_tokens(engine, batch, kind):
    """test_load: many concurrent requests (some n=3) each get max_tokens * n tokens, the batch
    engine's for the same seed; nothing is left unfinished."""
    prompts = random_prompts([4 + i % 9 for i in range(24)], 256, seed=7)
    params = [sp(6, kind, n=3 if i % 5 == 0 else 1, seed=100 + i) for i in range(24)]

    async def main():
        async def one(i):
            return [o async for o in engine.generate(TokensPrompt(prompt_token_ids=prompts[i]), params[i], f"load-{i}")]
        return await asyncio.gather(*(one(i) for i in range(24)))
    results = run(main())
    for i, outs in enumerate(results):
        want = want_tokens(batch, prompts[i], params[i])
        assert sum(len(c.token_ids) for o in outs for c in o.outputs) == 6 * params[i].n
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        if kind == FINAL_ONLY:
            assert len(outs) == 1 and [c.token_ids for c in outs[0].outputs] == want
        else:
            assert per_index(outs) == dict(enumerate(want))
    assert not engine.output_processor.has_unfinished_requests()


@pytest.mark.parametrize("kind", [DELTA, FINAL_ONLY])
def test_cancelled_requests_with_n3_free_everything_and_their_ids_are_reusable(engine, kind):
    """test_abort: cancelling the consumers of long requests (some n=3) aborts them; the others
    get all their tokens; every KV block comes back; a cancelled id serves a new request."""
    long_ids, n3_ids = {1, 6, 11}, {1, 4}
    prompts = random_prompts([6] * 14, 256, seed=3)

    async def main():
        free0 = await idle_blocks(engine)
        started = asyncio.Semaphore(0)

        async def one(i):
            n = 3 if i in n3_ids else 1
            params = sp(100 if i in long_ids else 8, kind, n=n, seed=i)
            if i in long_ids:  # running (holding KV) before it is cancelled, awaiting its next output
                async for out in engine.generate(prompts[i], sp(100, DELTA, n=n, seed=i), f"ab-{i}"):
                    if out is not None:
                        started.release()
            return await count_tokens(engine, f"ab-{i}", prompts[i], params)
        tasks = [asyncio.create_task(one(i)) for i in range(14)]
        for _ in long_ids:  # each long one has streamed something
            await started.acquire()
        for i in sorted(long_ids):
            tasks[i].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        unfinished = engine.output_processor.has_unfinished_requests()
        free1 = await idle_blocks(engine)
        again = await count_tokens(engine, "ab-1", prompts[1], sp(8, kind, n=3, seed=1))
        return free0, results, unfinished, free1, again
    free0, results, unfinished, free1, again = run(main())
    for i, r in enumerate(results):
        if i in long_ids:
            assert isinstance(r, asyncio.CancelledError)
        else:
            assert r == (8 * (3 if i in n3_ids else 1), f"ab-{i}")
    assert not unfinished and free1 == free0 == KW["num_kv_blocks"]
    assert again == (24, "ab-1")


def test_multi_abort_n3_ends_each_completion_once_with_its_prefix(engine, batch):
    """test_multi_abort: abort([...]) ends those generators with their partial completions
    (finish_reason "abort", each index once, a prefix of the batch engine's tokens); the
    others finish normally."""
    prompts = random_prompts([5] * 6, 256, seed=11)
    victims = {"ma-1", "ma-4"}
    params = {f"ma-{i}": sp(100 if f"ma-{i}" in victims else 7, DELTA, n=3 if i in (1, 2) else 1, seed=50 + i)
              for i in range(6)}

    async def main():
        got = {rid: 0 for rid in params}
        ready = asyncio.Event()

        async def one(i):
            rid, outs = f"ma-{i}", []
            async for o in engine.generate(prompts[i], params[rid], rid):
                outs.append(o)
                got[rid] += sum(len(c.token_ids) for c in o.outputs)
                if all(got[v] >= 4 for v in victims):
                    ready.set()
            return outs
        tasks = [asyncio.create_task(one(i)) for i in range(6)]
        await ready.wait()
        await engine.abort(sorted(victims) + ["never-was"])
        return await asyncio.gather(*tasks)
    results = run(main())
    for i, outs in enumerate(results):
        rid = f"ma-{i}"
        want = want_tokens(batch, prompts[i], params[rid])
        reasons = [(c.index, c.finish_reason) for o in outs for c in o.outputs if c.finish_reason]
        assert sorted(reasons) == [(j, "abort" if rid in victims else "length") for j in range(params[rid].n)]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        for j, tokens in per_index(outs).items():
            if rid in victims:
                assert len(tokens) < 100 and tokens == want[j][:len(tokens)]
            else:
                assert tokens == want[j]
        assert sum(len(t) for t in per_index(outs).values()) >= (4 if rid in victims else 7 * params[rid].n)
    assert not engine.output_processor.has_unfinished_requests()


@pytest.mark.parametrize("kind", [DELTA, CUMULATIVE])
def test_n3_streams_one_completion_per_output(engine, batch, kind):
    """vLLM streams n > 1 per index: each output holds one completion, a completion's finish is
    reported once, only the last output is finished; CUMULATIVE grows each index by prefix
    and repeats the prompt logprobs, DELTA gives them once per index."""
    params = sp(9, kind, n=3, seed=5, logprobs=1, prompt_logprobs=1)
    want = want_tokens(batch, PROMPT, params)

    async def main():
        return [o async for o in engine.generate(PROMPT, params, f"n3-{int(kind)}")]
    outs = run(main())
    assert all(len(o.outputs) == 1 for o in outs)
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    finishes = [o.outputs[0].index for o in outs if o.outputs[0].finish_reason == "length"]
    assert sorted(finishes) == [0, 1, 2]
    firsts = {}
    for k, o in enumerate(outs):
        firsts.setdefault(o.outputs[0].index, k)
    if kind == DELTA:
        assert per_index(outs) == dict(enumerate(want))
        assert [k for k, o in enumerate(outs) if o.prompt_logprobs is not None] == sorted(firsts.values())
        for j in range(3):  # the running cumulative_logprob equals the sum of the streamed logprobs
            lps = [c.logprobs[t][c.token_ids[t]].logprob for o in outs for c in o.outputs if c.index == j
                   for t in range(len(c.token_ids))]
            last = [o.outputs[0] for o in outs if o.outputs[0].index == j][-1]
            assert last.cumulative_logprob == pytest.approx(sum(lps), abs=1e-4)
    else:
        assert all(o.prompt_logprobs is not None and len(o.prompt_logprobs) == len(PROMPT) for o in outs)
        for j in range(3):
            seen = [o.outputs[0].token_ids for o in outs if o.outputs[0].index == j]
            assert seen[-1] == want[j]
            assert all(b[:len(a)] == a and len(b) > len(a) for a, b in zip(seen, seen[1:]))


def test_mid_stream_cancellation_by_leaving_the_loop(engine):
    """test_mid_stream_cancellation: consumers that stop reading after 5 tokens free their
    requests (the generator is closed); the id can be used again."""
    prompts = random_prompts([6] * 10, 256, seed=21)

    async def main():
        free0 = await idle_blocks(engine)

        async def one(i):
            gen = engine.generate(prompts[i], sp(100, DELTA, seed=i), f"mid-{i}")
            count = 0
            async for out in gen:
                count += len(out.outputs[0].token_ids)
                if count >= 5:
                    break
            await gen.aclose()  # what garbage collection does later for vLLM's test
            return count
        counts = await asyncio.gather(*(one(i) for i in range(10)))
        unfinished = engine.output_processor.has_unfinished_requests()
        free1 = await idle_blocks(engine)
        again = await count_tokens(engine, "mid-0", prompts[0], sp(5, DELTA))
        return counts, unfinished, free0, free1, again
    counts, unfinished, free0, free1, again = run(main())
    assert all(c >= 5 for c in counts) and not unfinished and free1 == free0
    assert again == (5, "mid-0")


@pytest.mark.parametrize("kind", [DELTA, FINAL_ONLY])
def test_abort_final_output(engine, batch, kind):
    """test_abort_final_output: the last output after abort() is finished, one completion,
    finish_reason "abort", stop_reason None, num_cached_tokens an int; its tokens are a prefix
    of the batch engine's."""
    params = sp(100, kind, seed=42)

    async def main():
        outs = []
        generated = await engine.async_engine.call(lambda e: e.stats.generated_tokens)

        async def consume():
            async for o in engine.generate(PROMPT, params, "abort-final"):
                outs.append(o)
        task = asyncio.create_task(consume())
        while await engine.async_engine.call(lambda e: e.stats.generated_tokens) < generated + 3:
            await asyncio.sleep(0.002)
        # Frozen mid-way (vLLM's test sleeps instead), so the abort surely finds it running.
        await engine.pause_generation(mode="keep", clear_cache=False)
        await engine.abort("abort-final")
        await engine.resume_generation()
        await task
        return outs
    outs = run(main())
    final = outs[-1]
    assert final.finished and len(final.outputs) == 1
    assert final.outputs[0].finish_reason == "abort" and final.outputs[0].stop_reason is None
    assert isinstance(final.num_cached_tokens, int) and final.num_cached_tokens >= 0
    tokens = [t for o in outs for t in o.outputs[0].token_ids]
    want = want_tokens(batch, PROMPT, params)[0]
    assert 0 < len(tokens) < 100 and tokens == want[:len(tokens)]
    if kind == FINAL_ONLY:
        assert len(outs) == 1
    assert not engine.output_processor.has_unfinished_requests()


def test_num_cached_tokens_counts_prefix_cache_hits(engine):
    """A repeated 48-token prompt finds its first two full 16-token blocks cached (the last
    block is recomputed for its last token): num_cached_tokens 0, then 32."""
    prompt = random_prompts([48], 256, seed=99)[0]

    async def main():
        await engine.reset_prefix_cache()
        firsts = []
        for rid in ("pc-a", "pc-b"):
            outs = [o async for o in engine.generate(prompt, sp(2, FINAL_ONLY), rid)]
            firsts.append(outs[-1].num_cached_tokens)
        return firsts
    assert run(main()) == [0, 32]


def test_dp_rank_health_and_bad_input_leave_the_engine_usable(engine, batch):
    """test_dp_rank_argument and test_check_health, and errors in the caller's wrong state:
    each raises, names the problem and leaves the engine serving."""
    params = sp(4, FINAL_ONLY)
    want = want_tokens(batch, PROMPT, params)[0]

    async def drain(gen):
        return [o async for o in gen]

    async def main():
        ok = await drain(engine.generate(PROMPT, params, "dp-0", data_parallel_rank=0))
        with pytest.raises(ValueError, match="data_parallel_rank"):
            await drain(engine.generate(PROMPT, params, "dp-1", data_parallel_rank=1))
        await engine.check_health()
        with patch.object(type(engine), "errored", new_callable=lambda: property(lambda self: True)):
            with pytest.raises(EngineDeadError):
                await engine.check_health()
        await engine.check_health()
        live = engine.generate(PROMPT, sp(100, DELTA), "dup")
        await live.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await drain(engine.generate(PROMPT, params, "dup"))
        await engine.abort("dup")
        rest = await drain(live)
        with pytest.raises(TypeError, match="request_id"):
            await drain(engine.generate(PROMPT, params, 7))
        with pytest.raises(ValueError):
            await drain(engine.generate([3, 4, 10 ** 6], params, "oov"))  # a token outside the vocabulary
        with pytest.raises(ValueError, match="mode"):
            await engine.pause_generation(mode="later")
        with pytest.raises(ValueError, match="level"):
            await engine.sleep(level=3)
        with pytest.raises(ValueError, match="LoRA"):
            await engine.add_lora(object())
        after = await drain(engine.generate(PROMPT, params, "dp-0"))
        return ok, rest, after, await engine.is_paused(), await engine.list_loras()
    ok, rest, after, paused, loras = run(main())
    assert ok[-1].outputs[0].token_ids == want == after[-1].outputs[0].token_ids
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert not paused and loras == set() and not engine.output_processor.has_unfinished_requests()


class _CountingLogger:
    def __init__(self, vllm_config, engine_index=0):
        self.args = (vllm_config, engine_index)
        self.logged = 0
        self.initialized = 0

    def log_engine_initialized(self):
        self.initialized += 1

    def log(self):
        self.logged += 1


class _AggregatedLogger(_CountingLogger):
    def __init__(self, vllm_config, engine_indexes=None):
        super().__init__(vllm_config, engine_indexes)


def test_custom_stat_loggers(tiny_llama_path):
    """test_customize_loggers: the given factories are built (vllm_config, engine index or
    indexes), come first, before atom's default logger; do_log_stats() logs each once;
    disable_log_stats keeps only the custom ones."""
    args = AsyncEngineArgs(model=tiny_llama_path, **KW)
    eng = AsyncLLM.from_engine_args(args, stat_loggers=[_CountingLogger, _AggregatedLogger])
    quiet = AsyncLLM.from_engine_args(AsyncEngineArgs(model=tiny_llama_path, disable_log_stats=True, **KW),
                                      stat_loggers=[_CountingLogger])
    none = AsyncLLM.from_engine_args(AsyncEngineArgs(model=tiny_llama_path, disable_log_stats=True, **KW))
    try:
        run(eng.do_log_stats())
        run(none.do_log_stats())
        loggers = eng.logger_manager.stat_loggers
        assert len(loggers) == 3 and type(loggers[0]) is _CountingLogger and type(loggers[1]) is _AggregatedLogger
        assert loggers[0].args[1] == 0 and loggers[1].args[1] == [0] and loggers[0].args[0] is eng.vllm_config
        assert [lg.logged for lg in loggers[:2]] == [1, 1] and [lg.initialized for lg in loggers[:2]] == [1, 1]
        assert [type(lg) for lg in quiet.logger_manager.stat_loggers] == [_CountingLogger]
        assert none.logger_manager is None
    finally:
        for e in (eng, quiet, none):
            e.shutdown()


def test_pause_resume_sleep_semantics(tiny_llama_path, batch):
    """vLLM's pause / sleep contract: keep freezes in-flight requests and queues new ones until
    resume; is_paused and is_sleeping say so (vLLM's core counts a pause as sleeping); wait
    returns when in-flight requests are done; clear_cache empties the prefix cache; a full
    wake_up resumes whatever paused; the tokens are the batch engine's throughout."""
    eng = make(tiny_llama_path, enable_sleep_mode=True)
    prefix = random_prompts([40], 256, seed=5)[0]
    long, short = sp(30, FINAL_ONLY, seed=1), sp(5, FINAL_ONLY, seed=2)

    async def final(prompt, params, rid):
        return [o async for o in eng.generate(prompt, params, rid)][-1]

    async def main():
        states = {}
        running = asyncio.create_task(final(PROMPT, long, "keep-0"))
        while not await eng.async_engine.call(lambda e: e.num_running_sequences):
            await asyncio.sleep(0.002)
        await eng.pause_generation(mode="keep", clear_cache=False)
        states["keep"] = (await eng.is_paused(), await eng.is_sleeping())
        late = asyncio.create_task(final(prefix, short, "keep-late"))
        await asyncio.sleep(0.1)
        states["held"] = (running.done(), late.done())
        await eng.resume_generation()
        kept, late_out = await running, await late
        states["resumed"] = (await eng.is_paused(), await eng.is_sleeping())
        draining = asyncio.create_task(final(PROMPT, long, "wait-0"))
        while not await eng.async_engine.call(lambda e: e.num_running_sequences):
            await asyncio.sleep(0.002)
        await eng.pause_generation(mode="wait", clear_cache=True)
        states["waited"] = draining.done()
        waited = await draining
        await eng.resume_generation()
        cleared = await final(prefix, short, "after-clear")
        await eng.pause_generation()                 # verl / dynamo: pause, then sleep ...
        await eng.sleep(level=1)
        states["asleep"] = (await eng.is_paused(), await eng.is_sleeping())
        await eng.wake_up()                          # ... a full wake_up resumes generation
        states["awake"] = (await eng.is_paused(), await eng.is_sleeping())
        woke = await final(prefix, short, "after-wake")
        return states, kept, late_out, waited, cleared, woke
    try:
        states, kept, late_out, waited, cleared, woke = run(main())
    finally:
        eng.shutdown()
    assert states == {"keep": (True, True), "held": (False, False), "resumed": (False, False), "waited": True,
                      "asleep": (True, True), "awake": (False, False)}
    want_long, want_short = want_tokens(batch, PROMPT, long)[0], want_tokens(batch, prefix, short)[0]
    assert kept.outputs[0].token_ids == want_long == waited.outputs[0].token_ids
    assert late_out.outputs[0].token_ids == cleared.outputs[0].token_ids == woke.outputs[0].token_ids == want_short
    # the 40-token prompt's two full blocks: cached after the first run, gone after clear_cache and sleep
    assert (late_out.num_cached_tokens, cleared.num_cached_tokens, woke.num_cached_tokens) == (0, 0, 0)


def test_verl_style_server_calls(tiny_llama_path, batch):
    """verl's vLLM server: TokensPrompt with an empty multi_modal_data, logprobs=0, the final
    output's logprob of each token; reset_mm_cache / list_loras at start-up; an abort mid-way
    gives finish_reason "abort"; wait_for_requests_to_drain returns once idle."""
    eng = AsyncLLM.from_vllm_config(vllm_config=AsyncEngineArgs(model=tiny_llama_path, **KW).create_engine_config(),
                                    usage_context=None, enable_log_requests=False, disable_log_stats=True)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=1.0, logprobs=0, repetition_penalty=1.0,
                            ignore_eos=True, seed=8)
    want = batch.generate([PROMPT], params.to_atom())[0].outputs[0]

    async def final(rid, p):
        last = None
        async for out in eng.generate(prompt=TokensPrompt(prompt_token_ids=PROMPT, multi_modal_data={}),
                                      sampling_params=p, request_id=rid, lora_request=None):
            last = out
        return last

    async def main():
        await eng.reset_mm_cache()
        loras = await eng.list_loras()
        done = await final("verl-0", params)
        slow = asyncio.create_task(final("verl-1", SamplingParams(max_tokens=120, ignore_eos=True, seed=9)))
        while not await eng.async_engine.call(lambda e: e.num_running_sequences):
            await asyncio.sleep(0.002)
        await eng.abort("verl-1")
        aborted = await slow
        await eng.wait_for_requests_to_drain(drain_timeout=5)
        return loras, done, aborted
    try:
        loras, done, aborted = run(main())
    finally:
        eng.shutdown()
    c = done.outputs[0]
    assert loras == set() and c.token_ids == want.token_ids and c.finish_reason == "length"
    assert [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] == pytest.approx(want.logprobs, abs=1e-5)
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort" and len(aborted.outputs[0].token_ids) < 120


def test_generate_after_shutdown_raises(tiny_llama_path):
    eng = make(tiny_llama_path)
    eng.shutdown()

    async def main():
        with pytest.raises(EngineDeadError):
            [o async for o in eng.generate(PROMPT, sp(3, DELTA), "late")]
        with pytest.raises(EngineDeadError):
            await eng.check_health()
    run(main())
    assert eng.errored and not eng.is_running and not eng.output_processor.has_unfinished_requests()


def test_async_rollout_engine_resume_during_a_wait_pause_does_not_hang(tiny_llama_path):
    """AsyncRolloutEngine: a pause_generation("wait") still draining when resume_generation()
    comes raises RuntimeError in its caller instead of waiting forever; the request finishes
    with the batch engine's tokens and a later pause works."""
    eng = AsyncRolloutEngine(tiny_llama_path, device="cpu", **KW)
    params = AtomSamplingParams(max_tokens=60, ignore_eos=True, temperature=0.0)
    want = RolloutEngine(tiny_llama_path, device="cpu", **KW).generate([PROMPT], params)[0].outputs[0].token_ids

    async def main():
        task = asyncio.create_task(eng.generate(PROMPT, params, request_id="w"))
        while not await eng.call(lambda e: e.num_running_sequences):
            await asyncio.sleep(0.002)
        pausing = asyncio.create_task(eng.pause_generation("wait"))
        await asyncio.sleep(0)
        await eng.resume_generation()
        with pytest.raises(RuntimeError, match="before the engine was quiet"):
            await pausing
        out = await task
        await eng.pause_generation("abort")
        paused = await eng.call(lambda e: e.is_paused)
        await eng.resume_generation()
        return out, paused
    try:
        out, paused = run(main())
    finally:
        eng.close()
    assert out.outputs[0].token_ids == want and paused
