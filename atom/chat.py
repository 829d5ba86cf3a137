"""Chat conversations to token ids, rendered with the tokenizer's chat template as vLLM's
`LLM.chat` renders them: the messages normalised as vLLM's `parse_chat_messages` does, the
template applied (with the tools, template keyword arguments such as Qwen3's `enable_thinking`,
and the generation-prompt / continue-final-message choice the caller gives), then the text
tokenized without special tokens (the template writes its own BOS: no double BOS).

Messages are checked first (a ValueError naming the message): a dict with a string role; content
that is a string, a list of text parts (`{"type": "text", "text": ...}`, also `input_text`,
`output_text`, `refusal`, `thinking`, or a bare string), or, in an assistant turn, None / missing
(an assistant turn that only calls tools). Other content parts (images, audio) are multi-modal
input, which atom does not take. The caller's messages are never modified.

Content reaches the template in vLLM's "string" format (text parts joined with newlines) unless
the template loops over a message's content: then, as vLLM's "auto" detection chooses, in the
"openai" format, a list of `{"type": "text", "text": ...}` parts (tool results stay strings).
Tool-call arguments given as JSON strings (the OpenAI wire format) are parsed into dicts, as
vLLM does, because templates render them with `tojson`.
"""
from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

logger = logging.getLogger(__name__)

CONTENT_FORMATS = ("auto", "string", "openai")
# Text-like content part types and the key holding their text (vLLM's MM_PARSER_MAP).
_TEXT_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
              "thinking": "thinking"}
