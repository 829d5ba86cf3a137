"""Issue 17 on the GPU: Mixtral, GPT-OSS and DeepSeek-V3 tiny models against HF transformers.

GPT-OSS and a Mixtral with a window run the Triton sliding-window / sink attention and biased
clamped experts and decode in CUDA graphs (tests/gpu/test_gpt_oss_gpu.py); DeepSeek-V3 decodes
with the Triton MLA ops in CUDA graphs (tests/gpu/test_deepseek_gpu.py). An op a backend lacks
falls back to its torch reference, and decode runs without CUDA graphs when one of the model's
`graph_ops` is not graph-safe."""
from __future__ import annotations

import pytest

from atom import RolloutEngine, SamplingParams
from conftest import TINY_VOCAB
from helpers import random_prompts
from test_engine_gpu import LENGTHS, MAX_NEW, _compare_with_hf, engine

pytestmark = pytest.mark.gpu

FAMILIES = [("mixtral", {}), ("gpt_oss", {}), ("deepseek_v3", {}), ("deepseek_v3", {"q_lora_rank": None})]
IDS = ["mixtral", "gpt-oss", "deepseek-v3", "deepseek-v3-no-qlora"]


@pytest.fixture(scope="module", params=list(zip(IDS, FAMILIES)), ids=IDS)
def family_path(request, make_tiny_model):
    arch, overrides = request.param[1]
    return make_tiny_model(arch, **overrides)


def _skip_old_gpt_oss(path: str) -> None:
    import transformers
    from packaging.version import Version
    if "gpt_oss" in path and Version(transformers.__version__) < Version("5.24"):
        # transformers 5.17 (the device image) and 5.24 (the venv) compute GPT-OSS differently
        # (argmax agreement 7% on the tiny model, measured 2026-12-01); atom follows 5.24 on the CPU
        # (tests/test_hf_parity.py) and its GPU path equals its CPU path (test_gpu_matches_cpu_sampling).
        # scripts/gpu_check.sh installs the carried 5.24 wheel (.whl/) ahead of the image's.
        pytest.skip(f"GPT-OSS reference differs in transformers {transformers.__version__} < 5.24")


def test_fp32_matches_hf(family_path):
    _skip_old_gpt_oss(family_path)
    _compare_with_hf(family_path, engine(family_path, dtype="float32"), 1e-3, near_tie=0.01)


def test_bf16_runs_close_to_hf(family_path):
    """bf16 greedy completions, teacher-forced through HF with the engine's routed experts
    replayed (atom.fidelity.routing_replay covers every family), so a bf16 near-tie in a router
    no longer sends the reference to other experts and every token is compared. The tiny random
    families are far from their float32 selves in bf16 in any implementation (HF's own bf16
    forward: mean |dlogprob| 0.03-0.06 on the CPU, 2026-12-02), so the bound is relative: the
    engine at most 1.5x (+ 0.01) as far from HF float32 as HF bf16 is (was an expected failure
    that could not fail). Measured with the CPU engine in bf16 (2026-12-02): engine / HF-bf16
    distance 0.89-1.11 as it is; with two experts of one layer swapped in the engine 1.8-12
    (mixtral 0.408 / 0.033, gpt-oss 0.132 / 0.062, deepseek-v3 0.082 / 0.046 and 0.218 / 0.050),
    all over the bound."""
    _skip_old_gpt_oss(family_path)
    eng = engine(family_path, dtype="bfloat16", enable_return_routed_experts=True)
    dist, floor = bf16_distance_with_replay(family_path, eng)
    print(f"bf16 mean |dlogprob| from HF float32 (replayed routing): engine {dist:.4f}, HF bf16 {floor:.4f}")
    assert floor < 0.3, f"the HF bf16 yardstick is {floor:.3g} from float32"
    assert dist < 1.5 * floor + 0.01, f"mean |dlogprob| {dist:.3g} over 1.5x HF's bf16 noise {floor:.3g} + 0.01"


def bf16_distance_with_replay(path: str, eng) -> tuple[float, float]:
    """(engine, HF bf16) mean |logprob - HF float32 logprob| over every generated token, HF
    routing each token to the experts the engine chose."""
    import torch
    from transformers import AutoModelForCausalLM

    from atom.fidelity import pad_routed, routing_replay
    prompts = random_prompts(LENGTHS, TINY_VOCAB, seed=1)
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0,
                                                logprobs_mode="raw", return_routed_experts=True))
    models = {dt: AutoModelForCausalLM.from_pretrained(path, dtype=dt).eval() for dt in (torch.float32, torch.bfloat16)}
    dist, floor = [], []
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        ids = prompt + c.token_ids
        ref = {}
        for dt, model in models.items():
            with torch.no_grad(), routing_replay(model, pad_routed([c.routed_experts], len(ids), *c.routed_experts.shape[1:])):
                lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)[len(prompt) - 1:-1]
            ref[dt] = lp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        dist += (torch.tensor(c.logprobs) - ref[torch.float32]).abs().tolist()
        floor += (ref[torch.bfloat16] - ref[torch.float32]).abs().tolist()
    return sum(dist) / len(dist), sum(floor) / len(floor)


def test_gpu_matches_cpu_sampling(family_path):
    prompts = random_prompts([7, 30], TINY_VOCAB, seed=5)
    params = SamplingParams(n=2, temperature=0.8, max_tokens=12, ignore_eos=True, logprobs=0, seed=3)
    gpu = engine(family_path, dtype="float32").generate(prompts, params)
    cpu = RolloutEngine(family_path, device="cpu", dtype="float32", max_num_batched_tokens=32).generate(prompts, params)
    for g, c in zip(gpu, cpu):
        for a, b in zip(g.outputs, c.outputs):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3
