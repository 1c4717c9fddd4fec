"""One dataset row's turns as chat messages, for data as other tools write it.

Every row format ends as a :class:`Conversation`: OpenAI-style messages
(``{"role": "system" | "user" | "assistant" | "tool", "content": str}``) plus what the
chat template needs besides text:

- **Tool calls.** An assistant turn may carry ``tool_calls``
  (``[{"type": "function", "function": {"name", "arguments": {...}}}]``, arguments
  always a JSON object) and a ``tool`` turn is a tool's result. The row's tool schemas
  (a ``tools`` column: a list, or a JSON string of one) are the conversation's
  ``tools``, normalised to ``{"type": "function", "function": {...}}``. ShareGPT's
  ``function_call`` and ``observation`` turns (LLaMA-Factory, Glaive) and the older
  OpenAI ``function_call`` / ``function`` role map onto the same shape.
- **Content parts.** ``content`` as a list of parts: text parts (``type: "text"``
  with ``text`` or ``value``) are joined in order; ``reasoning`` / ``thinking`` parts
  become the turn's reasoning.
- **Reasoning.** ``reasoning_content`` (or ``reasoning`` / ``thinking``) on an
  assistant turn, kept as ``reasoning_content`` (the renderer also passes it as
  ``thinking``, the name some templates read).
- **Answers not to train.** An assistant turn with ``"weight": 0`` (OpenAI's fine-tuning
  format) stays in the conversation as context and is masked.
- **Images, audio, video.** Refused with :class:`MediaError`, never dropped: tunedeck
  trains on text only.

Light: the standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
    "observation": "tool", "tool": "tool", "function": "tool", "ipython": "tool", "function_response": "tool",
    "tool_response": "tool",
}
# speakers whose turn is an assistant's tool call (its text is the call as JSON)
CALL_SPEAKERS = ("function_call", "tool_call", "tool_calls")
# columns and content-part types that hold media tunedeck cannot train on
MEDIA_COLUMNS = ("images", "image", "audios", "audio", "videos", "video")
MEDIA_PARTS = {
    "image": "an image", "image_url": "an image", "input_image": "an image", "audio": "audio",
    "input_audio": "audio", "audio_url": "audio", "video": "a video", "video_url": "a video",
    "file": "a file", "input_file": "a file",
}
TEXT_PARTS = ("text", "input_text", "output_text")
REASONING_PARTS = ("reasoning", "thinking", "reasoning_content")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


class MediaError(ValueError):
    """A row that holds images, audio or video: refused, since training is text only."""

    def __init__(self, what: str, where: str) -> None:
        self.what, self.where = what, where
        super().__init__(f"{where} holds {what}; tunedeck trains on text only")


class Conversation(list):
    """A list of messages that also carries the row's tool schemas (``tools``, or None)."""

    def __init__(self, messages: Iterable[dict[str, Any]] = (), tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(messages)
        self.tools = tools or None

    def __reduce__(self) -> Any:
        return (Conversation, (list(self), self.tools))

    def with_messages(self, messages: Iterable[dict[str, Any]]) -> Conversation:
        return Conversation(messages, self.tools)


def tools_of(messages: Any) -> list[dict[str, Any]] | None:
    """The tool schemas a conversation carries (None for a plain list of messages)."""
    return getattr(messages, "tools", None)


def has_reasoning(messages: Iterable[dict[str, Any]]) -> bool:
    return any(m.get("reasoning_content") for m in messages)


def has_tool_turns(messages: Iterable[dict[str, Any]]) -> bool:
    return any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def drop_reasoning(messages: Any) -> Any:
    """The conversation without its reasoning (``dataset.reasoning = "drop"``)."""
    if not has_reasoning(messages):
        return messages
    out = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    return Conversation(out, tools_of(messages))


# -- rows -------------------------------------------------------------------------------------


def check_media(row: dict[str, Any]) -> None:
    """MediaError when a row has a media column with something in it."""
    for name in MEDIA_COLUMNS:
        value = row.get(name)
        if value is None or value == "" or value == [] or value == {}:
            continue
        n = len(value) if isinstance(value, list) else 1
        noun = {"image": "image", "audio": "audio clip", "video": "video"}[name.rstrip("s")]
        raise MediaError(f"{n} {noun}{'s' if n != 1 else ''}", f'column "{name}"')


def parse_json_field(value: Any, name: str) -> Any:
    """A field that may hold JSON as a string (``tools``, ``arguments``): the value it holds."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f'"{name}" is a string that is not JSON') from None


def normalise_tools(value: Any, name: str = "tools") -> list[dict[str, Any]] | None:
    """A row's tool schemas as ``[{"type": "function", "function": {...}}]``, or None."""
    value = parse_json_field(value, name)
    if value is None or value == []:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f'"{name}" is not a list of tool schemas (got {type(value).__name__})')
    tools = []
    for i, tool in enumerate(value, 1):
        tool = parse_json_field(tool, f"{name}[{i}]")
        if not isinstance(tool, dict):
            raise ValueError(f'"{name}" entry {i} is not an object')
        if isinstance(tool.get("function"), dict):
            fn = tool["function"]
        elif "name" in tool:
            fn = tool
        else:
            raise ValueError(f'"{name}" entry {i} has no function name')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f'"{name}" entry {i} has no function name')
        tools.append({"type": "function", "function": dict(fn)})
    return tools


