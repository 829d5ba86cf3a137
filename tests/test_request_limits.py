"""Issue 13: requests larger than the engine can ever run, and temperatures that overflow float32,
are refused before any work, with messages naming the limit; the engine serves on unchanged."""
from __future__ import annotations

import math
import time

import pytest

from atom import RolloutEngine, SamplingParams
from atom.sampling_params import MIN_TEMPERATURE

SP = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, logprobs=0)


def _make(path: str) -> RolloutEngine:
    return RolloutEngine(path, max_model_len=64, max_num_seqs=8, num_kv_blocks=16, kv_block_size=4)


@pytest.fixture(scope="module")
def engine(tiny_qwen3_path):
    return _make(tiny_qwen3_path)


def _unseeded_draw(engine) -> list[int]:
    return engine.generate([[5, 6, 7]], SP)[0].outputs[0].token_ids


@pytest.mark.parametrize("n", [9, 10**6, 2**62])
def test_n_above_max_num_seqs_is_refused_at_once(tiny_qwen3_path, n):
    engine, twin = _make(tiny_qwen3_path), _make(tiny_qwen3_path)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"SamplingParams.n={n} is invalid: must be at most the engine's "
                                         r"max_num_seqs=8"):
        engine.generate([[5, 6, 7], [8, 9]], SamplingParams(n=n, max_tokens=2))
    assert time.perf_counter() - t0 < 1.0  # checked before any loop over the samples
    # Nothing was drawn from the seed stream: the next unseeded call samples what a twin samples.
    assert _unseeded_draw(engine) == _unseeded_draw(twin)
    assert len(engine.generate([[5, 6, 7]], SamplingParams(n=8, max_tokens=2))[0].outputs) == 8


@pytest.mark.parametrize("temperature", [1e-40, 1e-8, MIN_TEMPERATURE / 2])
def test_tiny_temperatures_are_refused(temperature):
    with pytest.raises(ValueError, match=r"SamplingParams.temperature=.* must be 0 \(greedy\) or a finite "
                                         rf"number >= {MIN_TEMPERATURE}"):
        SamplingParams(temperature=temperature)
    sp = SamplingParams()
    sp.temperature = temperature  # changed after construction: generate validates again
    with pytest.raises(ValueError, match="SamplingParams.temperature"):
        sp.validate()


def test_smallest_temperature_gives_finite_logprobs_and_greedy_tokens(engine):
    """At MIN_TEMPERATURE the distribution is (nearly) one-hot: the greedy tokens, logprobs finite."""
    low = SamplingParams(temperature=MIN_TEMPERATURE, max_tokens=6, ignore_eos=True, logprobs=0, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    out = engine.generate([[5, 6, 7], [40, 41]], low)
    ref = engine.generate([[5, 6, 7], [40, 41]], greedy)
    for a, b in zip(out, ref):
        c = a.outputs[0]
        assert all(math.isfinite(lp) and lp <= 0.0 for lp in c.logprobs)
        assert c.token_ids == b.outputs[0].token_ids


def test_a_sequence_the_kv_pool_can_never_hold_names_the_limits(engine):
    small = RolloutEngine(engine.config, num_kv_blocks=3)
    with pytest.raises(ValueError, match=r"prompt 1: 23 tokens \(prompt 3 \+ max_tokens=20, at most "
                                         r"max_model_len=64\) do not fit the KV cache of 3 blocks of 4 tokens"):
        small.generate([[5, 6], [7, 8, 9]], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=20)])
    assert len(small.generate([[5, 6]], SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids) == 8