_RESERVED_KWARGS = {"conversation", "messages", "tokenize", "tools", "chat_template", "add_generation_prompt",
                    "continue_final_message"}


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation is rendered (vLLM's `LLM.chat` arguments of the same names).

    chat_template: a Jinja template used instead of the tokenizer's own.
    add_generation_prompt: end with the assistant turn's opening (the usual case).
    continue_final_message: leave the last (assistant) message open, to be continued; excludes
        add_generation_prompt.
    tools: tool schemas, rendered by templates that take them.
    chat_template_kwargs: further template variables, e.g. {"enable_thinking": False}.
    content_format: "auto" (detected from the template, as vLLM does), "string" or "openai".
    """

    chat_template: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    content_format: str = "auto"

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("chat: continue_final_message=True needs add_generation_prompt=False (the last "
                             "message is continued, not answered)")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise TypeError(f"chat: chat_template must be a string, got {type(self.chat_template).__name__}")
        if self.tools is not None and not (isinstance(self.tools, list) and all(isinstance(t, dict) for t in self.tools)):
            raise TypeError(f"chat: tools must be a list of dicts, got {type(self.tools).__name__}")
        if not isinstance(self.chat_template_kwargs, dict):
            raise TypeError(f"chat: chat_template_kwargs must be a dict, got {type(self.chat_template_kwargs).__name__}")
        reserved = sorted(set(self.chat_template_kwargs) & _RESERVED_KWARGS)
        if reserved:
            raise ValueError(f"chat: chat_template_kwargs may not set {reserved} (arguments of their own)")
        if self.content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat: chat_template_content_format={self.content_format!r} must be one of "
                             f"{list(CONTENT_FORMATS)}")


DEFAULT = ChatOptions()


# ---- rendering ----------------------------------------------------------------------------
def chat_token_ids(tokenizer: Any, conversation: list[dict], label: str,
                   options: ChatOptions = DEFAULT) -> list[int]:
    """The token ids of one conversation under `options` (ValueError naming `label` when the
    tokenizer has no template and none is given, or a message is malformed)."""
    text = render_chat(tokenizer, conversation, label, options)
    # The template writes the special tokens itself (BOS included): adding them again would
    # double the BOS, which vLLM avoids the same way.
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def render_chat(tokenizer: Any, conversation: list[dict], label: str, options: ChatOptions = DEFAULT) -> str:
    """The prompt text of one conversation: what vLLM's `LLM.chat` returns as `RequestOutput.prompt`."""
    template = _template_of(tokenizer, options, label)
    messages = chat_messages(conversation, label, _resolve_format(options.content_format, template))
    # Any role's final message may be continued (HF and vLLM leave a user message open too).
    if options.continue_final_message and not messages:
        raise ValueError(f"{label}: continue_final_message=True needs a final message; the conversation is empty")
    return tokenizer.apply_chat_template(
        messages, tools=options.tools, chat_template=options.chat_template, tokenize=False,
        add_generation_prompt=options.add_generation_prompt,
        continue_final_message=options.continue_final_message, **options.chat_template_kwargs)


def _template_of(tokenizer: Any, options: ChatOptions, label: str) -> str:
    """The template text transformers will apply (a named one chosen as it chooses)."""
    if tokenizer is None or (options.chat_template is None and not getattr(tokenizer, "chat_template", None)):
        raise ValueError(f"{label}: chat prompts need a tokenizer with a chat template")
    if hasattr(tokenizer, "get_chat_template"):
        return tokenizer.get_chat_template(options.chat_template, options.tools)
    template = options.chat_template or tokenizer.chat_template
    return template if isinstance(template, str) else ""


def _resolve_format(content_format: str, template: str) -> str:
    """"auto" resolved as vLLM resolves it: "openai" for templates that loop over content."""
    if content_format != "auto":
        return content_format
    return "openai" if loops_over_content(template) else "string"


# ---- messages -----------------------------------------------------------------------------
def chat_messages(conversation: Any, label: str, content_format: str = "string") -> list[dict]:
    """The messages as the template receives them (new dicts; the caller's are left as they are)."""
    if not isinstance(conversation, (list, tuple)):
        raise ValueError(f"{label}: a conversation is a list of messages, got {type(conversation).__name__}")
    return [_message(label, i, m, content_format) for i, m in enumerate(conversation)]


def _message(label: str, i: int, message: Any, content_format: str) -> dict:
    """One message checked and normalised (see the module docstring)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        what = "no string role" if isinstance(message, dict) else f"a {type(message).__name__}, not a dict"
        raise ValueError(f"{label}: each chat message needs string 'role' and 'content' (message {i}): {what}")
    role = message["role"]
    texts = _texts(label, i, role, message.get("content"))
    out = {**message, "content": _formatted(texts, role, content_format)}
    if role == "assistant":
        calls = _tool_calls(label, i, message.get("tool_calls"))
        out.pop("tool_calls", None)
        if calls:  # (an empty list is dropped, as vLLM drops it: templates take the plain-answer branch)
            out["tool_calls"] = calls
    return out


def _texts(label: str, i: int, role: str, content: Any) -> list[str]:
    """The text pieces of a message's content."""
    if isinstance(content, str):
        return [content]
    if content is None and role == "assistant":
        return []  # an assistant turn that only calls tools
    if isinstance(content, (list, tuple)):
        return [t for t in (_part_text(label, i, p) for p in content) if t is not None]
    problem = "content is None (only an assistant turn may omit it)" if content is None else \
        f"content is a {type(content).__name__}"
    raise ValueError(f"{label}: each chat message needs string 'role' and 'content' (message {i}): {problem}")


def _part_text(label: str, i: int, part: Any) -> str | None:
    """The text of one content part; None for a text part without text (vLLM skips those)."""
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    if not isinstance(part, dict) or kind not in _TEXT_KEYS:
        raise ValueError(f"{label}: message {i} has {[str(kind)]} content parts: multi-modal input is not "
                         "supported by atom (text parts only)")
    text = part.get(_TEXT_KEYS[kind])
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{label}: message {i}: a {kind!r} part needs a string {_TEXT_KEYS[kind]!r}, got "
                         f"{type(text).__name__}")
    return text


def _formatted(texts: list[str], role: str, content_format: str) -> str | list[dict]:
    """Content in the template's format. Tool results stay strings in both, as vLLM keeps them
    (most templates print a tool message's content directly)."""
    if content_format == "openai" and role != "tool":
        return [{"type": "text", "text": t} for t in texts]
    return "\n".join(texts)


def _tool_calls(label: str, i: int, calls: Any) -> list[dict] | None:
    """An assistant turn's tool calls with their arguments as dicts (copies)."""
    if calls is None:
        return None
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{label}: message {i}: tool_calls must be a list, got {type(calls).__name__}")
    return [_tool_call(label, i, call) for call in calls]


def _tool_call(label: str, i: int, call: Any) -> dict:
    if not isinstance(call, dict):
        raise ValueError(f"{label}: message {i}: each tool call must be a dict, got {type(call).__name__}")
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        raise ValueError(f"{label}: message {i}: tool calls must be of type 'function' with a 'function' dict")
    return {**call, "function": {**function, "arguments": _arguments(function.get("name"), function.get("arguments"))}}


