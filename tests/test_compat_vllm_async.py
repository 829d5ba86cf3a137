"""atom.compat.vllm.AsyncLLM: vLLM's asynchronous engine over atom (ported in spirit from vLLM's
tests/v1/engine/test_async_llm.py), checked against the offline LLM and HF transformers."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from atom.compat.vllm import (LLM, AsyncEngineArgs, AsyncLLM, AsyncLLMEngine, EngineDeadError, RequestOutputKind,
                              SamplingParams)
from helpers import random_prompts

KW = dict(num_kv_blocks=128, max_model_len=256, max_num_seqs=16)
CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def make(path, **kw) -> AsyncLLM:
    return AsyncLLM.from_engine_args(AsyncEngineArgs(model=path, **{**KW, **kw}))


@pytest.fixture(scope="module")
def engine(tiny_chat_model_path):
    eng = make(tiny_chat_model_path)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_chat_model_path):
    return LLM(tiny_chat_model_path, **KW)


async def collect(engine, prompt, sp, rid):
    return [out async for out in engine.generate(prompt, sp, rid)]


async def free_blocks_when_idle(eng: AsyncLLM) -> int:
    for _ in range(200):  # aborts travel as commands: give the loop a moment
        if not await eng.async_engine.call(lambda e: e.has_unfinished_requests()):
            break
        await asyncio.sleep(0.01)
    return await eng.async_engine.call(lambda e: e.num_free_kv_blocks)


def same_completions(got, want):
    assert [c.index for c in got.outputs] == [c.index for c in want.outputs]
    for g, w in zip(got.outputs, want.outputs):
        assert g.token_ids == w.token_ids and g.text == w.text and g.finish_reason == w.finish_reason
        if w.logprobs is not None:
            assert [next(iter(d)) for d in g.logprobs] == [next(iter(d)) for d in w.logprobs]
            assert [d[t].logprob for d, t in zip(g.logprobs, g.token_ids)] == pytest.approx(
                [d[t].logprob for d, t in zip(w.logprobs, w.token_ids)], abs=1e-5)


def last_per_index(outs):
    """CUMULATIVE n > 1 streams one completion per output (vLLM's): each index's last one."""
    last = {c.index: c for o in outs for c in o.outputs}
    return SimpleNamespace(outputs=[last[j] for j in sorted(last)])


def joined(outs, j, field="token_ids"):
    """DELTA outputs of completion index j, concatenated."""
    return sum((list(getattr(c, field)) for o in outs for c in o.outputs if c.index == j), [])


def test_concurrent_generates_equal_the_offline_llm(engine, offline):
    """vLLM's test_load: many concurrent requests (some n=3), every output kind; each request's
    completions equal the offline LLM's for the same prompt and seed."""
    prompts = random_prompts([3 + i % 11 for i in range(48)], 1000, seed=4)
    params = [SamplingParams(n=3 if i % 7 == 0 else 1, temperature=1.0, seed=i, max_tokens=4 + i % 5, logprobs=1,
                             ignore_eos=True, output_kind=(CUMULATIVE, DELTA, FINAL_ONLY)[i % 3]) for i in range(48)]
    want = offline.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    async def main():
        return await asyncio.gather(*(collect(engine, {"prompt_token_ids": p}, sp, f"load-{i}")
                                      for i, (p, sp) in enumerate(zip(prompts, params))))
    got = run(main())
    for i, (outs, w) in enumerate(zip(got, want)):
        assert all(o.request_id == f"load-{i}" for o in outs) and outs[-1].finished
        assert not any(o.finished for o in outs[:-1])
        if params[i].output_kind == FINAL_ONLY:
            assert len(outs) == 1
        if params[i].output_kind != DELTA:
            same_completions(last_per_index(outs), w)
        else:  # the deltas add up to the offline completions
            for j, c in enumerate(w.outputs):
                assert joined(outs, j) == c.token_ids
                assert [x.finish_reason for o in outs for x in o.outputs if x.index == j and x.finish_reason] == ["length"]


def test_output_kinds_are_vllms(engine, offline):
    """CUMULATIVE grows by prefix, DELTA concatenates to CUMULATIVE's final (tokens, text,
    logprobs; prompt logprobs once; the running cumulative_logprob), FINAL_ONLY yields one."""
    base = dict(n=2, temperature=0.8, seed=11, max_tokens=7, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    prompt = "The quick brown fox"

    async def main():
        return [await collect(engine, prompt, SamplingParams(**base, output_kind=k), f"kind-{int(k)}")
                for k in (CUMULATIVE, DELTA, FINAL_ONLY)]
    cum, delta, final = run(main())
    (want,) = offline.generate(prompt, SamplingParams(**base), use_tqdm=False)
    assert len(final) == 1 and final[0].finished
    same_completions(final[0], want)
    same_completions(last_per_index(cum), want)
    assert cum[-1].prompt == prompt and all(o.prompt_logprobs is not None for o in cum)
    assert all(len(o.outputs) == 1 for o in cum + delta)
    for j in range(2):
        seen = [o.outputs[0].token_ids for o in cum if o.outputs[0].index == j]
        assert [len(t) for t in seen] == sorted(len(t) for t in seen) and len(seen[-1]) == 7 and len(seen) >= 7
        for a, b in zip(seen, seen[1:]):
            assert b[:len(a)] == a
        w = want.outputs[j]
        assert joined(delta, j) == w.token_ids
        assert "".join(c.text for o in delta for c in o.outputs if c.index == j) == w.text
        lps = joined(delta, j, "logprobs")
        assert [{t: (lp.logprob, lp.rank) for t, lp in d.items()} for d in lps] == [
            {t: (pytest.approx(lp.logprob, abs=1e-5), lp.rank) for t, lp in d.items()} for d in w.logprobs]
        last = [c for o in delta for c in o.outputs if c.index == j][-1]
        assert last.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-4)
        first = next(k for k, o in enumerate(delta) if o.outputs[0].index == j)
        assert delta[first].prompt_logprobs is not None  # once per index, with its first output
    assert sum(o.prompt_logprobs is not None for o in delta) == 2
    assert delta[-1].finished and not any(o.finished for o in delta[:-1])


def test_delta_text_with_stop_strings_adds_up_to_the_offline_text(engine, offline):
    prompt = "Once upon a time"
    full = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]

    async def main():
        got = []
        for keep in (False, True):
            sp = SamplingParams(temperature=0.0, max_tokens=12, stop=[stop], include_stop_str_in_output=keep,
                                output_kind=DELTA)
            outs = await collect(engine, prompt, sp, f"stop-{keep}")
            got.append(("".join(o.outputs[0].text for o in outs), outs[-1].outputs[0].finish_reason))
        return got
    got = run(main())
    for keep, (text, reason) in zip((False, True), got):
        want = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, stop=[stop],
                                                       include_stop_str_in_output=keep), use_tqdm=False)[0].outputs[0]
        assert text == want.text and reason == want.finish_reason == "stop"
    assert got[1][0] == got[0][0] + stop and stop not in got[0][0]