def normalise_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls (OpenAI ``tool_calls``, a ShareGPT ``function_call`` turn's JSON, or one
    call) as ``[{"type": "function", "function": {"name", "arguments": {...}}}]``."""
    value = parse_json_field(value, "tool call")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: a tool call that is not a JSON object with a name and arguments")
    calls = []
    for call in value:
        if not isinstance(call, dict):
            raise ValueError(f"{where}: a tool call that is not an object")
        fn = call["function"] if isinstance(call.get("function"), dict) else call
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: a tool call without a function name")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                raise ValueError(f"{where}: the arguments of the call to {name} are not JSON") from None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ValueError(f"{where}: the arguments of the call to {name} are not a JSON object")
        out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls


def content_text(content: Any, where: str) -> tuple[str, str]:
    """A turn's content as (text, reasoning): a string, or a list of parts."""
    if content is None:
        return "", ""
    if isinstance(content, str):
        return content, ""
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise ValueError(f"{where}: content is not text (got {type(content).__name__})")
    texts: list[str] = []
    reasoning: list[str] = []
    for k, part in enumerate(content, 1):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ValueError(f"{where}: content part {k} is not an object")
        kind = part.get("type")
        if kind in MEDIA_PARTS or (kind is None and any(m in part for m in ("image", "image_url", "audio", "video"))):
            raise MediaError(MEDIA_PARTS.get(str(kind), "an image"), f'{where}, content part {k} (type "{kind}")')
        if kind in REASONING_PARTS:
            text = next((part[key] for key in ("text", *REASONING_PARTS, "value") if isinstance(part.get(key), str)),
                        None)
            if text is None:
                raise ValueError(f"{where}: reasoning part {k} has no text")
            reasoning.append(text)
            continue
        if kind in TEXT_PARTS or kind is None:
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise ValueError(f'{where}: text part {k} has no "text" or "value"')
            texts.append(text)
            continue
        raise ValueError(f'{where}: content part {k} of unknown type "{kind}" (text parts are read)')
    return "".join(texts), "".join(reasoning)


