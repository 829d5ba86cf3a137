"""In-process hot weight reload: RolloutEngine.update_weights and atom.weights_sync.push."""
from __future__ import annotations

import random
import re

import pytest
import torch

from _rl_util import PROMPTS, changed_model, make_engine, rollout, same
from atom import SamplingParams
from atom.models.weights import iter_checkpoint
from atom.weights_sync import push


@pytest.fixture(scope="module")
def moe_pair(make_tiny_model, tmp_path_factory):
    """(base checkpoint, changed checkpoint, changed HF model) of a tiny Qwen3-MoE."""
    base = make_tiny_model("qwen3_moe")
    model = changed_model(base)
    path = str(tmp_path_factory.mktemp("moe_changed"))
    model.save_pretrained(path)
    return base, path, model


@pytest.fixture(scope="module")
def moe_expected(moe_pair):
    return rollout(make_engine(moe_pair[1]))


def test_update_from_trainer_model_matches_fresh_engine(moe_pair, moe_expected):
    """transformers-v5 names (fused experts) from a live model, shuffled: bitwise equal to a fresh engine."""
    base, _, model = moe_pair
    engine = make_engine(base)
    before = rollout(engine)
    assert not same(before, moe_expected)
    pairs = [(n, p.detach()) for n, p in model.named_parameters()]
    assert any(n.endswith("mlp.experts.gate_up_proj") for n, _ in pairs)
    random.Random(0).shuffle(pairs)
    assert engine.update_weights(iter(pairs)) == 1 == engine.weight_version
    after = rollout(engine)
    assert same(after, moe_expected)
    assert {v for _, _, v in after} == {1} and {v for _, _, v in before} == {0}


def test_update_from_checkpoint_stream_and_push(moe_pair, moe_expected):
    """Per-expert checkpoint names streamed from disk (a generator), then push() of the live model."""
    base, changed, model = moe_pair
    engine = make_engine(base)
    assert engine.update_weights(iter_checkpoint(changed), version=41) == 41
    assert same(rollout(engine), moe_expected)
    engine2 = make_engine(base)
    assert push(model, engine2) == 1
    assert same(rollout(engine2), moe_expected)


def test_dtype_cast_and_partial_update(make_tiny_model):
    path = make_tiny_model("qwen3")
    engine = make_engine(path)
    shapes = {n: t.shape for n, t in iter_checkpoint(path)}

    def held(name, like):  # the engine's tensor for an HF name, flattened
        return engine.get_weights_by_name(name, truncate_size=like.numel())
    name = "model.layers.1.mlp.down_proj.weight"
    new = torch.randn(shapes[name], dtype=torch.float64)
    # A deliberate partial update in float64 and bfloat16: cast to the engine's float32.
    assert engine.update_weights([(name, new)], partial=True) == 1
    assert torch.equal(held(name, new), new.float().flatten())
    q = "model.layers.0.self_attn.q_proj.weight"  # a slice of the fused qkv parameter
    bf = torch.randn(shapes[q]).bfloat16()
    engine.update_weights([(q, bf)], partial=True)
    assert torch.equal(held(q, bf), bf.float().flatten())
    assert engine.weights_complete
    engine.generate(PROMPTS, SamplingParams(max_tokens=2))


def test_prefix_cache_invalidated_by_update(make_tiny_model):
    path = make_tiny_model("llama")
    engine = make_engine(path)
    prompt = [list(range(10, 50))]  # 40 tokens: two full 16-token blocks can be cached
    sp = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
    stats = engine.stats
    first = engine.generate(prompt, sp)
    computed = stats.prompt_tokens_computed
    again = engine.generate(prompt, sp)
    assert stats.prompt_tokens_computed - computed == 8  # 32 of 40 came from the prefix cache
    assert again[0].outputs[0].logprobs == first[0].outputs[0].logprobs
    # Same weights again: the cache must still be dropped (it cannot know), and the result is unchanged.
    engine.update_weights(iter_checkpoint(path))
    computed = stats.prompt_tokens_computed
    third = engine.generate(prompt, sp)
    assert stats.prompt_tokens_computed - computed == 40
    assert third[0].outputs[0].logprobs == first[0].outputs[0].logprobs
    assert third[0].outputs[0].weight_version == 1


