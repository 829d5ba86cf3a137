"""atom.compat.vllm: vLLM's LLM API over atom, checked against atom's own engine and HF."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from atom import RolloutEngine
from atom import SamplingParams as AtomParams
from atom.compat.vllm import LLM, SamplingParams, TokensPrompt
from atom.compat.vllm.sampling_params import StructuredOutputsParams
from helpers import hf_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(num_kv_blocks=128, max_model_len=256, max_num_seqs=16)


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path):
    return LLM(tiny_chat_model_path, **KW)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vllm_script_runs_unchanged_but_for_the_import(tiny_chat_model_path):
    """examples/vllm_compat.py is a vLLM script (sleep, wake, load_weights, token-id prompts,
    processed logprobs); on atom its logprobs after the weight sync match the trainer's."""
    source = open(os.path.join(ROOT, "examples", "vllm_compat.py")).read()
    assert "from atom.compat.vllm import LLM, SamplingParams  # was: from vllm import LLM, SamplingParams" in source
    assert "atom" not in source.replace("from atom.compat.vllm import", "").split('if __name__')[0].split('"""')[2]
    result = _load_example("vllm_compat").main(tiny_chat_model_path)
    outs = result["outputs"]
    assert result["same_after_wake"] and result["max_logprob_gap"] < 1e-4
    assert [o.prompt for o in outs] == [None, "Once upon a time"]
    assert all(len(o.outputs) == 4 and [c.index for c in o.outputs] == [0, 1, 2, 3] for o in outs)
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for o in outs for c in o.outputs)


def test_outputs_equal_atoms_own_in_vllms_shapes(tiny_chat_model_path, llm):
    engine = RolloutEngine(tiny_chat_model_path, **KW)
    ids = [1, 504, 3575, 282, 4649, 314]
    sp = SamplingParams(n=3, temperature=1.0, top_k=20, max_tokens=6, logprobs=3, prompt_logprobs=2, seed=5,
                        ignore_eos=True)
    got = llm.generate(TokensPrompt(prompt_token_ids=ids), sp, use_tqdm=False)
    want = engine.generate([ids], AtomParams(n=3, temperature=1.0, top_k=20, max_tokens=6, logprobs=3,
                                             prompt_logprobs=2, seed=5, ignore_eos=True, logprobs_mode="raw"))
    (g,), (w,) = got, want
    assert g.prompt is None and g.prompt_token_ids == ids and g.finished
    tok = llm.get_tokenizer()
    for gc, wc in zip(g.outputs, w.outputs):
        assert gc.token_ids == wc.token_ids and gc.text == wc.text and gc.finish_reason == "length"
        assert gc.cumulative_logprob == pytest.approx(sum(wc.logprobs))
        for pos, (t, lp, top) in enumerate(zip(wc.token_ids, wc.logprobs, wc.top_logprobs)):
            d = gc.logprobs[pos]
            assert next(iter(d)) == t and d[t].logprob == lp and d[t].decoded_token == tok.decode([t])
            ranked = sorted(top.items(), key=lambda kv: -kv[1])
            for r, (tid, v) in enumerate(ranked, 1):
                assert d[tid].rank == r and d[tid].logprob == v
            # vLLM's rank of the sampled token: its exact rank among all tokens (tokens of equal
            # value count as better), here against HF's raw logprobs of the same sequence
            ref = hf_logits(tiny_chat_model_path, ids + wc.token_ids).log_softmax(-1)[len(ids) - 1 + pos]
            assert _rank_bounds(ref, t)[0] <= d[t].rank <= _rank_bounds(ref, t)[1]
            assert set(d) == set(top) | {t}
    assert g.prompt_logprobs[0] is None and len(g.prompt_logprobs) == len(ids)
    ref = hf_logits(tiny_chat_model_path, ids).log_softmax(-1)
    for pos in range(1, len(ids)):
        d, raw = g.prompt_logprobs[pos], w.prompt_logprobs[pos]
        assert d[ids[pos]].logprob == raw[ids[pos]] and len(d) in (2, 3)
        lo, hi = _rank_bounds(ref[pos - 1], ids[pos])
        assert lo <= d[ids[pos]].rank <= hi


