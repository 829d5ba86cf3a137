"""Which triton op breaks GPT-OSS fp32 on the GPU? Greedy tokens against HF, one op on torch at a time."""
import sys
import tempfile

sys.path.insert(0, "tests")
from conftest import TINY_VOCAB, build_tiny_model  # noqa: E402
from helpers import hf_logits, random_prompts  # noqa: E402

from atom import RolloutEngine, SamplingParams  # noqa: E402
from atom.ops import ops  # noqa: E402

path = tempfile.mkdtemp()
build_tiny_model("gpt_oss").save_pretrained(path)
prompts = random_prompts([5, 16, 37, 70], TINY_VOCAB, seed=1)
sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0, logprobs_mode="raw")


def bad_steps(overrides):
    eng = RolloutEngine(path, device="cuda", dtype="float32", kv_cache_memory_bytes=64 << 20,
                        max_num_batched_tokens=32, op_backends=overrides)
    n = 0
    for p, out in zip(prompts, eng.generate(prompts, sp)):
        toks = out.outputs[0].token_ids
        ref = hf_logits(path, p + toks).log_softmax(-1)[len(p) - 1:-1]
        n += sum(int(t != ref[i].argmax().item()) for i, t in enumerate(toks))
    return n


print("triton ops:", sorted(k for k, v in ops.backend_of.items() if v == "triton"))
print("default:", bad_steps({}))
for op in [] and ["linear", "qkv_prologue", "rotary_embedding", "rms_norm", "fused_add_rms_norm", "silu_and_mul",
           "moe_route", "fused_moe", "moe_forward", "sample", "kv_cache_write", "paged_attention_decode",
           "paged_attention_prefill"]:
    try:
        print(op, "-> torch:", bad_steps({op: "torch"}), flush=True)
    except Exception as e:
        print(op, "error", e)

from atom.ops.registry import _IMPLS  # noqa: E402
every = {name: "torch" for name, impls in _IMPLS.items() if "torch" in impls}
print("all torch:", bad_steps(every), flush=True)
print("all torch + eager:", bad_steps(every) if False else "-", flush=True)