def test_bad_updates_are_named_and_leave_the_old_weights(moe_pair):
    base, _, model = moe_pair
    engine = make_engine(base)
    before = rollout(engine)
    params = {n: p.detach().clone() for n, p in engine.named_parameters()}
    pairs = [(n, p.detach()) for n, p in model.named_parameters()]
    good = dict(pairs)
    w = "model.layers.0.self_attn.o_proj.weight"

    cases = [
        ([("model.layers.0.mlp.nonsense.weight", torch.zeros(3))], "model.layers.0.mlp.nonsense.weight"),
        ([(w, torch.zeros(5, 5))], w),
        ([(w, good[w].clone().fill_(float("nan")))], w),
        ([(w, good[w].to(torch.int32))], w),
    ]
    for bad, named in cases:
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            engine.update_weights(iter(bad), check_finite=True)
        # The first tensor was bad: nothing was copied, the engine still serves version 0.
        assert engine.weights_complete and engine.weight_version == 0
    with pytest.raises(TypeError, match="version must be an int or a str"):
        engine.update_weights(iter(pairs), version=2.5)  # refused before any tensor is read
    for n, p in engine.named_parameters():
        assert torch.equal(p, params[n]), n
    # Nothing changed, so the prefix cache was kept; drop it so that the prompts are computed
    # the way they were the first time (cached prefixes change the float summation order).
    assert engine.reset_prefix_cache()
    assert same(rollout(engine), before)


def test_failed_stream_refuses_generate_until_complete_update(moe_pair, moe_expected):
    base, changed, model = moe_pair
    engine = make_engine(base)
    pairs = [(n, p.detach()) for n, p in model.named_parameters()]

    def broken():
        yield from pairs[:5]
        raise ConnectionError("trainer went away")

    with pytest.raises(ConnectionError):
        engine.update_weights(broken())
    assert not engine.weights_complete and engine.weight_version == 0
    with pytest.raises(RuntimeError, match=r"failed after overwriting ([1-9]\d*) of (\d+) tensors, the others hold "
                                           r"the weights from before: trainer went away; \2 of \2 tensors still need"
                       ) as err:
        engine.generate(PROMPTS, SamplingParams(max_tokens=2))
    overwritten, total = (int(x) for x in re.search(r"overwriting (\d+) of (\d+)", str(err.value)).groups())
    assert overwritten < total and "checkpoint" not in str(err.value)
    # A partial update does not make it complete; missing tensors in a full one are named.
    engine.update_weights(pairs[:3], partial=True)
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.generate(PROMPTS, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"the update is missing \d+ tensor\(s\): .*pass partial=True"):
        engine.update_weights(pairs[1:])
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.generate(PROMPTS, SamplingParams(max_tokens=2))
    # Bad tensor after good ones: named, and the engine stays refusing.
    with pytest.raises(ValueError, match="lm_head"):
        engine.update_weights(pairs[:4] + [("lm_head.weight", torch.zeros(2, 2))])
    assert not engine.weights_complete
    version = engine.update_weights(iter_checkpoint(changed))
    assert engine.weights_complete and version == engine.weight_version
    assert same(rollout(engine), moe_expected)


def test_update_refused_while_weights_asleep_or_busy(make_tiny_model):
    path = make_tiny_model("llama")
    engine = make_engine(path)
    engine.sleep(level=2)
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.update_weights(iter_checkpoint(path))
    engine.wake_up(["weights"])
    engine.update_weights(iter_checkpoint(path))  # KV cache still asleep: updates are fine
    engine.wake_up()
    engine.add_request("live", [3, 4, 5], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="requests are in flight"):
        engine.update_weights(iter_checkpoint(path))
    assert engine.weight_version == 1
    engine.pause_generation("keep")
    assert engine.update_weights(iter_checkpoint(path)) == 2  # paused: allowed
