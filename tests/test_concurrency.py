"""Several threads on one RolloutEngine: calls take turns; no crash, no wrong token."""
from __future__ import annotations

import sys
import threading

import pytest

from atom import RolloutEngine, SamplingParams
from helpers import random_prompts

KW = dict(device="cpu", num_kv_blocks=64, max_num_seqs=8, max_model_len=64)


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_threads_calling_generate_and_sleep_at_once(tiny_qwen3_path, fast_switching):
    engine = RolloutEngine(tiny_qwen3_path, **KW)
    prompts = random_prompts([5, 9, 14], 256, seed=2)
    params = [SamplingParams(n=2, temperature=1.0, seed=s, max_tokens=6, ignore_eos=True) for s in range(3)]
    expected = [[c.token_ids for c in o.outputs] for o in engine.generate(prompts, params)]
    errors: list[BaseException] = []
    refused: list[str] = []
    results: list = []

    def generate():
        for _ in range(3):
            try:
                results.append([[c.token_ids for c in o.outputs] for o in engine.generate(prompts, params)])
            except RuntimeError as e:  # the one clear refusal: it ran between sleep and wake_up
                (refused if "sleeping" in str(e) else errors).append(str(e))
            except BaseException as e:  # anything else breaks the guarantee
                errors.append(e)

    def sleeper():
        try:
            for _ in range(3):
                engine.sleep()
                engine.wake_up()
        except BaseException as e:
            errors.append(e)

    for trial in range(8):
        threads = [threading.Thread(target=generate) for _ in range(3)] + [threading.Thread(target=sleeper)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), f"trial {trial}: a call hung"
    assert not errors, errors[:3]
    assert len(results) + len(refused) == 8 * 3 * 3 and len(results) > 0
    assert all(r == expected for r in results)
    assert engine.num_free_kv_blocks == engine.num_kv_blocks and not engine.is_sleeping


def test_threads_adding_and_stepping_requests(tiny_qwen3_path, fast_switching):
    engine = RolloutEngine(tiny_qwen3_path, **KW)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = engine.generate([[3, 4, 5]], sp)[0].outputs[0].token_ids
    done: dict = {}
    errors: list[BaseException] = []

    def worker(k):
        try:
            for i in range(10):
                engine.add_request(f"{k}-{i}", [3, 4, 5], sp)
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.outputs[0].token_ids
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert not errors, errors[:3]
    bad = {k: v for k, v in done.items() if v != expected}
    assert len(done) == 40 and not bad, (expected, bad)
