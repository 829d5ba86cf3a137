"""AsyncRolloutEngine: many coroutines, streaming, cancellation, errors, pause and shutdown."""
from __future__ import annotations

import asyncio
import time

import pytest

from atom import AsyncRolloutEngine, EngineDeadError, RolloutEngine, SamplingParams
from helpers import random_prompts

KW = dict(device="cpu", num_kv_blocks=256, max_num_seqs=64, max_model_len=96)


@pytest.fixture(scope="module")
def engine(tiny_llama_path):
    eng = AsyncRolloutEngine(tiny_llama_path, **KW)
    yield eng
    eng.close()


def run(coro):
    return asyncio.run(coro)


def test_thousand_coroutines_equal_one_batch_call(tiny_llama_path, engine):
    prompts = random_prompts([3 + i % 13 for i in range(1000)], 256, seed=1)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=3 + i % 4, logprobs=0, ignore_eos=True)
              for i in range(1000)]
    batch = RolloutEngine(tiny_llama_path, **KW).generate(prompts, params)

    async def main():
        return await asyncio.gather(*(engine.generate(p, sp, request_id=f"r{i}")
                                      for i, (p, sp) in enumerate(zip(prompts, params))))
    got = run(asyncio.wait_for(main(), timeout=120))
    assert [o.request_id for o in got] == [f"r{i}" for i in range(1000)]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in batch]
    for a, b in zip(got, batch):
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-5)


def test_stream_deltas_add_up_to_the_final_output(engine):
    sp = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9, logprobs=1, ignore_eos=True)

    async def main():
        deltas = [d async for d in engine.stream([5, 6, 7, 8], sp, request_id="s")]
        whole = await engine.generate([5, 6, 7, 8], sp, request_id="s2")
        cumulative = [d async for d in engine.stream([5, 6, 7, 8], sp, request_id="s3", cumulative=True)]
        return deltas, whole, cumulative
    deltas, whole, cumulative = run(main())
    assert cumulative[-1].finished and not any(c.finished for c in cumulative[:-1])
    for j in range(2):  # cumulative=True: each output holds everything so far
        assert cumulative[-1].outputs[j].token_ids == whole.outputs[j].token_ids
        for a, b in zip(cumulative, cumulative[1:]):
            assert b.outputs[j].token_ids[:len(a.outputs[j].token_ids)] == a.outputs[j].token_ids
        assert len({len(c.outputs[j].token_ids) for c in cumulative}) >= 9
    assert len(deltas) >= 9 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    for j in range(2):
        assert sum((d.outputs[j].token_ids for d in deltas), []) == whole.outputs[j].token_ids
        assert sum((d.outputs[j].logprobs for d in deltas), []) == whole.outputs[j].logprobs
        assert sum((d.outputs[j].top_logprobs for d in deltas), []) == whole.outputs[j].top_logprobs
        assert deltas[-1].outputs[j].finish_reason == "length"


def test_cancelled_tasks_free_every_kv_block(engine):
    async def main():
        free0 = await engine.call(lambda e: e.num_free_kv_blocks)
        tasks = [asyncio.create_task(engine.generate(list(range(2 + i, 40)), SamplingParams(max_tokens=50, ignore_eos=True)))
                 for i in range(20)]
        await asyncio.sleep(0.05)
        await engine.pause_generation("keep")  # surely mid-flight, holding KV
        held = await engine.call(lambda e: e.num_free_kv_blocks)
        await engine.resume_generation()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        for _ in range(100):  # the aborts are commands: give the loop a moment
            if not await engine.call(lambda e: e.has_unfinished_requests()):
                break
            await asyncio.sleep(0.01)
        return free0, held, await engine.call(lambda e: e.num_free_kv_blocks)
    free0, held, free1 = run(main())
    assert held < free0 and free1 == free0