def test_abort_mid_stream_ends_that_generator_only(engine, offline):
    """vLLM's test_multi_abort: aborted requests end with finish_reason "abort" and their tokens
    so far; the others finish as the offline LLM does; every KV block comes back."""
    prompts = random_prompts([6] * 8, 1000, seed=9)
    sp = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True, output_kind=DELTA)
    want = offline.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    victims = {"ab-2", "ab-5"}

    async def main():
        free0 = await free_blocks_when_idle(engine)
        got = {f"ab-{i}": 0 for i in range(8)}
        started = asyncio.Event()

        async def one(i):
            outs = []
            async for o in engine.generate({"prompt_token_ids": prompts[i]}, sp, f"ab-{i}"):
                outs.append(o)
                got[f"ab-{i}"] += len(o.outputs[0].token_ids)
                if all(got[v] >= 3 for v in victims):
                    started.set()
            return outs
        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        await started.wait()
        await engine.abort(sorted(victims) + ["never-was"])
        return free0, await asyncio.gather(*tasks), await free_blocks_when_idle(engine)
    free0, results, free1 = run(main())
    assert free1 == free0
    for i, outs in enumerate(results):
        tokens = sum((o.outputs[0].token_ids for o in outs), [])
        if f"ab-{i}" in victims:
            assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
            assert 3 <= len(tokens) < 150 and tokens == want[i].outputs[0].token_ids[:len(tokens)]
        else:
            assert tokens == want[i].outputs[0].token_ids and outs[-1].outputs[0].finish_reason == "length"