def _rank_bounds(logprobs, token: int, tol: float = 1e-4) -> tuple[int, int]:
    """The rank of `token` in a reference row, as a range over values within `tol` of its own."""
    v = logprobs[token].item()
    return int((logprobs > v + tol).sum()) + 1, int((logprobs >= v - tol).sum())


def test_processed_logprobs_are_the_trainers_at_the_sampling_temperature(tiny_chat_model_path):
    from transformers import AutoModelForCausalLM
    llm = LLM(tiny_chat_model_path, logprobs_mode="processed_logprobs", **KW)
    ids = [1, 30, 31, 32, 33]
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.7, max_tokens=8, logprobs=0, seed=3))
    c = out[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_chat_model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1: -1] / 0.7
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    got = torch.tensor([c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert llm.llm_engine.model_config.logprobs_mode == "processed_logprobs"


def test_prompt_forms_and_text_options(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    text = llm.generate("Hello there", sp, use_tqdm=False)
    as_dict = llm.generate([{"prompt": "Hello there"}], sp, use_tqdm=False)
    ids = llm.get_tokenizer().encode("Hello there")
    as_ids = llm.generate(ids, sp, use_tqdm=False)  # a bare list of ints is one token-id prompt
    assert text[0].prompt == "Hello there" and as_ids[0].prompt is None
    assert text[0].outputs[0].token_ids == as_dict[0].outputs[0].token_ids == as_ids[0].outputs[0].token_ids
    assert text[0].outputs[0].logprobs is None and text[0].outputs[0].cumulative_logprob is None
    quiet = llm.generate("Hello there", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                       detokenize=False), use_tqdm=False)
    assert quiet[0].outputs[0].text == "" and quiet[0].outputs[0].token_ids == text[0].outputs[0].token_ids
    # max_tokens=None: up to the context length (vLLM's meaning)
    long = llm.generate([list(range(2, 200))], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),
                        use_tqdm=False)
    assert len(long[0].outputs[0].token_ids) == 256 - 198 and long[0].outputs[0].finish_reason == "length"
    # include_stop_str_in_output: the stop string stays in the text
    first = text[0].outputs[0].text
    stop = first.strip()[:2]
    if stop:
        cut = llm.generate("Hello there", SamplingParams(temperature=0.0, max_tokens=4, stop=[stop]), use_tqdm=False)
        kept = llm.generate("Hello there", SamplingParams(temperature=0.0, max_tokens=4, stop=[stop],
                                                          include_stop_str_in_output=True), use_tqdm=False)
        assert kept[0].outputs[0].text == cut[0].outputs[0].text + stop
    chat = llm.chat([{"role": "user", "content": "Hi"}], sp, use_tqdm=False)
    assert "Hi" in chat[0].prompt and len(chat[0].outputs[0].token_ids) == 4


def test_unsupported_options_fail_clearly(tiny_chat_model_path, llm):
    # vLLM's options atom has pass through (the mapping reads atom's fields)...
    sp = SamplingParams(repetition_penalty=1.3, bad_words=["x"], logit_bias={5: 1.0})
    assert sp.to_atom().repetition_penalty == 1.3 and sp.to_atom().bad_words == ["x"]
    # ...the rest is refused by name unless left at vLLM's default.
    with pytest.raises(ValueError, match="best_of=3 not supported"):
        SamplingParams(n=1, best_of=3)
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=[lambda ids, logits: logits])
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+"))
    # extra_args only travels with the request (vLLM reads it in plugins only): carried, not refused.
    carried = SamplingParams(temperature=0.0, max_tokens=3, extra_args={"trainer_step": 7})
    plain = SamplingParams(temperature=0.0, max_tokens=3)
    assert carried.extra_args == {"trainer_step": 7} and carried.clone().extra_args == {"trainer_step": 7}
    assert (llm.generate("Hi", carried, use_tqdm=False)[0].outputs[0].token_ids
            == llm.generate("Hi", plain, use_tqdm=False)[0].outputs[0].token_ids)
    # Token ids as trainers hold them (a tensor row, numpy ids) in a TokensPrompt: as the list.
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    ids = [1, 504, 3575, 282]
    want = llm.generate(TokensPrompt(prompt_token_ids=ids), greedy, use_tqdm=False)[0]
    for arr in (torch.tensor(ids), np.array(ids)):
        got = llm.generate(TokensPrompt(prompt_token_ids=arr), greedy, use_tqdm=False)[0]
        assert got.prompt_token_ids == ids and got.outputs[0].token_ids == want.outputs[0].token_ids
    # from_optional: None means the field's default (vLLM's OpenAI server builds them so).
    opt = SamplingParams.from_optional(n=None, temperature=0.5, top_p=None, seed=3, logit_bias={"5": 250})
    assert (opt.n, opt.temperature, opt.top_p, opt.max_tokens, opt.seed) == (1, 0.5, 1.0, 16, 3)
    assert opt.logit_bias == {5: 100.0}
    assert SamplingParams.from_optional(max_tokens=None).max_tokens is None  # None: up to max_model_len
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_optional(top_p=2.0)
    SamplingParams(repetition_penalty=1.0, presence_penalty=0.0, best_of=1)  # neutral values pass
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lora_rank_x'"):
        LLM(tiny_chat_model_path, max_lora_rank_x=8, **KW)
    with pytest.raises(ValueError, match="quantization"):
        LLM(tiny_chat_model_path, quantization="awq", **KW)
    with pytest.raises(ValueError, match="logprobs_mode"):
        LLM(tiny_chat_model_path, logprobs_mode="final_logprobs", **KW)
    with pytest.raises(ValueError, match="multi-modal"):
        llm.generate([{"prompt_token_ids": [1, 2], "multi_modal_data": {"image": [object()]}}])
    with pytest.raises(ValueError, match="LoRA"):
        llm.generate("x", lora_request=object())
    with pytest.raises(ValueError, match="priority=\\[0, 2\\]"):
        llm.generate(["x", "y"], priority=[0, 2])
    assert len(llm.generate(["x", "y"], SamplingParams(max_tokens=1), priority=[0, 0], use_tqdm=False)) == 2


