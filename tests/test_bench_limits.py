"""The rollout benchmark's physical limit (bench/limits.py) counts each family's bytes and FLOPs
right: MLA's latent KV rows, sliding windows, expert stacks with biases; numbers by hand on tiny
configs. And the benchmark itself runs end to end on the CPU on shrunk copies of the new
workloads' configs (so a GPU run does not fail on a typo)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from atom.models.hf_config import ModelArgs, load_model_args
from atom.models.registry import model_class
from bench.limits import kv_layers, model_bytes, physical_limit

BENCH = Path(__file__).resolve().parent.parent / "bench"
UNIT = {"copy_bytes_per_s": 1.0, "bf16_flops_per_s": 1.0}  # seconds = bytes read / FLOPs


def tiny_args(**kw) -> ModelArgs:
    base = dict(architecture="X", vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, head_dim=3, rms_norm_eps=1e-6, rope_theta=1e4,
                max_position_embeddings=64, tie_word_embeddings=False)
    return ModelArgs(**{**base, **kw})


WORK = {"num_prompts": 2, "n": 2, "prompt_len": 8, "output_len": 3}


def test_mla_limit_by_hand():
    """2 layers, kv_lora_rank 4 + rope 2 (bf16: 12 B per token and layer, not 2 * heads * head_dim),
    2 prompts x 2 samples of 8 tokens, 3 output tokens; one expert stack of 4 experts, top 2."""
    args = tiny_args(architecture="DeepseekV3ForCausalLM", num_experts=4, num_experts_per_tok=2, kv_lora_rank=4,
                     qk_rope_head_dim=2, qk_nope_head_dim=3, v_head_dim=5)
    mb = {"dense": 1000, "experts": [("model.layers.1.mlp.w13", 400, 4)], "dtype_bytes": 2}
    lim = physical_limit(WORK, args, mb, UNIT, max_num_seqs=4)
    assert lim["kv_bytes_per_token"] == 24
    # Decode, one wave of 4 rows in 2 groups: KV 2 layers * (2 * 8 + 4 * j) * 12 B for j = 0, 1, 2
    # = 384 + 480 + 576; weights 1000 + 400 * 3.75 / 4 (3.75 of 4 experts touched by 4 rows) per step.
    assert lim["decode_s"] == pytest.approx(1440 + 3 * 1375)
    # Prefill: (1000 + 400 * 2/4 - 80 B LM head) / 2 B = 560 params * 2 * 16 tokens = 17920, and attention
    # 2 heads * 2 * (3 + 2 + 5) = 40 FLOPs a pair * 36 pairs * 2 layers * 2 prompts = 5760.
    assert lim["prefill_s"] == pytest.approx(17920 + 5760)
    # Two waves of one group (max_num_seqs 2): the same KV, 3 of 4 experts touched by 2 rows.
    lim = physical_limit(WORK, args, mb, UNIT, max_num_seqs=2)
    assert lim["decode_s"] == pytest.approx(2 * (720 + 3 * 1300))


def test_sliding_window_limit_by_hand():
    """GPT-OSS-like: a sliding layer (window 4) and a full one, 1 kv head of dim 2 (8 B per token
    and layer), 6 output tokens: the sliding layer reads the prompt's end until its own tokens
    fill the window."""
    args = tiny_args(architecture="GptOssForCausalLM", num_attention_heads=4, num_key_value_heads=1, head_dim=2,
                     sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    mb = {"dense": 1000, "experts": [], "dtype_bytes": 2}
    lim = physical_limit({**WORK, "output_len": 6}, args, mb, UNIT, max_num_seqs=4)
    assert [(layer.bytes_per_token, layer.window) for layer in kv_layers(args, 2)] == [(8, 4), (8, None)]
    # Sliding tokens per step (2 groups, 4 rows): 2*4, 2*3+4*1, 2*2+4*2, 2*1+4*3, 4*4, 4*4 = 76;
    # full: sum of 2*8 + 4j over j < 6 = 156. Weights 1000 a step.
    assert lim["decode_s"] == pytest.approx((76 + 156) * 8 + 6 * 1000)
    # Prefill: (1000 - 80) / 2 = 460 params * 2 * 16 tokens; attention 4 * 4 heads * 2 = 32 FLOPs a
    # pair over 26 (window 4: 1+2+3+4+4*4) + 36 pairs, 2 prompts.
    assert lim["prefill_s"] == pytest.approx(460 * 2 * 16 + 32 * (26 + 36) * 2)


def meta_model(name: str):
    args = load_model_args(str(BENCH / "models" / name))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            return args, model_class(args.architecture)(args)
    finally:
        torch.set_default_dtype(prev)


def test_model_bytes_of_the_bench_models():
    """Expert stacks, dense part and KV of the real shapes, from the config fields by hand."""
    args, model = meta_model("moonlight-16b-a3b")
    mb = model_bytes(model)
    h, moe_i = 2048, 1408
    assert len(mb["experts"]) == 2 * 26  # w13, w2 of the 26 MoE layers (layer 0 dense)
    assert sum(b for _, b, _ in mb["experts"]) == 2 * 26 * 64 * 3 * moe_i * h
    shared = 26 * 3 * h * 2 * moe_i          # 2 shared experts per MoE layer, always read
    dense_mlp = 3 * h * 11264                # first_k_dense_replace = 1
    attn = 27 * (h * 16 * 192 + h * 576 + 512 * 16 * 256 + 16 * 128 * h + 512)  # q, kv_a, kv_b, o, kv norm
    norms_router = 27 * 2 * h + h + 26 * (64 * h + 64)
    assert mb["dense"] == 2 * (shared + dense_mlp + attn + norms_router + 163840 * h)
    assert kv_layers(args, 2)[0].bytes_per_token == (512 + 64) * 2
    args, model = meta_model("gpt-oss-20b")
    mb = model_bytes(model)
    h, heads, kvh, d = 2880, 64, 8, 64
    per_layer = 32 * (2 * h * h + h * h + 2 * h + h)  # w13, w2, b13, b2
    assert sum(b for _, b, _ in mb["experts"]) == 2 * 24 * per_layer
    attn = 24 * ((heads + 2 * kvh) * d * (h + 1) + heads * d * h + h + heads)  # qkv + biases, o + bias, sinks
    assert mb["dense"] == 2 * (attn + 24 * (32 * h + 32) + 24 * 2 * h + h + 201088 * h)
    assert [layer.window for layer in kv_layers(args, 2)] == [128, None] * 12
    # The KV the engine allocates per token agrees with the limit's count.
    per_token = sum(math.prod(s) for a in model.attention_layers() for s in a.kv_cache_shapes(1).values())
    assert 2 * per_token == sum(layer.bytes_per_token for layer in kv_layers(args, 2))


def shrunk(src: str, dst: Path, **changes) -> str:
    cfg = json.loads((BENCH / "models" / src / "config.json").read_text())
    cfg.update({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "moe_intermediate_size": 32,
                **changes})
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


SMOKE = {
    "grpo-mla-moe": ("moonlight-16b-a3b", dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                                               num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16,
                                               qk_nope_head_dim=16, v_head_dim=16), 3 * 48 * 2),
    "grpo-gpt-oss": ("gpt-oss-20b", dict(num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2,
                                         num_key_value_heads=2, head_dim=16, intermediate_size=32, sliding_window=8,
                                         layer_types=["sliding_attention", "full_attention"] * 2), 4 * 2 * 32 * 2),
}


@pytest.mark.parametrize("workload", sorted(SMOKE))
def test_bench_rollout_runs_on_cpu(workload, tmp_path):
    """`python -m bench.rollout --device cpu` on a shrunk config of the workload's model (its
    architecture-specific fields kept): every sequence gets its tokens, the result counts the
    family's KV bytes and has a positive limit."""
    from bench.rollout import main
    name, changes, kv_per_token = SMOKE[workload]
    out = tmp_path / "result.jsonl"
    sizes = ["num_prompts=2", "n=3", "prompt_len=20", "output_len=4"]
    assert main(["--workload", workload, "--device", "cpu", "--model-dir", shrunk(name, tmp_path / "m", **changes),
                 "--json", str(out), *(a for s in sizes for a in ("--set", s))]) == 0
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["generated_tokens"] == 2 * 3 * 4
    assert result["model_bytes"]["kv_per_token"] == kv_per_token
    assert result["limit_decode_s"] > 0 and result["fraction_of_limit"] > 0
    # The wall time split: the prompt steps end inside the run, a decode tail follows (4 tokens:
    # the first from the prompt step, at most 3 decode-only steps after it).
    assert 0 < result["prompt_steps_end_s"] < result["seconds"] and result["decode_tail_ms_per_step"] > 0
    # The warm-up ran every batch size the timed run uses (CPU: no graphs, no triton).
    assert result["in_run"] == {"triton_compiles": {"count": 0, "seconds": 0.0, "kernels": {}, "specializations": []},
                                "graphs_captured": []}
    with pytest.raises(SystemExit, match="num_prompts"):
        main(["--workload", workload, "--device", "cpu", "--set", "num_prompt=2"])