def test_cancelling_the_consumer_aborts_and_the_id_is_free_again(engine):
    """vLLM's test_abort / test_mid_stream_cancellation."""
    sp = SamplingParams(temperature=1.0, seed=3, max_tokens=200, ignore_eos=True, output_kind=CUMULATIVE)

    async def main():
        free0 = await free_blocks_when_idle(engine)
        started = asyncio.Semaphore(0)

        async def one(i):
            async for _ in engine.generate([5, 6, 7, i + 8], sp, f"cancel-{i}"):
                started.release()
        tasks = [asyncio.create_task(one(i)) for i in range(6)]
        for _ in range(6):
            await started.acquire()
        held = await engine.async_engine.call(lambda e: e.num_free_kv_blocks)
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        free1 = await free_blocks_when_idle(engine)
        again = await collect(engine, [5, 6, 7, 8], SamplingParams(max_tokens=3, ignore_eos=True), "cancel-0")
        return free0, held, free1, results, again
    free0, held, free1, results, again = run(main())
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert held < free0 and free1 == free0
    assert again[-1].finished and len(again[-1].outputs[0].token_ids) == 3


def test_a_duplicate_live_request_id_raises_and_final_only_aborts_with_one_output(engine):
    async def main():
        first = engine.generate(prompt={"prompt_token_ids": [3, 4, 5]}, request_id="dup",
                                sampling_params=SamplingParams(max_tokens=100, ignore_eos=True))
        await first.__anext__()  # live now
        with pytest.raises(ValueError, match="already in use"):
            await collect(engine, [3, 4, 5], SamplingParams(max_tokens=2), "dup")
        await engine.abort("dup")
        rest = [o async for o in first]
        final = asyncio.create_task(collect(engine, [3, 4, 6], SamplingParams(
            n=2, max_tokens=200, ignore_eos=True, output_kind=FINAL_ONLY), "final"))
        while not await engine.async_engine.call(lambda e: e.num_running_sequences == 2):
            await asyncio.sleep(0.005)
        await engine.abort(["final"])
        return rest, await final
    rest, final = run(main())
    assert rest[-1].outputs[0].finish_reason == "abort" and rest[-1].finished
    assert len(final) == 1 and final[0].finished and [c.index for c in final[0].outputs] == [0, 1]
    assert all(c.finish_reason == "abort" and len(c.token_ids) < 200 for c in final[0].outputs)


