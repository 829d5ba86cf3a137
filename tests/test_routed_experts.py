"""Routed-expert capture (return_routed_experts) against HF's routers, on every path, and routing
replay in the trainer (atom.fidelity)."""
from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch

from atom import AsyncRolloutEngine, RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import hf_model, random_prompts

TOP_K = 2


@pytest.fixture(scope="module")
def path(make_tiny_model):
    return make_tiny_model("qwen3_moe")


def make(path, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("num_kv_blocks", 64)
    return RolloutEngine(path, enable_return_routed_experts=True, max_model_len=128, **kw)


def hf_routing(path, token_ids: list[int]) -> np.ndarray:
    """[len - 1, layers, top_k] experts HF's routers pick for positions [0, len - 1), sorted."""
    with torch.no_grad():
        out = hf_model(path)(torch.tensor([token_ids]), output_router_logits=True)
    picks = [torch.topk(torch.softmax(lg.float(), -1), TOP_K, -1).indices for lg in out.router_logits]
    return np.sort(torch.stack(picks, 1).numpy()[: len(token_ids) - 1], axis=-1)


def check(path, out):
    for c in out.outputs:
        r = c.routed_experts
        ids = out.prompt_token_ids + c.token_ids
        assert r is not None and r.dtype == np.int32 and r.shape == (len(ids) - 1, 2, TOP_K)
        np.testing.assert_array_equal(np.sort(r, axis=-1), hf_routing(path, ids))


SP = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, return_routed_experts=True)


@pytest.fixture
def small_slabs(monkeypatch):
    """The host store's slabs hold a few sequences, max_tokens=None ranges start 2 rows long:
    every step scatters into several slabs and ranges grow (atom/engine/routing.py)."""
    from atom.engine import routing
    monkeypatch.setattr(routing, "_MIN_SLAB_BYTES", 4 * 2 * TOP_K * 64)
    monkeypatch.setattr(routing, "_UNBOUNDED_ROWS", 2)


@pytest.mark.parametrize("case", ["plain", "chunked", "preempted", "cached_prefix", "slabs"])
def test_capture_equals_hf_routers(path, case, request):
    kw = {"chunked": dict(max_num_batched_tokens=8), "preempted": dict(num_kv_blocks=7, max_num_seqs=6)}.get(case, {})
    if case == "slabs":
        request.getfixturevalue("small_slabs")
    engine = make(path, **kw)
    prompts = random_prompts([33, 20, 9], TINY_VOCAB, seed=7)
    if case == "cached_prefix":  # the same prompts computed once already: capture still covers them
        engine.generate(prompts, SamplingParams(max_tokens=2))
    outs = engine.generate(prompts, SP)
    if case == "preempted":
        assert engine.stats.preemptions > 0
    for out in outs:
        check(path, out)


def test_capture_on_the_overlapped_decode_path_and_async(path, small_slabs):
    engine = make(path, overlap_decode=True)  # the GPU decode path, run on the CPU
    prompts = random_prompts([17, 26], TINY_VOCAB, seed=8)
    for out in engine.generate(prompts, SP):
        check(path, out)
    unbounded = dataclasses.replace(SP, max_tokens=None, ignore_eos=False)  # ranges grow
    for out in engine.generate(prompts, unbounded):
        check(path, out)
    front = AsyncRolloutEngine(engine)

    async def main():
        return await asyncio.gather(*(front.generate(p, SP) for p in prompts))
    outs = asyncio.run(main())
    front.close()
    for out in outs:
        check(path, out)


@pytest.mark.parametrize("overlap", [False, True])
def test_capture_through_step_and_abort(path, overlap):
    """Outputs of running requests (step API) are copies that later steps leave alone; an abort
    mid-prompt returns the positions that ran and -1 for the others; one mid-decode, all of them."""
    engine = make(path, max_num_batched_tokens=8, overlap_decode=overlap)
    prompts = random_prompts([30, 12], TINY_VOCAB, seed=11)
    engine.add_request("a", prompts[0], SP)
    engine.add_request("b", prompts[1], SP)
    engine.step()  # 8 tokens of a's prompt
    mid = engine.abort("a")["a"].outputs[0]
    assert mid.token_ids == [] and mid.routed_experts.shape == (29, 2, TOP_K)
    np.testing.assert_array_equal(np.sort(mid.routed_experts[:8], -1), hf_routing(path, prompts[0])[:8])
    assert (mid.routed_experts[8:] == -1).all()
    seen = {}
    for _ in range(8):
        for out in engine.step():
            for c in out.outputs:
                if c.routed_experts is not None and c.token_ids:
                    seen[c.index] = (c.routed_experts, c.routed_experts.copy(), prompts[1] + c.token_ids)
    assert seen
    for got, snapshot, ids in seen.values():
        np.testing.assert_array_equal(np.sort(got, -1), hf_routing(path, ids))
    done = engine.abort("b")["b"]
    check(path, done)
    for got, snapshot, _ in seen.values():
        np.testing.assert_array_equal(got, snapshot)


