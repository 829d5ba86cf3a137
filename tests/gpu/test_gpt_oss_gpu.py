"""GPT-OSS on the GPU: the Triton family kernels (sliding-window + sink attention, biased clamped
experts) and decode in CUDA graphs give what the CPU engine (torch reference ops) gives."""
from __future__ import annotations

import pytest

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import random_prompts
from test_engine_gpu import engine

pytestmark = pytest.mark.gpu

FAMILY_OPS = ("sliding_sink_attention_decode", "sliding_sink_attention_prefill", "fused_moe_biased")
# (config overrides, engine options, prompt lengths): the tiny model's window of 6 in blocks of 4
# and 16 tokens; a window of 20 over longer prompts. Sliding layers give blocks back in all.
CASES = [({}, {"kv_block_size": 4}, [5, 16, 37, 70]),
         ({}, {}, [5, 16, 37, 70]),
         ({"sliding_window": 20}, {"kv_block_size": 8}, [100, 41, 3])]
IDS = ["window6-block4", "window6-block16", "window20-block8"]


@pytest.fixture(scope="module", params=list(zip(IDS, CASES)), ids=IDS)
def case(request, make_tiny_model):
    overrides, options, lengths = request.param[1]
    return make_tiny_model("gpt_oss", **overrides), options, lengths


def _outputs(outs):
    return [(c.token_ids, c.logprobs) for o in outs for c in o.outputs]


def test_gpt_oss_gpu_matches_cpu(case):
    """Greedy and seeded sampled tokens (n=3: the samples share the prompt's blocks, read once per
    group by the full layers) equal the CPU engine's; logprobs within 1e-3 in fp32; the decode
    steps ran in CUDA graphs."""
    from atom.ops import ops
    path, options, lengths = case
    prompts = random_prompts(lengths, TINY_VOCAB, seed=8)
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0)] * len(prompts)
    params[0] = SamplingParams(n=3, temperature=1.0, max_tokens=32, ignore_eos=True, logprobs=0, seed=2)
    gpu = engine(path, dtype="float32", **options)
    assert all(ops.backend_of[name] == "triton" for name in FAMILY_OPS), ops.backend_of
    got = _outputs(gpu.generate(prompts, params))
    assert gpu.stats.graph_steps > 20, "GPT-OSS decode did not run in CUDA graphs"
    cpu = RolloutEngine(path, device="cpu", dtype="float32", max_num_batched_tokens=32, **options)
    want = _outputs(cpu.generate(prompts, params))
    worst = 0.0
    for (tg, lg), (tc, lc) in zip(got, want):
        assert tg == tc
        worst = max(worst, max(abs(x - y) for x, y in zip(lg, lc)))
    print(f"max |dlogprob| GPU vs CPU: {worst:.2e}")
    assert worst < 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpt_oss_cuda_graphs_on_off_identical(case, dtype):
    path, options, lengths = case
    prompts = random_prompts(lengths, TINY_VOCAB, seed=9)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=24, ignore_eos=True, logprobs=2, seed=7)
    results = []
    for eager in (False, True):
        eng = engine(path, dtype=dtype, enforce_eager=eager, **options)
        outs = eng.generate(prompts, params)
        assert (eng.stats.graph_steps > 0) != eager, "graphs used exactly when not eager"
        results.append([(c.token_ids, c.logprobs, c.top_logprobs) for o in outs for c in o.outputs])
    assert results[0] == results[1]
