"""Render and mask: chat messages -> ``input_ids`` and ``labels``, the one code path for
what trains and what the dataset preview shows.

:func:`render` applies the chat template, tokenizes the whole rendered string once, and
marks which tokens the loss sees:

- ``loss_on="assistant"`` trains every assistant turn: the answer's tokens and the
  end-of-turn token that closes it (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for
  Llama 3, eos for the Alpaca template), so the model learns to stop. The token after it
  (ChatML's newline) and every prompt token are masked with -100.
- ``loss_on="all"`` trains every token.
- ``text`` rows (one assistant message and no user turn, see
  :func:`tunedeck.core.datafile.to_messages`) are plain documents: the text is tokenized
  without the chat template (with the tokenizer's own special tokens, e.g. BOS) and eos is
  appended; everything trains.

The first token is never trained (nothing predicts it), so its label is always -100:
the labels say exactly what the loss sees.

Assistant spans are found for any chat template, not only those with
``{% generation %}`` tags: the conversation is rendered prefix by prefix
(``messages[:i]`` with the generation prompt, ``messages[:i + 1]`` without), which gives
the character range of each answer in the full rendering, also when the template injects
a default system prompt (SmolLM2's does). Characters map to tokens through the
tokenizer's offsets, so the token ids are those of the full string, exactly as chat
inference tokenizes it. The end-of-turn marker is the first special token (or eos, or a
known marker such as ``<|im_end|>``) after the answer. The eos/end-of-turn label survives
padding even when pad == eos, because batches are made by
:class:`tunedeck.core.batching.BatchCollator`, which pads labels with -100 by position, never
by token id (or concatenates rows with no padding at all).

Long rows are truncated to ``max_length`` (keeping the start); a row whose trained tokens
are all cut off is reported as fully masked and left out of training.

This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError, first_line

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
# ChatML with tools (Hermes style: schemas in the system turn, <tool_call> JSON in the
# answer, results as <tool_response> in a tool turn) and reasoning as <think> before the
# answer, in every turn (so a conversation renders as its prefixes followed by more text)
CHATML_TOOLS = (
    "{%- if tools or messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}"
    "{%- if tools %}"
    "{%- if messages[0]['role'] == 'system' %}{{- '\n\n' }}{%- endif %}"
    "{{- 'You can call these functions. Answer a call with <tool_call></tool_call> holding a JSON object "
    "with the name and the arguments.\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not loop.first %}{{- raise_exception('a system message after the first turn') }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if message.get('reasoning_content') %}"
    "{{- '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' }}"
    "{%- endif %}"
    "{{- message['content'] or '' }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' + (fn['arguments'] | tojson) "
    "+ '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>tool\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
#: named templates for ``model.chat_template`` (``"auto"`` is the model's own)
TEMPLATES: dict[str, str] = {"chatml": CHATML, "chatml-tools": CHATML_TOOLS, "llama-3": LLAMA3, "alpaca": ALPACA}
#: the special strings each named template relies on being single tokens
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "chatml-tools": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "alpaca": (),
}
# end-of-turn strings recognised even when a tokenizer does not mark them special
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def resolve_chat_template(tokenizer: Any, name: str, *, model_label: str = "the model") -> str:
    """The Jinja template for ``model.chat_template``: the model's own for "auto", else a named one."""
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise UserError(
                f"{model_label} has no chat template; set model.chat_template to one of "
                f"{', '.join(TEMPLATES)} (e.g. --set model.chat_template=chatml)"
            )
        return own
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"model.chat_template = {name!r}: unknown; use auto, {', '.join(TEMPLATES)}") from None


def missing_template_tokens(tokenizer: Any, name: str) -> list[str]:
    """Special strings of a named template that this tokenizer does not have as single tokens."""
    vocab = tokenizer.get_vocab()
    return [t for t in TEMPLATE_TOKENS.get(name, ()) if t not in vocab]