def test_capture_off_costs_nothing_and_needs_the_engine_flag(path):
    assert make(path).generate([[3, 4, 5]], SamplingParams(max_tokens=3))[0].outputs[0].routed_experts is None
    plain = RolloutEngine(path, device="cpu", num_kv_blocks=16)
    with pytest.raises(ValueError, match="enable_return_routed_experts"):
        plain.generate([[3, 4, 5]], SamplingParams(return_routed_experts=True))
    with pytest.raises(ValueError, match="return_routed_experts"):
        SamplingParams(return_routed_experts="yes")


def _trainer_logprobs(model, ids: list[int], first: int) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return torch.stack([lp[p - 1, ids[p]] for p in range(first, len(ids))])


def test_replay_makes_the_trainer_route_like_the_rollout(path, make_tiny_model):
    from atom.fidelity import moe_routers, pad_routed, routing_replay
    from conftest import build_tiny_model
    engine = make(path)
    prompt = random_prompts([24], TINY_VOCAB, seed=9)[0]
    c = engine.generate([prompt], SamplingParams(temperature=1.0, seed=2, max_tokens=16, logprobs=0,
                                                 logprobs_mode="raw", ignore_eos=True,
                                                 return_routed_experts=True))[0].outputs[0]
    ids, rollout = prompt + c.token_ids, torch.tensor(c.logprobs)
    trainer = build_tiny_model("qwen3_moe")  # the same weights: replay reproduces the rollout exactly
    routed = pad_routed([c.routed_experts], len(ids), 2, TOP_K)
    with torch.no_grad(), routing_replay(trainer, routed):
        torch.testing.assert_close(_trainer_logprobs(trainer, ids, len(prompt)), rollout, atol=1e-4, rtol=0)
    with torch.no_grad():  # then a slightly different router: some tokens would go elsewhere
        for r in moe_routers(trainer):
            r.weight.add_(0.003 * torch.randn(r.weight.shape, generator=torch.Generator().manual_seed(3)))
    own = hf_routing_of(trainer, ids)
    assert (np.sort(own, -1) != np.sort(c.routed_experts, -1)).any(), "the perturbation must change some routing"
    with torch.no_grad():
        free = _trainer_logprobs(trainer, ids, len(prompt))
        with routing_replay(trainer, pad_routed([c.routed_experts], len(ids), 2, TOP_K)):
            replayed = _trainer_logprobs(trainer, ids, len(prompt))
    gap_free, gap_replay = (free - rollout).abs().max().item(), (replayed - rollout).abs().max().item()
    # Replay removes the discrete jumps (other experts); what is left is the router weights' own change.
    assert gap_replay < 0.15 and gap_replay < gap_free / 5, (gap_free, gap_replay)
    # Gradients reach the router through the replayed experts' weights.
    with routing_replay(trainer, pad_routed([c.routed_experts], len(ids), 2, TOP_K)):
        _trainer_logprobs(trainer, ids, len(prompt)).sum().backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in moe_routers(trainer))


def hf_routing_of(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    picks = [torch.topk(torch.softmax(lg.float(), -1), TOP_K, -1).indices for lg in out.router_logits]
    return torch.stack(picks, 1).numpy()[: len(ids) - 1]


def test_replay_gradient_matches_a_hand_written_router(path):
    """d(loss)/d(router weight) under replay equals the gradient of softmax-gather-renormalise
    written out by hand for one layer's router."""
    from atom.fidelity import _replayed_forward
    from conftest import build_tiny_model
    router = build_tiny_model("qwen3_moe").model.layers[0].mlp.gate
    h = torch.randn(10, router.weight.shape[1])
    replay = torch.randint(0, router.weight.shape[0], (10, TOP_K))
    replay[:, 1] = (replay[:, 0] + 1) % router.weight.shape[0]
    _, scores, got_ids = _replayed_forward(router, replay)(h)
    assert torch.equal(got_ids, replay)
    scores.pow(2).sum().backward()
    g = router.weight.grad.clone()
    w = router.weight.detach().clone().requires_grad_(True)
    p = torch.softmax(h @ w.T, -1).gather(-1, replay)
    (p / p.sum(-1, keepdim=True)).pow(2).sum().backward()
    torch.testing.assert_close(g, w.grad)


def test_rollout_job_writes_routed_experts(path, tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from atom.rollout.job import run
    from test_rollout_job import CONFIG_DIR
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": [5 + i, 9, 11, 40]}) + "\n" for i in range(3)))
    out = tmp_path / "r.jsonl"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("rollout", overrides=[
            "model=tiny_qwen3_moe", f"model.path={path}", f"data.path={prompts}", f"output.path={out}",
            "engine=cpu", "engine.num_kv_blocks=32", "sampling.max_tokens=5", "sampling.ignore_eos=true",
            "sampling.return_routed_experts=true", "engine.enable_return_routed_experts=true", "output.progress=false"])
    run(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        c = r["completions"][0]
        ids = r["prompt_token_ids"] + c["token_ids"]
        np.testing.assert_array_equal(np.sort(np.array(c["routed_experts"]), -1), hf_routing(path, ids))
