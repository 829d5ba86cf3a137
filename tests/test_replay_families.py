"""Routing replay in the trainer (atom.fidelity.routing_replay) for Mixtral, GPT-OSS and DeepSeek-V3,
with the routed experts the engine captured (tests/test_routed_experts.py has Qwen3-MoE's).

The reference for "the trainer uses exactly the captured experts" is HF's own router code with
only its final top-k pick forced to the captured ids (`forced_picks`: torch.topk patched to return
them): HF then computes the weights of those ids itself (softmax / renormalisation, GPT-OSS's
softmax over the chosen logits, DeepSeek's sigmoid without the correction bias, its
normalisation and routed_scaling_factor). A replay that picks other experts or weighs them
otherwise than HF would gives other logprobs and router gradients than this reference."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from atom import RolloutEngine, SamplingParams
from atom.fidelity import moe_routers, pad_routed, routing_replay
from conftest import TINY_VOCAB, build_tiny_model
from helpers import random_prompts
from test_routed_experts_families import FAMILIES, HF_ROUTERS, TOP_K, hf_picks


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def rollout(request, make_tiny_model):
    """(arch, overrides, moe layers, prompt, completion): one sampled completion with raw
    logprobs and its routed experts, from the unperturbed checkpoint."""
    arch, overrides, moe_layers = FAMILIES[request.param]
    engine = RolloutEngine(make_tiny_model(arch, **overrides), device="cpu", num_kv_blocks=32, max_model_len=64,
                           enable_return_routed_experts=True)
    prompt = random_prompts([14], TINY_VOCAB, seed=31)[0]
    c = engine.generate([prompt], SamplingParams(temperature=1.0, seed=6, max_tokens=10, ignore_eos=True, logprobs=0,
                                                 logprobs_mode="raw", return_routed_experts=True))[0].outputs[0]
    return arch, overrides, moe_layers, prompt, c


def logprobs(model, ids: list[int], first: int) -> torch.Tensor:
    """log p(ids[p] | ids[:p]) for p in [first, len(ids)), one forward over ids (as a trainer does)."""
    logits = model(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return lp[first - 1:-1].gather(-1, torch.tensor(ids[first:])[:, None]).squeeze(-1)


def padded(c, moe_layers: int) -> torch.Tensor:
    """[len(ids), moe_layers, top_k]: the captured rows and -1 (own routing) for the last token."""
    ids = len(c.routed_experts) + 1
    return pad_routed([c.routed_experts], ids, moe_layers, TOP_K)[0]


@contextlib.contextmanager
def recorded_picks(model):
    """Yields a list that receives, per MoE layer in order, the ids each router hands its experts
    (stack(picks, 1)[:-1]: the rows of the captured positions)."""
    picks = []
    routers = [m for m in model.modules() if type(m).__name__ in HF_ROUTERS]
    hooks = [r.register_forward_hook(lambda mod, args, out: picks.append(out[2].detach())) for r in routers]
    try:
        yield picks
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def forced_picks(model, routed: np.ndarray):
    """HF's routers unchanged except that the top-k over all experts which picks the experts
    returns routed[:, layer] ([tokens, layers, top_k]). The group top-k of DeepSeek runs over
    groups (another shape) and is left alone."""
    real_topk, state = torch.topk, {}
    routers = [m for m in model.modules() if type(m).__name__ in HF_ROUTERS]
    forced = torch.as_tensor(routed).long()

    def topk(input, k, dim=-1, largest=True, sorted=True):
        got = real_topk(input, k, dim=dim, largest=largest, sorted=sorted)
        ids = state.get("ids")
        if ids is None or input.dim() != 2 or input.shape[1] != state["experts"] or k != ids.shape[1]:
            return got
        ids = torch.where((ids < 0).any(-1, keepdim=True), got[1], ids)  # -1: HF's own pick
        return torch.return_types.topk((input.gather(-1, ids), ids))

    def enter(layer, router):
        def hook(mod, args):
            state.update(ids=forced[:, layer], experts=router.weight.shape[0])
        return hook
    hooks = [r.register_forward_pre_hook(enter(i, r)) for i, r in enumerate(routers)]
    torch.topk = topk
    try:
        yield
    finally:
        torch.topk = real_topk
        for h in hooks:
            h.remove()


def drift(model, scale: float = 0.02) -> None:
    """The trainer's routers move a little (an optimizer step): weight, GPT-OSS's bias, DeepSeek's
    correction bias."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in moe_routers(model):
            r.weight.add_(scale * torch.randn(r.weight.shape, generator=g))
            for name in ("bias", "e_score_correction_bias"):
                if getattr(r, name, None) is not None:
                    getattr(r, name).add_(scale * 5 * torch.randn(r.weight.shape[0], generator=g))


