"""Prompt twins: requests with the same prompt that arrive separately (a GRPO group sent as n=1
requests) share one prefill, as the n samples of one request do, and give the tokens each would
give alone (a seeded request's tokens depend only on its seed and positions)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from atom import RolloutEngine, SamplingParams
from helpers import random_prompts

KW = dict(device="cpu", num_kv_blocks=128, max_num_seqs=16, max_model_len=160)


def sp(seed: int, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": seed, "max_tokens": 6, "logprobs": 0, "ignore_eos": True, **kw})


def run_all(engine, record=None) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        if record is not None:
            record.append({o.request_id: [len(c.token_ids) for c in o.outputs] for o in outs})
        done.update((o.request_id, o) for o in outs if o.finished)
    return done


def alone(path, prompt, params, **kw) -> list[list[int]]:
    out = RolloutEngine(path, **{**KW, **kw}).generate([prompt], params)[0]
    return [c.token_ids for c in out.outputs]


def delta(engine, before) -> dict:
    return {k: getattr(engine.stats, k) - v for k, v in dataclasses.asdict(before).items()}


@pytest.mark.parametrize("overlap", [False, True])
def test_eight_requests_with_one_prompt_share_one_prefill(tiny_qwen3_path, overlap):
    engine = RolloutEngine(tiny_qwen3_path, **KW, overlap_decode=overlap)
    prompt = random_prompts([40], 256, seed=1)[0]  # 2 full blocks + 8 tokens
    s0 = dataclasses.replace(engine.stats)
    for i in range(8):
        engine.add_request(f"r{i}", prompt, sp(100 + i))
    record = []
    done = run_all(engine, record)
    d = delta(engine, s0)
    assert d["prompt_tokens_computed"] == 40 and d["prompt_tokens_cached"] == 7 * 40
    assert record[0] == {f"r{i}": [1] for i in range(8)}  # every first token from the one prefill
    for i in (0, 5, 7):
        got = done[f"r{i}"].outputs[0]
        assert [got.token_ids] == alone(tiny_qwen3_path, prompt, sp(100 + i))
    ref = RolloutEngine(tiny_qwen3_path, **KW).generate([prompt], sp(107))[0].outputs[0]
    torch.testing.assert_close(done["r7"].outputs[0].logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert engine.num_free_kv_blocks == engine.num_kv_blocks


def test_twin_with_n_samples_and_different_params(tiny_qwen3_path):
    """A twin forks its own n samples off its leader's KV; its own parameters apply."""
    engine = RolloutEngine(tiny_qwen3_path, **KW)
    prompt = random_prompts([37], 256, seed=2)[0]
    lead, twin = sp(1, max_tokens=4), sp(2, n=3, top_k=5, temperature=0.7, max_tokens=9)
    s0 = dataclasses.replace(engine.stats)
    engine.add_request("lead", prompt, lead)
    engine.add_request("twin", prompt, twin)
    done = run_all(engine)
    assert delta(engine, s0)["prompt_tokens_computed"] == 37
    assert [c.token_ids for c in done["twin"].outputs] == alone(tiny_qwen3_path, prompt, twin)
    assert [c.token_ids for c in done["lead"].outputs] == alone(tiny_qwen3_path, prompt, lead)


def test_twins_follow_a_chunked_prefill_and_survive_their_leaders_abort(tiny_qwen3_path):
    """Budget 32, prompt 100: the leader needs four steps. A twin aborted on the way leaves the
    others alone; when the leader itself is aborted, its twins wait again and run as usual."""
    engine = RolloutEngine(tiny_qwen3_path, **KW, max_num_batched_tokens=32)
    prompt = random_prompts([100], 256, seed=3)[0]
    for i in range(4):
        engine.add_request(f"r{i}", prompt, sp(10 + i))
    assert engine.step() == []  # 32 of 100 prompt tokens: nothing sampled yet
    assert engine.abort(["r2"])["r2"].outputs[0].finish_reason == "abort"
    engine.step()
    assert engine.abort(["r0"])["r0"].outputs[0].token_ids == []  # the leader, before it sampled
    done = run_all(engine)
    assert set(done) == {"r1", "r3"}
    for i in (1, 3):
        assert [done[f"r{i}"].outputs[0].token_ids] == alone(tiny_qwen3_path, prompt, sp(10 + i))
    assert engine.num_free_kv_blocks == engine.num_kv_blocks