@dataclass
class Rendered:
    """One row, rendered and masked.

    ``input_ids`` and ``labels`` are what the trainer gets (``labels[i] == -100`` where the
    loss ignores token ``i``). ``text`` is the rendered string and ``offsets`` the character
    range of each kept token in it, for the preview.
    """

    input_ids: list[int]
    labels: list[int]
    text: str
    offsets: list[tuple[int, int]]
    full_length: int  # tokens before truncation
    stop_trained: bool = True  # every assistant turn's end-of-turn token is trained (if not cut off)
    parts: list[str] | None = None  # per token: the part it renders (render(..., parts=True))

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def trained(self) -> list[bool]:
        return [label != IGNORE for label in self.labels]

    @property
    def tokens(self) -> list[tuple[int, bool]]:
        """(token id, trained) per token: what the preview shows."""
        return [(tid, label != IGNORE) for tid, label in zip(self.input_ids, self.labels)]

    @property
    def n_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)

    def example(self) -> dict[str, list[int]]:
        """The training example: input_ids and labels."""
        return {"input_ids": self.input_ids, "labels": self.labels}


def is_text_row(messages: Sequence[dict[str, Any]]) -> bool:
    """A ``text``-format row: a single assistant message with no prompt."""
    return len(messages) == 1 and messages[0]["role"] == "assistant" and not messages[0].get("tool_calls")


# templates that render tool calls and reasoning, named in the refusals
TOOL_TEMPLATES = ("Qwen2.5", "Qwen3", "Llama 3.1", "Mistral", "Hermes")
FEATURE_NAMES = {
    "tools": 'tool schemas (the row\'s "tools")', "tool_calls": "tool calls", "tool_results": "tool results",
    "reasoning": "reasoning",
}


def template_features(tokenizer: Any, chat_template: str | None) -> frozenset[str]:
    """What a chat template renders besides plain turns: "tools" (the schemas),
    "tool_calls", "tool_results" and "reasoning"; found by rendering a probe conversation
    once per template and looking for each piece in the text."""
    key = (id(tokenizer), chat_template)
    found = _features.get(key)
    if found is None:
        found = _probe(tokenizer, chat_template)
        if len(_features) > 64:
            _features.clear()
        _features[key] = found
    return found


_features: dict[tuple[int, str | None], frozenset[str]] = {}


def _probe(tokenizer: Any, chat_template: str | None) -> frozenset[str]:
    from .conversation import Conversation

    call = {"type": "function", "function": {"name": "zqprobecall", "arguments": {"zqprobearg": "zqprobevalue"}}}
    tools = [{"type": "function", "function": {"name": "zqprobetool", "description": "a probe",
                                              "parameters": {"type": "object", "properties": {}}}}]
    found = set()
    tries = [
        (("tools",), Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tools),
         ("zqprobetool",)),
        (("tool_calls", "tool_results"), Conversation([
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "zqproberesult", "name": "zqprobecall"},
            {"role": "assistant", "content": "a"}], tools), ("zqprobecall", "zqprobevalue", "zqproberesult")),
        (("reasoning",), [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a", "reasoning_content": "zqprobethought"}],
         ("zqprobethought",)),
    ]
    for names, messages, needles in tries:
        try:
            text = _apply(tokenizer, messages, chat_template, add_generation_prompt=False)
        except ValueError:
            continue
        if names == ("tool_calls", "tool_results"):
            if all(n in text for n in needles[:2]):
                found.add("tool_calls")
            if needles[2] in text:
                found.add("tool_results")
        elif all(n in text for n in needles):
            found.update(names)
    return frozenset(found)


def needed_features(messages: Sequence[dict[str, Any]]) -> list[str]:
    """What of a conversation needs more than plain turns rendered."""
    from .conversation import tools_of

    need = []
    if tools_of(messages):
        need.append("tools")
    if any(m.get("tool_calls") for m in messages):
        need.append("tool_calls")
    if any(m["role"] == "tool" for m in messages):
        need.append("tool_results")
    if any(m.get("reasoning_content") for m in messages):
        need.append("reasoning")
    return need


def check_features(tokenizer: Any, messages: Sequence[dict[str, Any]], chat_template: str | None) -> None:
    """ValueError, one line, when the template would silently drop part of the conversation."""
    need = needed_features(messages)
    if not need:
        return
    has = template_features(tokenizer, chat_template)
    missing = [n for n in need if n not in has]
    if not missing:
        return
    what = " and ".join(FEATURE_NAMES[n] for n in missing)
    if missing == ["reasoning"]:
        raise ValueError(f"the row has reasoning, but this chat template does not render it; set "
                         'dataset.reasoning = "drop" to train without it, or use a template that renders '
                         'reasoning (Qwen3-style <think>, e.g. model.chat_template = "chatml-tools")')
    raise ValueError(f"the row has {what}, but this chat template does not render them; use a model whose "
                     f"template does ({', '.join(TOOL_TEMPLATES)}) or set model.chat_template = \"chatml-tools\"")


