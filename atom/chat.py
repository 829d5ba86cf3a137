"""Chat conversations to token ids, rendered with the tokenizer's chat template as vLLM's
`LLM.chat` renders them: the template applied to the messages (with the tools, template keyword
arguments such as Qwen3's `enable_thinking`, and the generation-prompt / continue-final-message
choice the caller gives), then the text tokenized without special tokens (the template writes
its own).

Messages are checked first (a ValueError naming the message): a string role; content that is a
string, a list of text parts (joined with newlines, vLLM's "string" content format, which
text-only templates expect), or None in an assistant turn that only calls tools (rendered as "").
Other content parts (images, audio) are multi-modal input, which atom does not take.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation is rendered (vLLM's `LLM.chat` arguments of the same names).

    chat_template: a Jinja template used instead of the tokenizer's own.
    add_generation_prompt: end with the assistant turn's opening (the usual case).
    continue_final_message: leave the last (assistant) message open, to be continued; excludes
        add_generation_prompt.
    tools: tool schemas, rendered by templates that take them.
    chat_template_kwargs: further template variables, e.g. {"enable_thinking": False}.
    """

    chat_template: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("chat: continue_final_message=True needs add_generation_prompt=False (the last "
                             "message is continued, not answered)")
        if self.tools is not None and not (isinstance(self.tools, list) and all(isinstance(t, dict) for t in self.tools)):
            raise TypeError(f"chat: tools must be a list of dicts, got {type(self.tools).__name__}")
        if not isinstance(self.chat_template_kwargs, dict):
            raise TypeError(f"chat: chat_template_kwargs must be a dict, got {type(self.chat_template_kwargs).__name__}")
        reserved = sorted(set(self.chat_template_kwargs) & {"conversation", "messages", "tokenize", "tools",
                                                            "chat_template", "add_generation_prompt",
                                                            "continue_final_message"})
        if reserved:
            raise ValueError(f"chat: chat_template_kwargs may not set {reserved} (arguments of their own)")


DEFAULT = ChatOptions()


def _text_of(label: str, i: int, message: dict) -> dict:
    """The message with its content as the template expects it (see the module docstring)."""
    if not isinstance(message.get("role"), str):
        raise ValueError(f"{label}: each chat message needs string 'role' and 'content' (message {i} has no role)")
    content = message.get("content")
    if isinstance(content, str):
        return message
    if content is None and message["role"] == "assistant" and message.get("tool_calls"):
        return {**message, "content": ""}  # (templates test `content is string`; None fails in some)
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = sorted({str(p.get("type")) for p in content} - {"text"})
        if kinds:
            raise ValueError(f"{label}: message {i} has {kinds} content parts: multi-modal input is not "
                             "supported by atom")
        if not all(isinstance(p.get("text"), str) for p in content):
            raise ValueError(f"{label}: message {i}: a text part needs a string 'text'")
        return {**message, "content": "\n".join(p["text"] for p in content)}
    raise ValueError(f"{label}: each chat message needs string 'role' and 'content' (message {i})")


def chat_token_ids(tokenizer: Any, conversation: list[dict], label: str,
                   options: ChatOptions = DEFAULT) -> list[int]:
    """The token ids of one conversation under `options` (ValueError naming `label` when the
    tokenizer has no template and none is given, or a message is malformed)."""
    if tokenizer is None or (options.chat_template is None and not getattr(tokenizer, "chat_template", None)):
        raise ValueError(f"{label}: chat prompts need a tokenizer with a chat template")
    messages = [_text_of(label, i, m) for i, m in enumerate(conversation)]
    text = tokenizer.apply_chat_template(
        messages, tools=options.tools, chat_template=options.chat_template, tokenize=False,
        add_generation_prompt=options.add_generation_prompt,
        continue_final_message=options.continue_final_message, **options.chat_template_kwargs)
    return list(tokenizer(text, add_special_tokens=False).input_ids)