def test_replay_of_the_rollout_reproduces_hf_and_the_engine(rollout):
    """Same weights: replaying the captured experts gives HF's own logprobs and the rollout's."""
    arch, overrides, moe_layers, prompt, c = rollout
    ids, trainer = prompt + c.token_ids, build_tiny_model(arch, **overrides)
    with torch.no_grad():
        own = logprobs(trainer, ids, len(prompt))
        with recorded_picks(trainer) as picks, routing_replay(trainer, padded(c, moe_layers)):
            got = logprobs(trainer, ids, len(prompt))
    np.testing.assert_array_equal(torch.stack(picks, 1)[:-1].numpy(), c.routed_experts)  # the captured order too
    torch.testing.assert_close(got, own, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, torch.tensor(c.logprobs), atol=1e-4, rtol=0)


def test_replay_on_a_drifted_trainer_uses_exactly_the_captured_experts(rollout):
    """The drifted trainer's own routing picks other experts for some tokens; under replay its
    logprobs equal the forced-pick HF reference's, and differ from its own routing's."""
    arch, overrides, moe_layers, prompt, c = rollout
    ids, trainer = prompt + c.token_ids, build_tiny_model(arch, **overrides)
    drift(trainer)
    assert (hf_picks(trainer, ids) != np.sort(c.routed_experts, -1)).any(), "the drift must change some routing"
    with torch.no_grad():
        own = logprobs(trainer, ids, len(prompt))
        with forced_picks(trainer, padded(c, moe_layers)):
            want = logprobs(trainer, ids, len(prompt))
        with recorded_picks(trainer) as picks, routing_replay(trainer, padded(c, moe_layers)[None]):
            got = logprobs(trainer, ids, len(prompt))
    np.testing.assert_array_equal(torch.stack(picks, 1)[:-1].numpy(), c.routed_experts)
    assert (want - own).abs().max() > 1e-3, "the forced experts must matter"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_deepseek_correction_bias_only_picks(make_tiny_model):
    """DeepSeek's e_score_correction_bias changes which experts are picked, never their weights:
    a trainer whose biases moved routes elsewhere, and under replay gives the rollout's logprobs."""
    arch, overrides, moe_layers = FAMILIES["deepseek_v3"]
    engine = RolloutEngine(make_tiny_model(arch, **overrides), device="cpu", num_kv_blocks=32, max_model_len=64,
                           enable_return_routed_experts=True)
    prompt = random_prompts([14], TINY_VOCAB, seed=32)[0]
    c = engine.generate([prompt], SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, logprobs=0,
                                                 logprobs_mode="raw", return_routed_experts=True))[0].outputs[0]
    ids, trainer = prompt + c.token_ids, build_tiny_model(arch, **overrides)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for r in moe_routers(trainer):
            r.e_score_correction_bias.add_(0.3 * torch.randn(r.e_score_correction_bias.shape, generator=g))
    assert (hf_picks(trainer, ids) != np.sort(c.routed_experts, -1)).any()
    rollout_lp = torch.tensor(c.logprobs)
    with torch.no_grad():
        assert (logprobs(trainer, ids, len(prompt)) - rollout_lp).abs().max() > 1e-3
        with routing_replay(trainer, padded(c, moe_layers)):
            torch.testing.assert_close(logprobs(trainer, ids, len(prompt)), rollout_lp, atol=1e-4, rtol=0)


def _router_grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for r in moe_routers(model) for p in r.parameters()]