def render(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    max_length: int,
    loss_on: str = "assistant",
    chat_template: str | None = None,
    reasoning: str = "train",
    parts: bool = False,
) -> Rendered:
    """Render one conversation and mask it (see the module docstring).

    ``chat_template`` overrides the tokenizer's own (see :func:`resolve_chat_template`).
    ``reasoning = "drop"`` leaves the turns' reasoning out. ``parts``: also label every
    token with the part of the conversation it renders (for the preview). Raises
    ValueError when the template cannot render the conversation, or would drop part of it
    (tools, tool calls or results, reasoning).
    """
    from .conversation import drop_reasoning

    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', not {loss_on!r}")
    if reasoning == "drop":
        messages = drop_reasoning(messages)
    if is_text_row(messages):
        return _render_text(tokenizer, messages[0]["content"], max_length)
    check_features(tokenizer, messages, chat_template)
    text = _apply(tokenizer, messages, chat_template, add_generation_prompt=False)
    if loss_on == "all":
        spans: list[tuple[int, int]] = [(0, len(text))]
        stop_trained = True
    else:
        spans, stop_trained = _assistant_spans(tokenizer, messages, text, chat_template)
    ids, trained, offsets = _tokenize_marked(tokenizer, text, spans)
    labels = [tid if t else IGNORE for tid, t in zip(ids, trained)]
    out = _finish(ids, labels, text, offsets, max_length, stop_trained)
    if parts:
        out.parts = _token_parts(out.offsets, _parts(tokenizer, messages, text, chat_template))
    return out


