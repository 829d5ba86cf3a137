"""The engine core one request at a time: add_request / step / abort / pause / resume on the
synchronous RolloutEngine, checked against HF transformers and against the batch call."""
from __future__ import annotations

import pytest
import torch

from _rl_util import changed_model
from atom import RolloutEngine, SamplingParams
from helpers import hf_logits, random_prompts

KW = dict(device="cpu", num_kv_blocks=96, max_num_seqs=16, max_model_len=160)


@pytest.fixture(scope="module")
def engine(tiny_qwen3_path):
    return RolloutEngine(tiny_qwen3_path, **KW)


def run_all(engine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def raw_logprobs(path, prompt, tokens) -> list[float]:
    """HF's log_softmax of the token each position chose (raw logprobs)."""
    logits = hf_logits(path, prompt + tokens)
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def test_seeded_request_arriving_mid_decode_equals_running_alone(engine):
    prompts = random_prompts([20, 9, 33], 256, seed=3)
    late = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=11, max_tokens=12, logprobs=2, ignore_eos=True)
    alone = engine.generate([prompts[2]], late)[0]
    engine.add_request("a", prompts[0], SamplingParams(temperature=0.8, seed=1, max_tokens=30, ignore_eos=True))
    engine.add_request("b", prompts[1], SamplingParams(n=2, temperature=1.0, seed=2, max_tokens=25, ignore_eos=True))
    for _ in range(6):
        engine.step()
    engine.add_request("late", prompts[2], late)
    done = run_all(engine)
    assert set(done) == {"a", "b", "late"}
    got = done["late"]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in alone.outputs]
    # Equal up to float rounding: other rows in the batch change the matmul's blocking (bitwise
    # equality whatever the batch is the batch-invariant mode's job).
    torch.testing.assert_close([c.logprobs for c in got.outputs], [c.logprobs for c in alone.outputs], atol=1e-5, rtol=0)
    assert [[list(t) for t in c.top_logprobs] for c in got.outputs] == \
        [[list(t) for t in c.top_logprobs] for c in alone.outputs]
    assert engine.num_free_kv_blocks == engine.num_kv_blocks


def test_prefix_sharing_across_requests_that_arrive_separately(engine):
    prompt = random_prompts([48], 256, seed=5)[0]
    engine.generate([[7, 7, 7]], SamplingParams(max_tokens=1))  # something unrelated first
    engine.add_request("first", prompt, SamplingParams(temperature=0, max_tokens=4))
    engine.step()
    cached = engine.stats.prompt_tokens_cached
    engine.add_request("second", prompt, SamplingParams(temperature=0, max_tokens=4))
    done = run_all(engine)
    assert engine.stats.prompt_tokens_cached - cached >= 32  # two full blocks of 16 served from the cache
    assert done["first"].outputs[0].token_ids == done["second"].outputs[0].token_ids


def test_abort_returns_partial_completion_with_hf_logprobs(engine, tiny_qwen3_path):
    prompt = random_prompts([17], 256, seed=8)[0]
    sp = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=40, logprobs=0, logprobs_mode="raw", ignore_eos=True)
    free0 = engine.num_free_kv_blocks
    engine.add_request("x", prompt, sp)
    for _ in range(7):
        engine.step()
    result = engine.abort(["x", "never-existed"])
    assert result["never-existed"] is None
    out = result["x"]
    assert out.finished and len(out.outputs) == 2
    for c in out.outputs:
        assert c.finish_reason == "abort"
        assert 0 < len(c.token_ids) < 40 and len(c.logprobs) == len(c.token_ids)
        torch.testing.assert_close(c.logprobs, raw_logprobs(tiny_qwen3_path, prompt, c.token_ids), atol=1e-4, rtol=0)
    assert engine.num_free_kv_blocks == free0  # freed at once
    assert engine.abort("x") == {"x": None}  # finished: a no-op that says so
    assert not engine.has_unfinished_requests()


def test_abort_during_prefill_returns_n_empty_completions(engine):
    engine.add_request("p", list(range(2, 100)), SamplingParams(n=3, max_tokens=5))
    out = engine.abort("p")["p"]
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert all(c.token_ids == [] for c in out.outputs)


def test_duplicate_live_request_id_is_rejected(engine):
    engine.add_request("dup", [5, 6, 7], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6, 7], SamplingParams(max_tokens=3))
    with pytest.raises(TypeError, match="request_id"):
        engine.add_request(5, [5, 6, 7])
    done = run_all(engine)
    assert len(done["dup"].outputs[0].token_ids) == 3
    engine.add_request("dup", [5, 6, 7], SamplingParams(max_tokens=3))  # finished ids may be reused
    assert run_all(engine)["dup"].finished


def test_batch_generate_with_requests_in_flight_hands_theirs_back_by_step(engine):
    engine.add_request("bg", [9, 8, 7], SamplingParams(temperature=0, max_tokens=6))
    engine.step()
    outs = engine.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert len(outs) == 1 and len(outs[0].outputs[0].token_ids) == 30
    done = run_all(engine) if engine.has_unfinished_requests() else {}
    for out in engine.step():
        done[out.request_id] = out
    assert done["bg"].finished and len(done["bg"].outputs[0].token_ids) == 6