def make_turn(role: str, content: Any, where: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """One message: role, content (text), and what the source turn adds (tool calls,
    reasoning, a tool result's name and call id)."""
    source = source or {}
    text, reasoning = content_text(content, where)
    message: dict[str, Any] = {"role": role, "content": text}
    if role == "assistant":
        calls = source.get("tool_calls")
        if calls is None and source.get("function_call") is not None:  # the older OpenAI field
            calls = source["function_call"]
        if calls:
            message["tool_calls"] = normalise_calls(calls, where)
        for key in REASONING_KEYS:
            value = source.get(key)
            if isinstance(value, str) and value:
                reasoning = value + reasoning
                break
        if reasoning:
            message["reasoning_content"] = reasoning
        if source.get("weight") in (0, 0.0) and not isinstance(source.get("weight"), bool):
            message["weight"] = 0  # OpenAI's fine-tuning format: this answer is context, not trained
    elif role == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(source.get(key), str):
                message[key] = source[key]
    return message


def tool_content(content: Any) -> Any:
    """A tool result given as JSON data rather than text: the JSON text of it."""
    if isinstance(content, (dict, int, float, bool)) or (isinstance(content, list) and not all(
            isinstance(p, dict) and "type" in p for p in content)):
        return json.dumps(content, ensure_ascii=False)
    return content


def openai_turns(raw: list[Any]) -> list[dict[str, Any]]:
    """``messages`` rows: each ``{"role", "content", ...}`` (``from``/``value`` also read)."""
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        who = m.get("role", m.get("from"))
        role = ROLE_ALIASES.get(str(who).lower()) if isinstance(who, str) else None
        if role is None and isinstance(who, str) and who.lower() in CALL_SPEAKERS:
            messages.append(_call_turn(m.get("content", m.get("value")), f"message {i}"))
            continue
        if role is None:
            raise ValueError(f"message {i}: unknown role {who!r} (expected system, user, assistant or tool)")
        content = m.get("content", m.get("value"))
        if role == "tool":
            content = tool_content(content)
        if content is None and role in ("system", "user"):
            raise ValueError(f"message {i}: no content")
        if content is not None and not isinstance(content, (str, list, dict)):
            raise ValueError(f"message {i}: content is not text")
        messages.append(make_turn(role, content, f"message {i}", m))
    return merge_calls(messages)


def sharegpt_turns(raw: list[Any]) -> list[dict[str, Any]]:
    """``conversations`` rows: each ``{"from", "value"}`` (``role``/``content`` also read);
    ``function_call`` turns are assistant tool calls, ``observation`` turns tool results."""
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(raw, 1):
        if not isinstance(m, dict):
            raise ValueError(f"turn {i} is not an object")
        who = m.get("from", m.get("role"))
        value = m.get("value", m.get("content"))
        speaker = str(who).lower() if who is not None else None
        if speaker in CALL_SPEAKERS:
            messages.append(_call_turn(value, f"turn {i}"))
            continue
        role = ROLE_ALIASES.get(speaker) if speaker is not None else None
        if role is None:
            raise ValueError(f"turn {i}: unknown speaker {who!r} (expected human, gpt, system, function_call "
                             "or observation)")
        if role == "tool":
            value = tool_content(value)
        if not isinstance(value, (str, list, dict)):
            raise ValueError(f"turn {i}: value is not text")
        messages.append(make_turn(role, value, f"turn {i}", m))
    return merge_calls(messages)


def _call_turn(value: Any, where: str) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": normalise_calls(value, where)}


def merge_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant turn followed by a turn that only calls tools is one turn: the text and then the calls."""
    out: list[dict[str, Any]] = []
    for m in messages:
        prev = out[-1] if out else None
        if (prev is not None and prev["role"] == "assistant" and m["role"] == "assistant" and m.get("tool_calls")
                and not m["content"] and not prev.get("tool_calls")):
            merged = dict(prev)
            merged["tool_calls"] = m["tool_calls"]
            out[-1] = merged
            continue
        out.append(m)
    return out


def check_turns(messages: list[dict[str, Any]]) -> None:
    """The order a chat template can render and a model can learn from; ValueError saying what is wrong."""
    if not messages:
        raise ValueError("no messages")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError("only a system message")
    if any(m["role"] == "system" for m in body):
        raise ValueError("a system message after the first turn")
    if not any(m["role"] == "assistant" for m in body):
        raise ValueError("no assistant answer to train on")
    for m in body:
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise ValueError("an empty assistant answer")
    if body[0]["role"] != "user":
        raise ValueError("the conversation does not start with a user turn")
    for a, b in zip(body, body[1:]):
        if b["role"] == "tool":
            if not (a["role"] == "tool" or (a["role"] == "assistant" and a.get("tool_calls"))):
                raise ValueError("a tool result that follows no tool call")
            continue
        if a["role"] == "assistant" and a.get("tool_calls") and b["role"] != "tool":
            raise ValueError("a tool call with no tool result after it")
        if a["role"] == b["role"] and a["role"] != "tool":
            raise ValueError(f"two {a['role']} turns in a row")