def test_leader_preempted_before_it_samples_releases_its_twins(tiny_qwen3_path):
    """pause(keep) mid-prefill then resume(recompute_kv=True) preempts every running sequence."""
    engine = RolloutEngine(tiny_qwen3_path, **KW, max_num_batched_tokens=32)
    prompt = random_prompts([70], 256, seed=4)[0]
    for i in range(3):
        engine.add_request(f"r{i}", prompt, sp(20 + i))
    engine.step()
    engine.pause_generation("keep")
    engine.resume_generation(recompute_kv=True)
    done = run_all(engine)
    for i in range(3):
        assert [done[f"r{i}"].outputs[0].token_ids] == alone(tiny_qwen3_path, prompt, sp(20 + i))
    assert engine.num_free_kv_blocks == engine.num_kv_blocks


def test_twins_take_seats_under_max_num_seqs(tiny_qwen3_path):
    engine = RolloutEngine(tiny_qwen3_path, **{**KW, "max_num_seqs": 3})
    prompt = random_prompts([24], 256, seed=5)[0]
    for i in range(7):
        engine.add_request(f"r{i}", prompt, sp(30 + i, max_tokens=3))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        assert engine.num_running_sequences <= 3
    assert [done["r6"].outputs[0].token_ids] == alone(tiny_qwen3_path, prompt, sp(36, max_tokens=3))


def test_who_does_not_follow(tiny_qwen3_path):
    """Prompt logprobs need the twin's own positions; prefix caching off shares nothing."""
    prompt = random_prompts([30], 256, seed=6)[0]
    engine = RolloutEngine(tiny_qwen3_path, **KW)
    engine.add_request("a", prompt, sp(1))
    engine.add_request("b", prompt, sp(2, prompt_logprobs=1))
    s0 = dataclasses.replace(engine.stats)
    done = run_all(engine)
    assert delta(engine, s0)["prompt_tokens_computed"] == 2 * 30
    want = RolloutEngine(tiny_qwen3_path, **KW).generate([prompt], sp(2, prompt_logprobs=1))[0]
    got = done["b"].prompt_logprobs
    assert got[0] is None and len(got) == 30
    for g, w in zip(got[1:], want.prompt_logprobs[1:]):
        assert g.keys() == w.keys() and g == pytest.approx(w, abs=1e-5)
    off = RolloutEngine(tiny_qwen3_path, **KW, enable_prefix_caching=False)
    for i in range(3):
        off.add_request(f"r{i}", prompt, sp(i))
    s0 = dataclasses.replace(off.stats)
    run_all(off)
    assert delta(off, s0)["prompt_tokens_computed"] == 3 * 30


def test_copies_after_the_leader_sampled_follow_one_cache_hit(tiny_llama_path):
    """Copies that arrive once the leader has sampled: the first takes the cached blocks and
    computes the rest (a prompt of whole blocks: its last block), the others follow it."""
    engine = RolloutEngine(tiny_llama_path, **KW)
    prompt = random_prompts([48], 256, seed=7)[0]
    engine.add_request("lead", prompt, sp(1, max_tokens=8))
    engine.step()
    s0 = dataclasses.replace(engine.stats)
    for i in range(3):
        engine.add_request(f"c{i}", prompt, sp(2 + i, max_tokens=8))
    first = {o.request_id: len(o.outputs[0].token_ids) for o in engine.step()}
    assert first == {"lead": 2, "c0": 1, "c1": 1, "c2": 1}
    assert delta(engine, s0)["prompt_tokens_computed"] == 16
    done = run_all(engine)
    assert [done["c2"].outputs[0].token_ids] == alone(tiny_llama_path, prompt, sp(4, max_tokens=8))


def test_no_waiting_for_a_block_the_cache_cannot_serve(tiny_llama_path):
    """A prompt of whole blocks (48) behind a longer one that extends it (53), budget 40: after
    step 1 its first two blocks are cached; its third is still being computed by the longer one,
    but a prompt's last block is always recomputed, so it starts at once (it used to wait)."""
    engine = RolloutEngine(tiny_llama_path, **KW, max_num_batched_tokens=40)
    short = random_prompts([48], 256, seed=8)[0]
    long = short + random_prompts([5], 256, seed=9)[0]
    engine.add_request("long", long, sp(1))
    engine.add_request("short", short, sp(2))
    assert engine.step() == []
    assert {o.request_id for o in engine.step()} == {"long", "short"}
    assert engine.stats.prompt_tokens_computed == 53 + 16
    done = run_all(engine)
    assert [done["short"].outputs[0].token_ids] == alone(tiny_llama_path, short, sp(2))
