"""Issue 17: the MoE families RL is run on (Mixtral, GPT-OSS, DeepSeek-V3) through the engine's
RL features: update_weights from a trainer's HF model, sleep / wake, prefix caching, TP / EP.

fp32 parity with HF transformers of the plain generate path is in tests/test_hf_parity.py."""
from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch

import parallel_checks
from _rl_util import changed_model
from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import random_prompts
from test_parallel import _spawn

BENCH_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "models")

# name -> (tiny arch, overrides) exercising the family's features (see tests/test_hf_parity.py)
FAMILIES = {
    "mixtral": ("mixtral", {}),
    "gpt_oss": ("gpt_oss", {}),
    "deepseek_v3": ("deepseek_v3", {}),
    "deepseek_v3_no_qlora": ("deepseek_v3", {"q_lora_rank": None, "n_group": 2, "topk_group": 1}),
}
ENGINE = dict(device="cpu", num_kv_blocks=96, kv_block_size=8, max_num_seqs=4, max_num_batched_tokens=24)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2, logprobs_mode="raw")


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request, make_tiny_model):
    arch, overrides = FAMILIES[request.param]
    return request.param, make_tiny_model(arch, **overrides)


@torch.no_grad()
def assert_matches_hf(model, prompts, outs) -> None:
    """Greedy tokens equal the HF model's, raw logprobs within 1e-4."""
    for prompt, out in zip(prompts, outs):
        done = out.outputs[0]
        want = model.generate(torch.tensor([prompt]), max_new_tokens=len(done.token_ids), do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert done.token_ids == want
        ref = model(torch.tensor([prompt + done.token_ids])).logits[0].float().log_softmax(-1)[len(prompt) - 1:-1]
        lp = ref.gather(-1, torch.tensor(done.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(done.logprobs), lp, atol=1e-4, rtol=0)


def assert_trainer_update_restores_parity(path: str, prompts, shuffle_seed: int = 0) -> RolloutEngine:
    """A trainer changes every weight; its named_parameters (shuffled) through update_weights
    give the changed model's tokens and logprobs. Returns the updated engine."""
    engine = RolloutEngine(path, **ENGINE)
    before = engine.generate(prompts, GREEDY)
    trainer = changed_model(path, scale=0.1)
    pairs = [(n, p.detach()) for n, p in trainer.named_parameters()]
    random.Random(shuffle_seed).shuffle(pairs)
    assert engine.update_weights(iter(pairs)) == 1
    after = engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in after] != [o.outputs[0].token_ids for o in before]
    assert_matches_hf(trainer, prompts, after)
    return engine


def test_update_weights_from_trainer_model_restores_parity(family):
    """transformers-v5 names and fused experts among the trainer's names."""
    assert_trainer_update_restores_parity(family[1], random_prompts([7, 21], TINY_VOCAB, seed=11))


def test_sleep_wake_and_prefix_cache_keep_outputs(family):
    arch, path = family
    engine = RolloutEngine(path, **ENGINE)
    prompts = random_prompts([30, 30], TINY_VOCAB, seed=12)
    prompts[1][:24] = prompts[0][:24]  # three shared 8-token blocks
    first = engine.generate(prompts[:1], GREEDY)
    cached = engine.stats.prompt_tokens_cached
    second = engine.generate(prompts, GREEDY)
    assert engine.stats.prompt_tokens_cached - cached >= 24
    engine.sleep(level=1)  # vLLM's level 1: weights offloaded to host memory, KV cache dropped
    engine.wake_up()
    third = engine.generate(prompts, GREEDY)
    for a, b in ((first[0], second[0]), (second[0], third[0]), (second[1], third[1])):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   atol=1e-5, rtol=0)


def test_tp2_ep2_and_alltoall_match_single_process(family, make_tiny_model, tmp_path):
    """TP=2 (every expert split in two), TP=2 + EP=2 (allreduce) and EP=2 alltoall on gloo: tokens identical to one process,
    logprobs within 1e-4 (the parity bound; sums split over ranks round differently); update_weights leaves each rank its shard of the new checkpoint."""
    name, path = family
    arch, overrides = FAMILIES[name]
    updated = make_tiny_model(arch, seed=1, **overrides)
    # Without q_lora only q_proj differs (column-parallel under TP): TP=2 alone covers it.
    modes = ["tp2"] if name == "deepseek_v3_no_qlora" else ["tp2", "tp2_ep2", "ep2_alltoall"]
    names = [f"{name}_{m}" for m in modes]
    argv = ["--models", json.dumps({name: path}), "--update-models", json.dumps({name: updated}),
            "--out", str(tmp_path), "--atol", "1e-4", "--scenarios", ",".join(names)]
    _spawn(parallel_checks.spawned_checks, (argv,))
    results = {r["scenario"]: r for r in json.loads((tmp_path / "rank0.json").read_text())}
    assert set(results) == set(names)
    for scenario in names:
        assert results[scenario]["weight_version"] == 1