def test_update_weights_refused_while_requests_run_then_allowed_when_paused(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path, **KW)
    engine.add_request("r", [3, 4, 5], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    with pytest.raises(RuntimeError, match="pause_generation"):
        engine.update_weights([], partial=True)
    with pytest.raises(RuntimeError, match="pause_generation"):
        engine.sleep()
    engine.pause_generation("keep")
    with pytest.raises(RuntimeError, match="paused"):
        engine.generate([[1, 2]])
    assert engine.update_weights([], partial=True) == 1
    engine.resume_generation()
    done = run_all(engine)
    assert len(done["r"].outputs[0].token_ids) == 20


def _old_kv_new_weights_logprobs(old, new, tokens: list[int], kv_len: int) -> list[float]:
    """HF oracle for a kept request: KV of tokens[:kv_len] from the old model, the rest run by
    the new model over that cache; raw logprobs of tokens[kv_len + 1:]."""
    with torch.no_grad():
        past = old(torch.tensor([tokens[:kv_len]]), use_cache=True).past_key_values
        logits = new(torch.tensor([tokens[kv_len:]]), past_key_values=past, use_cache=True).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [lp[i, t].item() for i, t in enumerate(tokens[kv_len + 1:])]


@pytest.mark.parametrize("recompute_kv", [False, True])
def test_pause_keep_update_resume_versions_and_logprobs(tiny_qwen3_path, recompute_kv):
    from helpers import hf_model
    old = hf_model(tiny_qwen3_path)
    new = changed_model(tiny_qwen3_path, seed=3, scale=0.05)
    engine = RolloutEngine(tiny_qwen3_path, **KW)
    prompt = random_prompts([21], 256, seed=9)[0]
    sp = SamplingParams(temperature=1.0, seed=5, max_tokens=24, logprobs=0, logprobs_mode="raw", ignore_eos=True)
    engine.add_request("k", prompt, sp)
    for _ in range(9):
        engine.step()
    engine.pause_generation("keep")
    version = engine.update_weights(((n, p.detach()) for n, p in new.named_parameters()), version="v-new")
    assert version == "v-new"
    engine.resume_generation(recompute_kv=recompute_kv)
    c = run_all(engine)["k"].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 24
    (v0, a0, b0), (v1, a1, b1) = c.weight_versions
    assert (v0, a0) == (0, 0) and (v1, b1) == ("v-new", 24) and a1 == b0 > 0 and c.weight_version == "v-new"
    ids = prompt + c.token_ids
    before = raw_logprobs(tiny_qwen3_path, prompt, c.token_ids[:b0])
    torch.testing.assert_close(c.logprobs[:b0], before, atol=1e-4, rtol=0)
    with torch.no_grad():  # every later token from exactly the new weights over the whole sequence
        lp = torch.log_softmax(new(torch.tensor([ids])).logits[0].float(), dim=-1)
    fresh = [lp[len(prompt) - 1 + i, ids[len(prompt) + i]].item() for i in range(b0, 24)]
    # The new weights over the KV the old ones computed (all but the newest token at the pause).
    mixed = _old_kv_new_weights_logprobs(old, new, ids, len(prompt) + b0 - 1)
    assert max(abs(a - b) for a, b in zip(fresh, mixed)) > 1e-3  # the two oracles tell the modes apart
    torch.testing.assert_close(c.logprobs[b0:], fresh if recompute_kv else mixed, atol=1e-4, rtol=0)


def test_pause_abort_and_wait_and_held_requests(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path, **KW)
    engine.add_request("a", [3, 4, 5], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    aborted = engine.pause_generation("abort")
    assert [o.request_id for o in aborted] == ["a"] and aborted[0].outputs[0].finish_reason == "abort"
    engine.add_request("held", [3, 4, 5], SamplingParams(max_tokens=4, ignore_eos=True))
    assert engine.step() == []  # paused: the new request waits
    engine.resume_generation()
    engine.add_request("w", [6, 7], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.pause_generation("wait")  # runs the admitted requests to completion
    done = {o.request_id: o for o in engine.step()}
    assert done["held"].finished and done["w"].finished
    assert len(done["w"].outputs[0].token_ids) == 5 and not engine.has_unfinished_requests()
    engine.resume_generation()


def test_sleep_while_kept_recomputes_after_wake(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path, **KW)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0)
    expected = engine.generate([[11, 12, 13, 14]], sp)[0].outputs[0]
    engine.add_request("s", [11, 12, 13, 14], sp)
    for _ in range(5):
        engine.step()
    engine.pause_generation("keep")
    engine.sleep(level=1)
    engine.wake_up()
    engine.resume_generation()
    got = run_all(engine)["s"].outputs[0]
    assert got.token_ids == expected.token_ids
    torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-5, rtol=0)