def _arguments(name: Any, arguments: Any) -> dict:
    """Arguments as a dict, as vLLM passes them: a JSON string is parsed; missing or empty
    arguments are {}, and so (with a warning) are malformed or non-object ones: a bad call in the
    history must not make every later turn fail."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    parsed = None
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(parsed, dict):
        logger.warning("tool call %r: arguments are not a JSON object; rendered as {}", name)
        return {}
    return parsed


# ---- content format detection (vLLM's reading of the template) ----------------------------
class _Unreadable(Exception):
    """A loop or assignment target vLLM's walk does not handle (it falls back to "string")."""


@lru_cache(maxsize=32)
def loops_over_content(template: str) -> bool:
    """Whether the template iterates over a message's content, so it wants the "openai" format:
    a loop over `message.content` / `message['content']` (also through a filter, test or slice),
    over a macro parameter given a message's content, or, outside macros, over `content`."""
    ast = _parse(template)
    if ast is None:
        return False
    try:
        return next(_content_loops(ast), None) is not None
    except _Unreadable:
        return False


def _parse(template: str) -> Any:
    """The template's syntax tree in the environment transformers renders with (its extensions
    included); None when it does not parse (rendering will then report the error)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        return _compile_jinja_template(template).environment.parse(template)
    except Exception:  # (a private helper of transformers, or a template that does not compile)
        try:
            import jinja2
            return jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
        except Exception:
            return None


def _reads(node: Any, var: str, key: str | None = None) -> bool:
    """Whether `node` reads `var` (or `var.key` / `var[key]`), possibly filtered, tested or sliced."""
    from jinja2 import nodes
    if isinstance(node, nodes.Filter):
        return node.node is not None and _reads(node.node, var, key)
    if isinstance(node, nodes.Test) or (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)):
        return _reads(node.node, var, key)
    if key is None:
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == var
    if isinstance(node, nodes.Getitem):
        return _reads(node.node, var) and isinstance(node.arg, nodes.Const) and node.arg.value == key
    return isinstance(node, nodes.Getattr) and _reads(node.node, var) and node.attr == key


def _target(node: Any) -> str:
    from jinja2 import nodes
    if not isinstance(node, nodes.Name):
        raise _Unreadable
    return node.name


def _aliases(root: Any, var: str) -> list[str]:
    """`var` and every variable assigned from it, transitively."""
    from jinja2 import nodes
    names, queue = [var], deque([var])
    while queue:
        current = queue.popleft()
        for assign in root.find_all(nodes.Assign):
            if _reads(assign.node, current):
                name = _target(assign.target)
                if name not in names:
                    names.append(name)
                    queue.append(name)
    return names


def _message_vars(root: Any) -> list[str]:
    """The loop variables that walk over the messages."""
    from jinja2 import nodes
    sources = _aliases(root, "messages")
    return [_target(loop.target) for loop in root.find_all(nodes.For)
            if any(_reads(loop.iter, name) for name in sources)]


def _macro_content_params(root: Any, message_vars: list[str]) -> tuple[dict[int, set[str]], set[int]]:
    """For loops inside macros: the macro parameters that calls fill with a message's content
    (by loop id), and the ids of all loops inside macros."""
    from jinja2 import nodes
    params_by_loop: dict[int, set[str]] = {}
    in_macros: set[int] = set()
    for macro in root.find_all(nodes.Macro):
        names = [a.name for a in macro.args]
        params: set[str] = set()
        for call in root.find_all(nodes.Call):
            if not (isinstance(call.node, nodes.Name) and call.node.name == macro.name):
                continue
            given = list(zip(names, call.args)) + [(k.key, k.value) for k in call.kwargs if k.key in names]
            params |= {n for n, value in given if any(_reads(value, m, "content") for m in message_vars)}
        for loop in macro.find_all(nodes.For):
            in_macros.add(id(loop))
            if params:
                params_by_loop[id(loop)] = params
    return params_by_loop, in_macros


def _content_loops(root: Any) -> Iterator[str]:
    """The loop variables of loops over a message's content, in template order."""
    from jinja2 import nodes
    message_vars = _message_vars(root)
    params_by_loop, in_macros = _macro_content_params(root, message_vars)
    for loop in root.find_all(nodes.For):
        over_name = isinstance(loop.iter, nodes.Name)
        if (any(_reads(loop.iter, m, "content") for m in message_vars)
                or (over_name and loop.iter.name in params_by_loop.get(id(loop), ()))
                or (over_name and id(loop) not in in_macros and loop.iter.name == "content")):
            yield _target(loop.target)