def test_an_error_in_one_request_reaches_its_caller_only(engine):
    async def main():
        good = [engine.generate([3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True)) for _ in range(5)]
        bad = [engine.generate([], SamplingParams(max_tokens=4)),                      # empty prompt
               engine.generate([3, 4, 10**6], SamplingParams(max_tokens=4)),           # id outside the vocabulary
               engine.generate([3, 4], "greedy")]                                      # not SamplingParams
        return await asyncio.gather(*good, *bad, return_exceptions=True)
    results = run(main())
    assert all(len(r.outputs[0].token_ids) == 4 for r in results[:5])
    assert all(isinstance(r, (ValueError, TypeError)) for r in results[5:])


def test_duplicate_live_request_id_and_abort(engine):
    async def main():
        first = asyncio.create_task(engine.generate([3, 4, 5], SamplingParams(max_tokens=60, ignore_eos=True),
                                                    request_id="same"))
        # Live for sure once it has tokens (a fixed sleep may outlast 60 fast steps).
        while not await engine.call(lambda e: e.num_running_sequences):
            await asyncio.sleep(0.001)
        with pytest.raises(ValueError, match="already in use"):
            await engine.generate([3, 4, 5], request_id="same")
        result = await engine.abort(["same", "unknown"])
        out = await first
        return result, out
    result, out = run(main())
    assert result["unknown"] is None and result["same"].outputs[0].finish_reason == "abort"
    assert out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == result["same"].outputs[0].token_ids


def test_pause_keep_update_resume_from_coroutines(tiny_llama_path):
    from _rl_util import changed_model
    new = changed_model(tiny_llama_path, seed=2)
    eng = AsyncRolloutEngine(tiny_llama_path, **KW)

    started = asyncio.Semaphore(0)

    async def consume(i):
        outs = []
        async for d in eng.stream([7, 8, 9, i + 2], SamplingParams(max_tokens=40, ignore_eos=True)):
            if not outs:
                started.release()
            outs.append(d)
        c = outs[-1].outputs[0]
        return c.__class__(index=0, token_ids=sum((d.outputs[0].token_ids for d in outs), []), text="",
                           weight_versions=c.weight_versions)

    async def main():
        tasks = [asyncio.create_task(consume(i)) for i in range(8)]
        for _ in range(8):  # every request has its first token: pause mid-flight
            await started.acquire()
        await eng.pause_generation("keep")
        late = asyncio.create_task(eng.generate([9, 9], SamplingParams(max_tokens=3, ignore_eos=True)))
        version = await eng.update_weights([(n, p.detach()) for n, p in new.named_parameters()], version=7)
        await eng.resume_generation()
        return version, await asyncio.gather(*tasks), await late
    version, outs, late = run(main())
    eng.close()
    assert version == 7 and late.outputs[0].weight_versions == [(7, 0, 3)]
    for c in outs:
        spans = c.weight_versions
        assert len(c.token_ids) == 40 and spans[-1][0] == 7 and spans[-1][2] == 40 and len(spans) == 2
        assert spans[0][:2] == (0, 0)


def test_shutdown_with_requests_in_flight_is_quick(tiny_llama_path):
    eng = AsyncRolloutEngine(tiny_llama_path, **KW)
    started = asyncio.Semaphore(0)

    async def one(i):
        last = None
        async for d in eng.stream(list(range(2 + i, 30)), SamplingParams(max_tokens=60, ignore_eos=True)):
            if last is None:
                started.release()
            last = d
        return last

    async def main():
        tasks = [asyncio.create_task(one(i)) for i in range(16)]
        for _ in range(16):  # every request has its first token: all are in flight
            await started.acquire()
        t0 = time.perf_counter()
        await eng.shutdown()
        took = time.perf_counter() - t0
        outs = await asyncio.gather(*tasks)
        with pytest.raises(EngineDeadError):
            await eng.generate([3, 4])
        return took, outs
    took, outs = run(main())
    assert took < 1.0 and not eng.is_running
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert all(o.finished for o in outs) and set(reasons) <= {"abort", "length"} and "abort" in reasons