def test_bench_rollout_profile_window_on_cpu(tmp_path):
    """`bench.rollout --torch-profile F --profile-steps A:B` (scripts/gpu_check.sh's `profile`
    section): the run still completes, and F holds the window's header and its op table."""
    from bench.rollout import main
    name, changes, _ = SMOKE["grpo-gpt-oss"]
    prof = tmp_path / "profile.txt"
    sizes = ["num_prompts=2", "n=2", "prompt_len=16", "output_len=6"]
    assert main(["--workload", "grpo-gpt-oss", "--device", "cpu", "--model-dir", shrunk(name, tmp_path / "m", **changes),
                 "--torch-profile", str(prof), "--profile-steps", "2:4",
                 *(a for s in sizes for a in ("--set", s))]) == 0
    text = prof.read_text()
    assert text.startswith("steps 2:4: wall ") and "Self CPU" in text


def test_compile_watch_counts_each_kernel_and_its_time():
    """CompileWatch's hooks as triton calls them (keyword arguments, `fn` with a name; before and
    after each in-process cache miss): counts per kernel, seconds summed, and a before-hook that
    never asks triton to skip the compile."""
    import time
    from types import SimpleNamespace

    from bench.compile_watch import CompileWatch
    watch = CompileWatch()
    params = [SimpleNamespace(name=n) for n in ("x_ptr", "n", "WHOLE", "BLOCK")]
    for name, key in (("_mla_own_kernel", (1, "bf16")), ("_mla_own_kernel", (2, "bf16")), ("_sample", (1,))):
        fn = SimpleNamespace(name=name, jit_function=SimpleNamespace(params=params))
        assert not watch._before(key=key, repr="", fn=fn, compile={}, is_manual_warmup=False, already_compiled=False)
        time.sleep(0.01)
        compile = {"num_warps": 4, "num_stages": key[0], "constants": {(2,): key[0] == 1, (3,): 64}}
        watch._after(key=key, repr="", fn=fn, compile=compile, is_manual_warmup=False, already_compiled=False)
    got = watch.summary()
    assert got["count"] == 3 and got["kernels"] == {"_mla_own_kernel": 2, "_sample": 1}
    assert got["specializations"] == ["_mla_own_kernel warps=4 stages=1 {'WHOLE': True, 'BLOCK': 64}",
                                      "_mla_own_kernel warps=4 stages=2 {'WHOLE': False, 'BLOCK': 64}",
                                      "_sample warps=4 stages=1 {'WHOLE': True, 'BLOCK': 64}"]
    assert 0.03 <= got["seconds"] < 1.0