def _render_text(tokenizer: Any, text: str, max_length: int) -> Rendered:
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):
        enc = tokenizer(text, add_special_tokens=True)
        offsets = [(0, len(text))] * len(enc["input_ids"])
    ids = list(enc["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        offsets.append((len(text), len(text) + len(tokenizer.eos_token)))
        text += tokenizer.eos_token
    return _finish(ids, list(ids), text, offsets, max_length, True)  # type: ignore[arg-type]


def _finish(
    ids: list[int], labels: list[int], text: str, offsets: list[tuple[int, int]], max_length: int,
    stop_trained: bool,
) -> Rendered:
    full_length = len(ids)
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token
    return Rendered(
        input_ids=ids[:max_length], labels=labels[:max_length], text=text,
        offsets=offsets[:max_length], full_length=full_length, stop_trained=stop_trained,
    )


def _template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as templates read them: reasoning also as ``thinking`` (gpt-oss style)."""
    out = []
    for m in messages:
        if m.get("reasoning_content") and "thinking" not in m:
            m = {**m, "thinking": m["reasoning_content"]}
        out.append(m)
    return out


def _apply(tokenizer: Any, messages: Sequence[dict[str, Any]], chat_template: str | None, *,
           add_generation_prompt: bool, tools: Any = None) -> str:
    from .conversation import tools_of

    tools = tools if tools is not None else tools_of(messages)
    extra = {"tools": tools} if tools else {}
    try:
        out = tokenizer.apply_chat_template(
            _template_messages(messages), chat_template=chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt, **extra,
        )
    except Exception as exc:  # jinja raises its own errors (TemplateError, raise_exception(...))
        raise ValueError(f"the chat template cannot render this conversation ({first_line(exc)})") from None
    if not isinstance(out, str):
        raise ValueError("the chat template did not render to text")
    return out


def _assistant_spans(
    tokenizer: Any, messages: Sequence[dict[str, Any]], text: str, chat_template: str | None,
) -> tuple[list[tuple[int, int]], bool]:
    """Character spans of every assistant answer (its reasoning, text and tool calls as the
    template renders them) plus its end-of-turn marker in ``text``."""
    from .conversation import tools_of

    tools = tools_of(messages)
    markers = _end_markers(tokenizer)
    spans: list[tuple[int, int]] = []
    stop_trained = True
    cursor = 0  # where the turns read so far end in ``text``
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            content = message["content"].strip()
            found = text.find(content, cursor) if content else -1
            if found >= 0:
                cursor = found + len(content)
            continue
        if i == 0:
            raise ValueError("an assistant turn with no prompt before it")
        prompt = _apply(tokenizer, messages[:i], chat_template, add_generation_prompt=True, tools=tools)
        if text.startswith(prompt):
            start = len(prompt)
        else:
            # the template renders earlier turns differently once more follow (reasoning
            # models drop the reasoning of answers before the last question): the answer
            # starts after the generation prompt's header that follows the turns read so far
            bare = _apply(tokenizer, messages[:i], chat_template, add_generation_prompt=False, tools=tools)
            header = prompt[len(bare):] if prompt.startswith(bare) else ""
            found = text.find(header, cursor) if header.strip() else -1
            start = found + len(header) if found >= 0 else max(cursor, _common_prefix(prompt, text))
        through = _apply(tokenizer, messages[: i + 1], chat_template, add_generation_prompt=False, tools=tools)
        prefix = text.startswith(through)
        turn_end = len(through) if prefix else len(text)
        pos = _anchor(text, message, start, turn_end)
        if pos is None:
            # the template rewrites the answer: train the whole turn up to its end marker
            # (or, rendered as a prefix, up to its trailing whitespace)
            stop = len(text[:turn_end].rstrip()) if prefix else _first_marker(text, markers, start, turn_end)
            stop = stop if stop is not None else len(text[:turn_end].rstrip())
            spans.append((start, stop))
            cursor = max(cursor, stop)
            continue
        stop = _first_marker(text, markers, pos, turn_end)
        if message.get("weight") == 0:  # context, not trained (OpenAI's per-message weight)
            cursor = max(cursor, stop if stop is not None else pos)
            continue
        if stop is None:
            stop_trained = False
            stop = pos
        spans.append((start, stop))
        cursor = max(cursor, stop)
    return spans, stop_trained


def _anchor(text: str, message: dict[str, Any], start: int, end: int) -> int | None:
    """Where the last piece of an assistant turn ends in ``text``: its answer text, then the
    name and arguments of each tool call, found in order; None when none is found."""
    pos = None
    at = start
    content = message["content"].strip()
    if content:
        found = text.find(content, at, end)
        if found >= 0:
            pos = at = found + len(content)
    for call in message.get("tool_calls") or ():
        fn = call.get("function", call)
        found = text.find(fn["name"], at, end)
        if found < 0:
            continue
        pos = at = found + len(fn["name"])
        for value in _leaves(fn.get("arguments")):
            found = text.find(value, at, end)
            if found >= 0:
                pos = at = found + len(value)
    return pos


def _leaves(value: Any) -> list[str]:
    """The string and number values of a tool call's arguments, in order (as text)."""
    if isinstance(value, dict):
        return [v for item in value.values() for v in _leaves(item)]
    if isinstance(value, list):
        return [v for item in value for v in _leaves(item)]
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [str(value)]
    return [value] if isinstance(value, str) and value and "\n" not in value and '"' not in value else []


def _parts(tokenizer: Any, messages: Sequence[dict[str, Any]], text: str,
           chat_template: str | None) -> list[tuple[int, int, str]]:
    """Character ranges of ``text`` by what they render: each turn by its role
    ("tool_call" for an assistant turn's calls, "tool_result" for a tool turn,
    "reasoning" for an answer's reasoning), found from the rendered prefixes."""
    from .conversation import tools_of

    tools = tools_of(messages)
    bounds = [0]
    for i in range(1, len(messages) + 1):
        try:
            head = _apply(tokenizer, messages[:i], chat_template, add_generation_prompt=False, tools=tools)
        except ValueError:
            head = ""
        bounds.append(max(bounds[-1], _common_prefix(head, text)))
    bounds[-1] = len(text)
    out: list[tuple[int, int, str]] = []
    first = messages[0]
    content = first["content"].strip()
    c = text.find(content, 0, bounds[1]) if content and first["role"] != "system" else -1
    if c > 0:  # what the template puts before the first turn: a default system prompt, the tool schemas
        header = text.rfind("\n", 0, text.rfind("\n", 0, c)) + 1 if "\n" in text[:c] else 0
        if header > 0:
            out.append((0, header, "tools" if tools else "system"))
            bounds[0] = header
    for m, a, b in zip(messages, bounds, bounds[1:]):
        role = m["role"]
        if role == "tool":
            out.append((a, b, "tool_result"))
            continue
        if role != "assistant":
            out.append((a, b, role))
            continue
        reasoning = (m.get("reasoning_content") or "").strip()
        r_at = text.find(reasoning, a, b) if reasoning else -1
        after = r_at + len(reasoning) if r_at >= 0 else a
        content = m["content"].strip()
        c_at = text.find(content, after, b) if content else -1
        calls_at = (c_at + len(content) if c_at >= 0 else after) if m.get("tool_calls") else b
        if r_at >= 0:
            out += [(a, r_at, "assistant"), (r_at, r_at + len(reasoning), "reasoning"),
                    (r_at + len(reasoning), calls_at, "assistant")]
        else:
            out.append((a, calls_at, "assistant"))
        if calls_at < b:
            out.append((calls_at, b, "tool_call"))
    return [p for p in out if p[1] > p[0]]


def _token_parts(offsets: list[tuple[int, int]], parts: list[tuple[int, int, str]]) -> list[str]:
    labels = []
    for s, e in offsets:
        mid = s if e <= s else s + (e - s - 1) // 2
        labels.append(next((kind for a, b, kind in parts if a <= mid < b), "template"))
    return labels


def _end_markers(tokenizer: Any) -> tuple[str, ...]:
    found: list[str] = []
    if tokenizer.eos_token:
        found.append(tokenizer.eos_token)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found.extend(t.content for t in decoder.values() if getattr(t, "special", False) and t.content)
    found.extend(END_MARKERS)
    return tuple(dict.fromkeys(found))


def _first_marker(text: str, markers: Iterable[str], start: int, end: int) -> int | None:
    """End position of the earliest marker in ``text[start:end]``, or None."""
    best: tuple[int, int] | None = None
    for m in markers:
        pos = text.find(m, start, end)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, pos + len(m))
    return best[1] if best else None


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_marked(
    tokenizer: Any, text: str, spans: list[tuple[int, int]],
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Token ids of ``text``, whether each overlaps a trained span, and each token's offsets."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):
        return _tokenize_segments(tokenizer, text, spans)
    ids = list(enc["input_ids"])
    trained = [any(s < e_tok and s_tok < e for s, e in spans) and e_tok > s_tok for s_tok, e_tok in offsets]
    return ids, trained, offsets  # type: ignore[return-value]


def _tokenize_segments(
    tokenizer: Any, text: str, spans: list[tuple[int, int]],
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Fallback for tokenizers without offsets: tokenize trained and untrained pieces separately."""
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids: list[int] = []
    trained: list[bool] = []
    offsets: list[tuple[int, int]] = []
    for a, b in zip(cuts, cuts[1:]):
        if a == b:
            continue
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in spans)
        ids.extend(piece)
        trained.extend([inside] * len(piece))
        offsets.extend([(a, b)] * len(piece))
    return ids, trained, offsets


# -- a dataset at a time ------------------------------------------------------------------


@dataclass
class RenderStats:
    """What rendering a dataset did: rows kept, dropped, truncated; token counts."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    fully_masked: list[int] = field(default_factory=list)  # row numbers
    failed: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    no_stop: int = 0  # rows whose answers have no end-of-turn token to train
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0  # tokens of the longest row before truncation

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "kept": self.kept, "truncated": self.truncated,
            "fully_masked": len(self.fully_masked), "failed": len(self.failed), "no_stop": self.no_stop,
            "tokens": self.tokens, "trained_tokens": self.trained_tokens, "longest": self.longest,
        }


def render_rows(
    tokenizer: Any,
    rows: Iterable[tuple[int, Sequence[dict[str, str]]]],
    *,
    max_length: int,
    loss_on: str = "assistant",
    chat_template: str | None = None,
    until_one_trains: bool = False,
    reasoning: str = "train",
    cache: Any = None,
) -> tuple[list[dict[str, list[int]]], RenderStats]:
    """Render (row number, messages) pairs into training examples; rows left with no trained
    token (or that the template cannot render) are counted in the stats, not returned.
    ``until_one_trains``: stop at the first row that trains (enough to know the set is not
    refused; a set that is gets the same stats as a full pass). ``cache``: a
    :class:`tunedeck.core.rendercache.RowCache` the rows are read from (and added to)."""
    examples: list[dict[str, list[int]]] = []
    stats = RenderStats()

    def one(messages: Sequence[dict[str, Any]]) -> Rendered:
        return render(tokenizer, messages, max_length=max_length, loss_on=loss_on, chat_template=chat_template,
                      reasoning=reasoning)

    for number, messages in rows:
        if until_one_trains and stats.kept:
            break
        stats.rows += 1
        try:
            r = one(messages) if cache is None else cache.render(messages, one)
        except ValueError as exc:
            stats.failed.append((number, str(exc)))
            continue
        stats.longest = max(stats.longest, r.full_length)
        stats.truncated += r.truncated
        stats.no_stop += not r.stop_trained
        if r.n_trained == 0:
            stats.fully_masked.append(number)
            continue
        stats.kept += 1
        stats.tokens += len(r.input_ids)
        stats.trained_tokens += r.n_trained
        examples.append(r.example())
    return examples, stats


@dataclass
class RenderedSplits:
    """A project's training and eval rows rendered as the trainer trains them."""

    template: str | None  # the chat template (None: text rows only)
    train: list[dict[str, list[int]]]
    train_stats: RenderStats
    eval: list[dict[str, list[int]]]
    eval_stats: RenderStats | None
    pairs: Any = None  # a preference set's tunedeck.core.preference.PairStats (training rows)


def render_splits(project: Any, tokenizer: Any, splits: Any, *, model_label: str,
                  until_one_trains: bool = False, cache: Any = None) -> RenderedSplits:
    """The rows of a project's splits (:func:`tunedeck.core.datafile.load_splits`) rendered
    through the chat template the trainer uses; raises UserError (one line) for what cannot
    train: a model without a chat template for chat rows, a set with no row that trains.
    The trainer and the pre-flight both call it (the pre-flight with ``until_one_trains``).
    ``cache``: a :class:`tunedeck.core.rendercache.RowCache` (the trainer's): rows rendered
    before are read from it, and a row repeated by its source's weight is rendered once."""
    from .preference import is_preference, render_pairs

    template_name = project["model.chat_template"]
    max_length = project["dataset.max_length"]
    opts: dict[str, Any] = dict(max_length=max_length, until_one_trains=until_one_trains,
                                reasoning=project["dataset.reasoning"], cache=cache)
    if is_preference(project):  # pairs: each side through the chat template; the prompt never trains
        template = resolve_chat_template(tokenizer, template_name, model_label=model_label)

        def render_set(rows: Any) -> tuple[Any, RenderStats, Any]:
            return render_pairs(tokenizer, rows, chat_template=template, **opts)
    else:
        needs_template = any(not is_text_row(m) for _, m in splits.train + splits.eval)
        template = resolve_chat_template(tokenizer, template_name, model_label=model_label) if needs_template else None

        def render_set(rows: Any) -> tuple[Any, RenderStats, Any]:
            return (*render_rows(tokenizer, rows, loss_on=project["dataset.loss_on"], chat_template=template, **opts),
                    None)
    train, stats, pairs = render_set(splits.train)
    refusal = dataset_refusal(stats, max_length=max_length)
    if refusal:
        raise UserError(refusal)
    evaluated: list[dict[str, list[int]]] = []
    eval_stats = None
    if splits.eval:
        evaluated, eval_stats, _ = render_set(splits.eval)
        refusal = dataset_refusal(eval_stats, max_length=max_length, key="dataset.eval_split")
        if refusal:
            raise UserError(refusal)
    return RenderedSplits(template, train, stats, evaluated, eval_stats, pairs)


def dataset_refusal(stats: RenderStats, *, max_length: int, key: str = "dataset.path") -> str | None:
    """One line saying why a rendered dataset cannot train, or None."""
    if stats.rows == 0:
        return f"{key}: the dataset has no usable rows"
    if stats.kept:
        return None
    if stats.failed and not stats.fully_masked:
        number, reason = stats.failed[0]
        return f"{key}: no row can be rendered (row {number}: {reason}); check model.chat_template"
    return (
        f"{key}: every row is fully masked after truncation to dataset.max_length = {max_length} tokens "
        f"(longest row: {stats.longest} tokens), so nothing would train; raise dataset.max_length"
    )