def test_trls_engine_arguments_are_accepted(tiny_chat_model_path):
    """The exact LLM(...) call of TRL's colocate mode (trl/generation/vllm_generation.py)."""
    llm = LLM(model=tiny_chat_model_path, tensor_parallel_size=1, gpu_memory_utilization=0.9, max_model_len=256,
              max_num_seqs=8, enable_sleep_mode=True, model_impl="auto", distributed_executor_backend="external_launcher",
              seed=0, max_num_batched_tokens=4096, logprobs_mode="processed_logprobs", quantization=None,
              trust_remote_code=False, num_kv_blocks=64)
    assert llm.engine.config.max_num_seqs == 8 and llm.logprobs_mode == "processed"
    assert llm.llm_engine.model_config.max_model_len == 256


class _Extension:
    """A framework's worker extension (vLLM mixes it into the worker class)."""

    def double_rank(self, x):
        return (self.rank + 1) * x


def test_collective_rpc_and_worker_extension(tiny_chat_model_path):
    llm = LLM(tiny_chat_model_path, worker_extension_cls=f"{__name__}._Extension", **KW)
    assert llm.collective_rpc("double_rank", args=(21,)) == [21]
    assert llm.collective_rpc("report_device_id") == ["cpu"]
    assert llm.collective_rpc(lambda worker, k: worker.rank + k, kwargs={"k": 3}) == [3]
    with pytest.raises(AttributeError, match="no method 'nope'"):
        llm.collective_rpc("nope")
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    before = llm.generate([[5, 6, 7]], sp, use_tqdm=False)[0].outputs[0].token_ids
    llm.collective_rpc("sleep", args=(2,))
    llm.collective_rpc("wake_up", kwargs={"tags": ["weights"]})
    from atom.models.weights import iter_checkpoint
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    loaded = model.load_weights(iter_checkpoint(tiny_chat_model_path))
    assert "model.embed_tokens.weight" in loaded
    llm.wake_up(["kv_cache"])
    assert llm.collective_rpc("reset_prefix_cache") == [True]
    assert llm.generate([[5, 6, 7]], sp, use_tqdm=False)[0].outputs[0].token_ids == before