def test_replay_gradients_reach_the_routers_as_in_the_reference(rollout):
    """d(sum of the completion's logprobs)/d(router parameters) under replay equals autograd
    through the forced-pick HF reference, and central finite differences in float64."""
    arch, overrides, moe_layers, prompt, c = rollout
    ids, trainer = prompt + c.token_ids, build_tiny_model(arch, **overrides)
    drift(trainer)
    with routing_replay(trainer, padded(c, moe_layers)):
        logprobs(trainer, ids, len(prompt)).sum().backward()
    got = _router_grads(trainer)
    assert all(g.abs().sum() > 0 for g in got)
    trainer.zero_grad()
    with forced_picks(trainer, padded(c, moe_layers)):
        logprobs(trainer, ids, len(prompt)).sum().backward()
    for g, want in zip(got, _router_grads(trainer)):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)
    # Central differences of the loss in float64 (HF's RMSNorm and DeepSeek's router still round to
    # float32 inside: eps 1e-2 keeps that noise at ~1e-5 relative, the O(eps^2) error at ~1e-4).
    trainer.double()
    trainer.config._experts_implementation = "eager"  # grouped_mm has no float64
    trainer.zero_grad()
    with routing_replay(trainer, padded(c, moe_layers)):
        logprobs(trainer, ids, len(prompt)).sum().backward()
    weight = moe_routers(trainer)[-1].weight
    grad, eps = weight.grad, 1e-2
    for flat in grad.view(-1).abs().topk(3).indices.tolist():  # entries that matter (unpicked experts get 0)
        diffs = []
        for sign in (1, -1):
            with torch.no_grad(), routing_replay(trainer, padded(c, moe_layers)):
                weight.view(-1)[flat] += sign * eps
                diffs.append(logprobs(trainer, ids, len(prompt)).sum().item())
                weight.view(-1)[flat] -= sign * eps
        fd = (diffs[0] - diffs[1]) / (2 * eps)
        assert abs(fd - grad.view(-1)[flat].item()) < 1e-3 * abs(fd), (fd, grad.view(-1)[flat].item())


def test_replay_rejects_bad_input_by_name_and_restores_forwards(make_tiny_model):
    from helpers import hf_model
    with pytest.raises(ValueError, match="no MoE router modules"):
        routing_replay(hf_model(make_tiny_model("llama")), torch.zeros(4, 1, 2, dtype=torch.long)).__enter__()

    class OtherRouter(torch.nn.Module):  # a router class replay does not know how to weigh
        pass
    with pytest.raises(ValueError, match=r"\['OtherRouter'\] are not supported"):
        routing_replay(torch.nn.Sequential(OtherRouter()), torch.zeros(4, 1, 2, dtype=torch.long)).__enter__()
    arch, overrides, moe_layers = FAMILIES["deepseek_v3"]
    model = build_tiny_model(arch, **overrides)
    ok = torch.zeros(6, moe_layers, TOP_K, dtype=torch.long)
    for routed, error, match in [
            (torch.zeros(6, moe_layers + 2, TOP_K, dtype=torch.long), ValueError, "2 MoE layers"),  # not 4 layers
            (torch.zeros(6, moe_layers, 3, dtype=torch.long), ValueError, "top_k 3"),
            (ok + 8, ValueError, "8 experts"),
            (ok - 2, ValueError, "expert ids in"),
            (ok.float(), TypeError, "integer expert ids")]:
        with pytest.raises(error, match=match):
            routing_replay(model, routed).__enter__()
    with pytest.raises(ValueError, match="5 tokens x top_k 2, the replayed routing \\(6, 2\\)"):
        with routing_replay(model, ok):
            model(torch.tensor([[3, 4, 5, 6, 7]]))
    assert all("forward" not in r.__dict__ for r in moe_routers(model))  # restored after the exception
    router = moe_routers(model)[0]  # a router of another transformers version: logits only
    router.__class__ = type("LogitsOnly", (type(router),), {"forward": lambda self, h: h @ self.weight.T})
    with pytest.raises(ValueError, match="LogitsOnly.forward returned Tensor, not \\(logits, weights, ids\\)"):
        with routing_replay(model, ok[None, :3]):
            model(torch.tensor([[3, 4, 5]]))
    router.__class__ = type(router).__mro__[1]
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([[3, 4, 5]])).logits,
                                   build_tiny_model(arch, **overrides)(torch.tensor([[3, 4, 5]])).logits)


def test_replay_finds_routers_renamed_by_fully_shard(rollout):
    """FSDP2's fully_shard swaps a module's class for a subclass named FSDP<Class>: still replayed."""
    arch, overrides, moe_layers, prompt, c = rollout
    ids, trainer = prompt + c.token_ids, build_tiny_model(arch, **overrides)
    drift(trainer)
    for r in moe_routers(trainer):
        r.__class__ = type(f"FSDP{type(r).__name__}", (type(r),), {})
    assert all(type(r).__name__.startswith("FSDP") for r in moe_routers(trainer))
    seen = []
    hooks = [r.register_forward_hook(lambda mod, args, out: seen.append(out[2])) for r in moe_routers(trainer)]
    with torch.no_grad(), routing_replay(trainer, padded(c, moe_layers)):
        logprobs(trainer, ids, len(prompt))
    for h in hooks:
        h.remove()
    np.testing.assert_array_equal(torch.stack(seen, 1)[:-1].numpy(), c.routed_experts)