def test_gpt_oss_mxfp4_checkpoint_is_dequantised_at_load(tmp_path):
    """Expert weights stored as MXFP4 blocks + scales (the released GPT-OSS format, sharded
    across files): the engine matches an HF model whose experts hold transformers' own
    dequantisation of the same bytes."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from conftest import build_tiny_model
    model = build_tiny_model("gpt_oss")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    quantized = {}
    for name in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, rows_in, rows_out = state.pop(name).shape  # HF bf16 layout [E, in, out]
        blocks = torch.randint(0, 256, (e, rows_out, rows_in // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(121, 126, (e, rows_out, rows_in // 32), generator=g, dtype=torch.uint8)
        quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
        with torch.no_grad():
            model.get_parameter(name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    model.config.architectures = ["GptOssForCausalLM"]
    model.config.save_pretrained(tmp_path)
    names = sorted(state) + sorted(quantized)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    tensors = {**state, **quantized}
    for fname, keys in files.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    prompts = random_prompts([9, 26], TINY_VOCAB, seed=13)
    outs = RolloutEngine(str(tmp_path), **ENGINE).generate(prompts, GREEDY)
    assert_matches_hf(model, prompts, outs)


def test_gpt_oss_mxfp4_pairs_must_be_complete():
    from atom.models.gpt_oss import dequantize_mxfp4
    blocks = torch.zeros(2, 4, 1, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no x.experts.down_proj_scales"):
        list(dequantize_mxfp4([("x.experts.down_proj_blocks", blocks)]))
    with pytest.raises(ValueError, match="do not fit together"):
        list(dequantize_mxfp4([("a_blocks", blocks), ("a_scales", torch.zeros(2, 4, 2, dtype=torch.uint8))]))


def test_deepseek_mtp_layers_are_skipped_and_correction_bias_is_optional(make_tiny_model, tmp_path):
    """A checkpoint with num_nextn_predict_layers=1 carries model.layers.{N}.*: not loaded, the
    outputs are those of the same checkpoint without them. e_score_correction_bias is an HF
    buffer (not in named_parameters): a complete update may leave it out, or carry it."""
    import shutil

    from safetensors.torch import load_file, save_file
    path = make_tiny_model("deepseek_v3")
    mtp = tmp_path / "mtp"
    shutil.copytree(path, mtp)
    cfg = json.loads((mtp / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (mtp / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(mtp / "model.safetensors"))
    n = cfg["num_hidden_layers"]
    extra = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v + 1 for k, v in tensors.items()
             if k.startswith(f"model.layers.{n - 1}.")}
    extra[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(4, 4)
    save_file({**tensors, **extra}, str(mtp / "model.safetensors"))
    prompts = random_prompts([9, 20], TINY_VOCAB, seed=14)
    want = RolloutEngine(path, **ENGINE).generate(prompts, GREEDY)
    engine = RolloutEngine(str(mtp), **ENGINE)
    got = engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    trainer = changed_model(path, scale=0.1)
    assert not any("e_score_correction_bias" in name for name, _ in trainer.named_parameters())
    engine.update_weights((name, p.detach()) for name, p in trainer.named_parameters())
    bias = {name: b for name, b in trainer.named_buffers() if name.endswith("e_score_correction_bias")}
    assert len(bias) == cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    engine.update_weights(iter(bias.items()), partial=True)
    assert_matches_hf(trainer, prompts, engine.generate(prompts, GREEDY))



def test_deepseek_correction_bias_survives_a_discarding_sleep(make_tiny_model):
    """sleep(2) drops the weights and trainers push named_parameters(), which lack the HF buffer
    e_score_correction_bias: the engine keeps it through the sleep, so after the push its
    tokens and logprobs are HF's with the trainer's weights (not a garbage routing bias)."""
    path = make_tiny_model("deepseek_v3")
    prompts = random_prompts([9, 20], TINY_VOCAB, seed=15)
    engine = RolloutEngine(path, **ENGINE)
    trainer = changed_model(path, scale=0.1)
    engine.sleep(level=2)
    engine.wake_up(["weights"])
    engine.update_weights((name, p.detach()) for name, p in trainer.named_parameters())
    engine.wake_up()
    assert_matches_hf(trainer, prompts, engine.generate(prompts, GREEDY))
    ours = {n: p for n, p in engine.named_parameters() if n.endswith("e_score_correction_bias")}
    theirs = {n: b for n, b in trainer.named_buffers() if n.endswith("e_score_correction_bias")}
    assert len(ours) == len(theirs) > 0
    assert sorted(torch.cat([p.flatten() for p in ours.values()]).tolist()) == pytest.approx(
        sorted(torch.cat([b.flatten() for b in theirs.values()]).tolist()))

def _meta_models(config_path: str):
    """(our model, HF's) built on the meta device from a real config.json (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from atom.models.hf_config import load_model_args
    from atom.models.registry import model_class
    args = load_model_args(os.path.dirname(config_path))
    with torch.device("meta"):
        ours = model_class(args.architecture)(args)
        theirs = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.dirname(config_path)))
    return args, ours, theirs


