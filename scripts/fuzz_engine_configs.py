"""Differential fuzz on the CPU: random workloads (prompts with shared prefixes, n, temperature,
top-p / top-k, logprobs, seeds, stop tokens, penalties, logit bias, allowed tokens) under engine
configs that must not change a request's tokens: the overlapped decode loop, prefix caching off,
small prefill chunks, few sequences at a time, a KV pool small enough to preempt, 4-token blocks,
routed-expert capture, the asynchronous front end with requests arriving in random order. Each config's tokens must equal a plain engine's and its logprobs agree
within 2e-5 (float32 tiny models).

    python scripts/fuzz_engine_configs.py [ARCH,ARCH,...] [TRIALS] [SEED]

Prints one line per difference; exits non-zero when there is any. Session 8 found the decode
runner's stale block-table entries with it (tests/test_overlapped_decode.py now covers that).
"""
from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from atom import RolloutEngine, SamplingParams  # noqa: E402
from conftest import TINY_VOCAB, build_tiny_model  # noqa: E402

CONFIGS = [dict(overlap_decode=True), dict(enable_prefix_caching=False), dict(max_num_batched_tokens=48),
           dict(max_num_seqs=5), dict(num_kv_blocks=40, max_num_seqs=64),
           dict(overlap_decode=True, max_num_batched_tokens=40, num_kv_blocks=48), dict(kv_block_size=4),
           dict(overlap_decode=True, kv_block_size=4, max_num_seqs=4), dict(async_front_end=True),
           dict(async_front_end=True, overlap_decode=True, max_num_batched_tokens=40)]
MOE_CONFIGS = [dict(enable_return_routed_experts=True)]
MOE_ARCHS = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")


def _run_async(path: str, prompts, params, **cfg):
    """The same requests through AsyncRolloutEngine, arriving a few ms apart in random order (a
    seeded request gives the same tokens whenever it arrives)."""
    import asyncio

    from atom import AsyncRolloutEngine

    async def go():
        engine = AsyncRolloutEngine(path, **cfg)
        rnd = random.Random(len(prompts))

        async def one(i):
            await asyncio.sleep(rnd.random() * 0.02)
            return await engine.generate(prompts[i], params[i], request_id=f"r{i}")
        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await engine.shutdown()
    outs = asyncio.run(go())
    return [[(c.token_ids, c.logprobs, c.finish_reason) for c in o.outputs] for o in outs]


def _run(path: str, prompts, params, **cfg):
    cfg.setdefault("max_model_len", 256)
    if cfg.pop("async_front_end", False):
        return _run_async(path, prompts, params, **cfg)
    engine = RolloutEngine(path, **cfg)
    outs = engine.generate(prompts, params)
    if engine.num_free_kv_blocks != engine.num_kv_blocks:
        raise RuntimeError("KV blocks leaked")
    return [[(c.token_ids, c.logprobs, c.finish_reason) for c in o.outputs] for o in outs]


def _difference(a, b) -> str | None:
    for ra, rb in zip(a, b):
        for (ta, la, fa), (tb, lb, fb) in zip(ra, rb):
            if ta != tb or fa != fb:
                return f"tokens {ta} vs {tb} ({fa} / {fb})"
            if la and lb and max(abs(x - y) for x, y in zip(la, lb)) > 2e-5:
                return f"logprobs differ by {max(abs(x - y) for x, y in zip(la, lb)):.3g}"
    return None


def _workload(rnd: random.Random):
    prompts = [[rnd.randrange(2, TINY_VOCAB) for _ in range(rnd.randint(1, 60))] for _ in range(rnd.randint(1, 6))]
    if len(prompts) > 1 and rnd.random() < 0.5:
        prompts[1] = prompts[0][: max(1, len(prompts[0]) - 3)] + prompts[1][:5]  # a shared prefix
    params = [SamplingParams(
        n=rnd.choice([1, 2, 4]), temperature=rnd.choice([0.0, 0.7, 1.0]), top_p=rnd.choice([1.0, 0.9]),
        top_k=rnd.choice([0, 20]), max_tokens=rnd.randint(1, 24), logprobs=rnd.choice([None, 0, 2]),
        seed=rnd.randrange(1000), stop_token_ids=rnd.choice([[], [rnd.randrange(2, TINY_VOCAB)]]),
        ignore_eos=rnd.random() < 0.5, min_tokens=rnd.choice([0, 1]), repetition_penalty=rnd.choice([1.0, 1.2]),
        presence_penalty=rnd.choice([0.0, 0.5]), frequency_penalty=rnd.choice([0.0, 0.3]),
        logit_bias=rnd.choice([None, {5: 2.0, 9: -1.0}]), allowed_token_ids=rnd.choice([None, list(range(2, 200))]))
        for _ in prompts]
    return prompts, params


def fuzz(arch: str, trials: int, seed: int = 0) -> list[str]:
    """The differences found for `arch` over `trials` random workloads (empty: none)."""
    path = tempfile.mkdtemp(prefix=f"fuzz_{arch}_")
    build_tiny_model(arch).save_pretrained(path)
    configs = CONFIGS + (MOE_CONFIGS if arch in MOE_ARCHS else [])
    found = []
    for t in range(trials):
        prompts, params = _workload(random.Random(f"{arch}-{seed}-{t}"))
        base = _run(path, prompts, params)
        for cfg in configs:
            try:
                diff = _difference(base, _run(path, prompts, params, **cfg))
            except Exception as exc:  # a crash is a difference too
                diff = f"{type(exc).__name__}: {exc}"
            if diff:
                found.append(f"{arch} trial {t} {cfg}: {diff}")
    return found


def main() -> int:
    import torch
    torch.set_num_threads(1)
    archs = sys.argv[1].split(",") if len(sys.argv) > 1 else ["qwen3", "qwen3_moe", "gpt_oss", "deepseek_v3",
                                                              "mixtral", "llama"]
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    found = [d for arch in archs for d in fuzz(arch, trials, seed)]
    print("\n".join(found) or f"no difference ({len(archs)} families x {trials} workloads)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