def test_pause_modes_weight_update_through_collective_rpc_and_resume(tiny_llama_path):
    """abort / wait / keep as vLLM's pause_generation; a weight update through collective_rpc
    (the worker's load_weights) while paused; after resume, greedy tokens are HF's on the new
    weights."""
    from _rl_util import changed_model
    new = changed_model(tiny_llama_path, seed=5)
    eng = make(tiny_llama_path, max_num_seqs=8)
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, output_kind=DELTA)

    async def start(tag, k):
        started = asyncio.Semaphore(0)

        async def one(i):
            outs = []
            async for o in eng.generate([9, 10, 11 + i], sp, f"{tag}-{i}"):
                outs.append(o)
                if len(outs) == 1:
                    started.release()
            return outs
        tasks = [asyncio.create_task(one(i)) for i in range(k)]
        for _ in range(k):
            await started.acquire()
        return tasks

    def load(worker, pairs):
        return len(worker.model_runner.model.load_weights(pairs))

    async def main():
        tasks = await start("abort", 3)
        await eng.pause_generation(mode="abort")
        aborted = await asyncio.gather(*tasks)
        await eng.resume_generation()
        tasks = await start("wait", 3)
        with pytest.warns(DeprecationWarning, match="mode='wait'"):
            await eng.pause_generation(wait_for_inflight_requests=True)  # older vLLM's spelling of "wait"
        waited = [t.done() for t in tasks]
        finished = await asyncio.gather(*tasks)
        paused = await eng.is_paused()
        await eng.resume_generation()
        tasks = await start("keep", 3)
        await eng.pause_generation(mode="keep", clear_cache=False)
        late = asyncio.create_task(collect(eng, [20, 21, 22], SamplingParams(temperature=0.0, max_tokens=8,
                                                                            ignore_eos=True), "late"))
        pairs = [(n, p.detach()) for n, p in new.named_parameters()]
        (loaded,) = await eng.collective_rpc(load, args=(pairs,))
        await eng.resume_generation()
        kept = await asyncio.gather(*tasks)
        return aborted, waited, finished, paused, loaded, kept, await late, await eng.is_paused()
    aborted, waited, finished, paused, loaded, kept, late, paused_after = run(main())
    eng.shutdown()
    assert all(o[-1].outputs[0].finish_reason == "abort" for o in aborted)
    assert all(sum(len(x.outputs[0].token_ids) for x in o) < 40 for o in aborted)
    assert all(waited) and paused and not paused_after
    assert all(o[-1].outputs[0].finish_reason == "length" for o in finished)
    assert loaded == len(list(new.named_parameters()))
    assert all(sum(len(x.outputs[0].token_ids) for x in o) == 40 and o[-1].outputs[0].finish_reason == "length"
               for o in kept)
    with torch.no_grad():
        hf = new.generate(torch.tensor([[20, 21, 22]]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert late[-1].outputs[0].token_ids == hf[0, 3:].tolist()


def test_sleep_wake_up_and_is_sleeping(tiny_llama_path):
    """vLLM's sleep(level, mode) pauses then releases memory; wake_up(tags) restores pools and
    resumes once all is back; a level-2 sleep needs the weights reloaded (collective_rpc)."""
    eng = make(tiny_llama_path, enable_sleep_mode=True)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=FINAL_ONLY)

    async def main():
        before = (await collect(eng, [4, 5, 6], sp, "s0"))[-1].outputs[0].token_ids
        states = [await eng.is_sleeping()]
        await eng.sleep(level=1)
        states.append(await eng.is_sleeping())
        waiting = asyncio.create_task(collect(eng, [4, 5, 6], sp, "s1"))  # queued while asleep
        await eng.wake_up(["weights"])
        states.append(await eng.is_sleeping())
        await asyncio.sleep(0.05)
        states.append(waiting.done())
        await eng.wake_up(["kv_cache"])
        states.append(await eng.is_sleeping())
        after1 = (await waiting)[-1].outputs[0].token_ids
        await eng.sleep(level=2)
        await eng.wake_up(["weights"])
        from atom.models.weights import iter_checkpoint
        await eng.collective_rpc(lambda w: w.model_runner.model.load_weights(iter_checkpoint(tiny_llama_path)))
        await eng.wake_up()
        after2 = (await collect(eng, [4, 5, 6], sp, "s2"))[-1].outputs[0].token_ids
        await eng.sleep(level=0)
        level0 = (await eng.is_sleeping(), await eng.is_paused())
        await eng.wake_up(["scheduling"])
        end = (await eng.is_sleeping(), await eng.is_paused())
        await eng.sleep(level=1)
        asleep = asyncio.create_task(collect(eng, [4, 5, 6], sp, "s3"))
        await asyncio.sleep(0.02)
        eng.shutdown()  # a request waiting for the wake-up hears of the shutdown
        with pytest.raises(EngineDeadError):
            await asleep
        return before, states, after1, after2, level0, *end
    before, states, after1, after2, level0, sleeping_end, paused_end = run(main())
    assert states == [False, True, True, False, False]
    assert after1 == before and after2 == before
    assert level0 == (True, True) and not sleeping_end and not paused_end
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert before == want[0, 3:].tolist()


def test_a_request_arriving_while_sleep_drains_waits_for_the_wake_up(tiny_llama_path):
    """sleep(mode="wait") drains in-flight requests before it releases memory; a generate that
    starts during that drain waits for wake_up() (it must not reach an engine that is about to
    sleep, nor fail), then gives the tokens HF's greedy decode gives."""
    eng = make(tiny_llama_path, enable_sleep_mode=True)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=FINAL_ONLY)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, output_kind=FINAL_ONLY)

    async def main():
        running = asyncio.create_task(collect(eng, [7, 8, 9], long, "r0"))
        await asyncio.sleep(0.02)
        sleeping = asyncio.create_task(eng.sleep(level=1, mode="wait"))
        await asyncio.sleep(0)  # sleep() has begun its drain
        late = asyncio.create_task(collect(eng, [4, 5, 6], sp, "r1"))
        await sleeping
        await asyncio.sleep(0.05)
        waited = not late.done() and await eng.is_sleeping()
        await eng.wake_up()
        return waited, (await running)[-1].outputs[0], (await late)[-1].outputs[0]
    waited, first, second = run(main())
    eng.shutdown()
    assert waited and first.finish_reason == "length" and len(first.token_ids) == 40
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert second.token_ids == want[0, 3:].tolist()


