"""Helpers shared by the RL-feature tests (sleep/wake, weight updates, weight sync)."""
from __future__ import annotations

import dataclasses
import itertools

import torch

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
           [30, 31, 32], [200, 7, 99, 42, 42, 3]]


def engine_kwargs(**overrides) -> dict:
    kw = dict(device="cpu", num_kv_blocks=64, max_num_seqs=16, max_model_len=128)
    kw.update(overrides)
    return kw


def make_engine(path: str, **overrides):
    from atom import RolloutEngine
    return RolloutEngine(path, **engine_kwargs(**overrides))


def rollout(engine, prompts=PROMPTS) -> list[tuple[list[int], list[float], int]]:
    """Greedy and seeded-sampled completions: (token ids, logprobs, weight_version) each."""
    from atom import SamplingParams
    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, ignore_eos=True)
    sampled = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=0, ignore_eos=True)
    out = []
    for sp in (greedy, sampled):
        for r in engine.generate(prompts, sp):
            out += [(c.token_ids, c.logprobs, c.weight_version) for c in r.outputs]
    return out


def make_core(path: str, **overrides):
    """The engine core a RolloutEngine wraps (atom.engine.llm_engine.LLMEngine), built on its own
    from the same config, for unit tests of the engine layer that read its parts (KV tensors,
    memory pools, block manager, CUDA graphs), which RolloutEngine keeps to itself."""
    from atom.config import EngineConfig
    from atom.engine.cpu_threads import apply_cpu_threads
    from atom.engine.llm_engine import LLMEngine
    config = EngineConfig(model=path, **engine_kwargs(**overrides))
    if config.torch_device().type == "cpu":  # as RolloutEngine does: the same threads, the same sums
        apply_cpu_threads(1 if config.batch_invariant else config.cpu_threads)
    return LLMEngine(config)


_core_ids = itertools.count()


def core_generate(core, prompts, params) -> list[tuple[list[int], list[float]]]:
    """(token ids, logprobs) of every completion, in RolloutEngine.generate's order, from the
    engine core's batch call; token-id prompts and seeded (or greedy) params only, the cases
    where generate's outputs do not depend on its random seeds."""
    from atom.engine.sequence import Request
    params.validate(core.args.vocab_size, max_num_seqs=core.config.max_num_seqs)
    seed = params.seed if params.seed is not None else 0
    requests = [Request(i, ids, list(ids), dataclasses.replace(params), seed=seed,
                        request_id=f"core-{next(_core_ids)}") for i, ids in enumerate(prompts)]
    core.run(requests)
    return [(list(s.output_token_ids), list(s.logprobs))
            for r in requests for s in sorted(r.sequences, key=lambda s: s.sample_index)]


def core_rollout(core, prompts=PROMPTS) -> list[tuple[list[int], list[float], int]]:
    """rollout() on the engine core: comparable with `same` to a RolloutEngine's rollout()."""
    from atom import SamplingParams
    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, ignore_eos=True)
    sampled = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=0, ignore_eos=True)
    return [(t, lp, core.weight_version) for sp in (greedy, sampled) for t, lp in core_generate(core, prompts, sp)]


def same(a, b) -> bool:
    """Bitwise-equal tokens and logprobs (versions ignored)."""
    return [(t, lp) for t, lp, _ in a] == [(t, lp) for t, lp, _ in b]


def changed_model(path: str, seed: int = 1, scale: float = 0.05):
    """The HF model at `path` with every parameter nudged (deterministically)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def rollout_from_scratch(engine) -> list[tuple[list[int], list[float], int]]:
    """rollout() with the prefix cache empty, as on a fresh engine (sleep(1) / wake_up() empties it):
    bitwise equal to an earlier rollout exactly when the weights are."""
    engine.sleep(level=1)
    engine.wake_up()
    return rollout(engine)