@pytest.mark.parametrize("name", ["moonlight-16b-a3b", "gpt-oss-20b"])
def test_real_configs_build_with_hf_parameter_counts(name):
    """The shapes of the real checkpoints (Moonlight-16B-A3B, gpt-oss-20b): as many parameters as
    HF's model of the same config.json, and MLA's KV cache per token is kv_lora_rank +
    qk_rope_head_dim per layer, not 2 * heads * head_dim."""
    args, ours, theirs = _meta_models(f"{BENCH_MODELS}/{name}/config.json")
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in theirs.parameters())
    n_hf += sum(b.numel() for n, b in theirs.named_buffers() if n.endswith("e_score_correction_bias"))
    assert n_ours == n_hf
    per_token = sum(math.prod(s) for a in ours.attention_layers() for s in a.kv_cache_shapes(1).values())
    if args.kv_lora_rank:
        assert per_token == args.num_hidden_layers * (args.kv_lora_rank + args.qk_rope_head_dim)
    else:
        assert per_token == args.num_hidden_layers * 2 * args.num_key_value_heads * args.head_dim


def test_sliding_layers_give_back_blocks(make_tiny_model):
    """GPT-OSS (sliding and full layers alternate): sliding layer j shares cache tensors with full
    layer j (a block costs half the layers' bytes), and keeps only the blocks its window still
    sees. Two 70-token sequences need 18 blocks each for the full layers and 3 for their windows:
    they run together in a 44-block pool (keeping every sliding block would take 72), with HF's
    tokens and logprobs, also for n=3 forked samples."""
    path = make_tiny_model("gpt_oss")
    cfg = json.loads(open(f"{path}/config.json").read())
    per_layer = 2 * 4 * cfg["num_key_value_heads"] * cfg["head_dim"] * 4  # K and V of 4 tokens, fp32
    budget = RolloutEngine(path, device="cpu", kv_block_size=4, kv_cache_memory_bytes=per_layer * 1000)
    assert budget.num_kv_blocks == 1000 // (cfg["num_hidden_layers"] // 2)
    engine = RolloutEngine(path, device="cpu", num_kv_blocks=44, kv_block_size=4, max_num_seqs=4,
                           max_num_batched_tokens=32)
    prompts = random_prompts([20, 14], TINY_VOCAB, seed=15)
    sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, logprobs=0, logprobs_mode="raw")
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, sp)
    held, done = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
        held.append(engine.num_kv_blocks - engine.num_free_kv_blocks)
    assert max(held) <= 2 * (18 + 3) and engine.stats.preemptions == 0
    outs = [done[0], done[1]]
    model = changed_model(path, scale=0.0)
    assert_matches_hf(model, prompts, outs)
    sampled = engine.generate(prompts[:1], SamplingParams(n=3, temperature=0.8, seed=4, max_tokens=30,
                                                         ignore_eos=True, logprobs=0))
    with torch.no_grad():
        for c in sampled[0].outputs:
            ids = prompts[0] + c.token_ids
            ref = (model(torch.tensor([ids])).logits[0] / 0.8).log_softmax(-1)[len(prompts[0]) - 1:-1]
            want = ref.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch,change,match", [
    ("gpt_oss", {"layer_types": ["sliding_attention"] * 3}, "layer_types lists 3 layers"),
    ("gpt_oss", {"layer_types": ["sliding_attention", "chunked", "x", "y"]}, "layer_types must be a list"),
    ("gpt_oss", {"sliding_window": -1}, "sliding_window=-1"),
    ("gpt_oss", {"swiglu_limit": 0}, "swiglu_limit must be > 0"),
    ("deepseek_v3", {"kv_lora_rank": 2.5}, "kv_lora_rank=2.5"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ("deepseek_v3", {"n_group": 3}, "n_group=3 must divide"),
    ("deepseek_v3", {"topk_group": 1, "num_experts_per_tok": 3}, "topk_group=1 groups must hold"),
])
def test_bad_family_configs_are_clear_errors(make_tiny_model, tmp_path, arch, change, match):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(make_tiny_model(arch), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        RolloutEngine(str(bad), device="cpu")


def test_routed_expert_capture_equals_hf_routers(family):
    """return_routed_experts records each family's own routing (biased router, grouped sigmoid
    with correction bias): the experts HF's routers pick, layer by layer (MoE layers only)."""
    name, path = family
    model = changed_model(path, scale=0.0)
    picks = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: picks.append(out[2]))
             for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    engine = RolloutEngine(path, enable_return_routed_experts=True, **ENGINE)
    prompt = random_prompts([19], TINY_VOCAB, seed=16)[0]
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                   return_routed_experts=True))[0].outputs[0]
    with torch.no_grad():
        model(torch.tensor([prompt + out.token_ids]))
    for h in hooks:
        h.remove()
    want = torch.stack([p.reshape(-1, p.shape[-1]) for p in picks], 1)[:len(prompt) + len(out.token_ids) - 1]
    assert out.routed_experts.shape == tuple(want.shape) and len(picks) == len(hooks)
    np.testing.assert_array_equal(np.sort(out.routed_experts, -1), want.sort(-1).values.numpy())