def test_shutdown_with_requests_in_flight_ends_promptly(tiny_llama_path):
    eng = make(tiny_llama_path)

    async def main():
        started = asyncio.Semaphore(0)

        async def one(i):
            last = None
            async for o in eng.generate([3, 4, 5 + i], SamplingParams(max_tokens=200, ignore_eos=True), f"sd-{i}"):
                if last is None:
                    started.release()
                last = o
            return last
        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        for _ in range(8):
            await started.acquire()
        t0 = time.perf_counter()
        eng.shutdown()
        took = time.perf_counter() - t0
        outs = await asyncio.gather(*tasks)
        with pytest.raises(EngineDeadError):
            await collect(eng, [3, 4], SamplingParams(max_tokens=2), "after")
        with pytest.raises(EngineDeadError):
            await eng.check_health()
        return took, outs
    took, outs = run(main())
    assert took < 1.0 and eng.errored and not eng.is_running
    assert all(o.finished for o in outs) and {o.outputs[0].finish_reason for o in outs} == {"abort"}


class _Extension:
    def scaled_rank(self, x):
        return (self.rank + 1) * x


def test_engine_args_rpc_and_unsupported_options(tiny_chat_model_path, engine):
    assert AsyncLLMEngine is AsyncLLM
    eng = AsyncLLM.from_vllm_config(AsyncEngineArgs(
        model=tiny_chat_model_path, worker_extension_cls=f"{__name__}._Extension", enable_log_requests=True,
        disable_log_stats=True, **KW).create_engine_config())

    async def main():
        got = [await eng.collective_rpc("scaled_rank", args=(7,)), await eng.collective_rpc("report_device_id"),
               await eng.reset_prefix_cache(), await eng.check_health()]
        with pytest.raises(AttributeError, match="no method 'nope'"):
            await eng.collective_rpc("nope")
        with pytest.raises(ValueError, match="LoRA"):
            [o async for o in eng.generate("x", SamplingParams(), "r1", lora_request=object())]
        with pytest.raises(TypeError, match="priority"):
            [o async for o in eng.generate("x", SamplingParams(), "r2", priority=3)]
        with pytest.raises(ValueError, match="mode="):
            await eng.pause_generation(mode="drain")
        with pytest.raises(ValueError, match="multi-modal"):
            [o async for o in eng.generate({"prompt": "x", "multi_modal_data": {"image": object()}}, SamplingParams(),
                                           "r3")]
        return got
    got = run(main())
    assert got == [[7], ["cpu"], True, None]
    assert eng.get_tokenizer().encode("Hello") == engine.get_tokenizer().encode("Hello") != []
    eng.shutdown()
    with pytest.raises(ValueError, match="AsyncEngineArgs: quantization"):
        make(tiny_chat_model_path, quantization="awq")
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lora_rank_x'"):
        make(tiny_chat_model_path, max_lora_rank_x=8)
    with pytest.raises(ValueError, match="output_kind|RequestOutputKind"):
        SamplingParams(output_kind=7)
