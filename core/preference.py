"""Preference data: rows with a chosen and a rejected answer, as DPO and ORPO train on them.

Every layout ends as a :class:`Pair`: the prompt (the turns before the answers, as a
:class:`~tunedeck.core.conversation.Conversation` with the row's tool schemas) and the
chosen and the rejected answer (assistant turns). The layouts read:

- **trl's**, explicit prompt: ``prompt`` (text, or a list of messages), ``chosen`` and
  ``rejected`` (text, or lists of messages). A ``chosen`` list that repeats the prompt's
  turns first (UltraFeedback binarized keeps the whole conversation in each) has them
  taken off.
- **trl's**, implicit prompt: ``chosen`` and ``rejected`` only, two conversations whose
  shared first turns are the prompt; or two texts in Anthropic's HH layout
  (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``), split into turns the same way.
- **LLaMA-Factory's**: ShareGPT ``conversations`` (ending with the question) with a
  ``chosen`` and a ``rejected`` turn (``{"from": "gpt", "value": ...}``), and its Alpaca
  ranking layout: ``instruction`` (+ ``input``, ``history``, ``system``) with ``chosen``
  and ``rejected`` texts.
- **UltraFeedback-style lists**: ``completions``, a list of rated answers (``response`` /
  ``text`` / ``content``, rated by ``overall_score`` / ``score`` / ``rating``), with the
  prompt in ``instruction`` or ``prompt``: the best-rated answer is chosen, the worst
  rejected (a pair whose answers are all rated the same is a bad row).
- StackExchange-style ``question`` / ``response_j`` / ``response_k`` (j preferred).
- The names other sets give the fields: ``question`` or ``query`` for the prompt (Intel's
  orca pairs, with a ``system`` column), ``chosen_response`` / ``rejected_response``
  (Argilla's).

``dataset.columns`` maps these names to others (``{chosen = "better"}``), and
``system`` / ``tools`` columns work as for supervised rows. A row that does not make a pair
is a bad row with its reason (like a supervised row): no prompt, an empty answer, answers
that are not the assistant's, a chosen answer equal to its rejected one.

:func:`render_pair` renders the prompt followed by each answer through
:func:`tunedeck.core.render.render` (the one render-and-mask path): the answer's tokens and
its end-of-turn token train, every prompt token is masked, also the prompt's earlier
answers in a multi-turn prompt. :func:`render_pairs` does a set, with the stats the
Dataset screen and the trainer report.

Light: no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .conversation import (
    Conversation, check_media, check_turns, normalise_tools, openai_turns, sharegpt_turns,
)

PREFERENCE = "preference"  # the dataset.format of pairs
METHODS = ("dpo", "orpo")
SCORE_KEYS = ("overall_score", "score", "rating", "fine-grained_score")
RESPONSE_KEYS = ("response", "text", "content", "completion", "output")
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
SAME_ANSWERS = "the chosen and the rejected answers are the same: nothing to prefer"
SAME_TOKENS = "the chosen and the rejected answers render the same tokens"


@dataclass
class Pair:
    """One preference row: the prompt's turns and the two answers (assistant turns)."""

    prompt: Conversation
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]

    def conversations(self) -> tuple[Conversation, Conversation]:
        """The prompt followed by each answer, as rendered for training: the prompt's own
        answers (a multi-turn prompt) are context, not trained."""
        context = [dict(m, weight=0) if m["role"] == "assistant" else m for m in self.prompt]
        return self.prompt.with_messages(context + self.chosen), self.prompt.with_messages(context + self.rejected)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": [dict(m) for m in self.prompt], "chosen": [dict(m) for m in self.chosen],
                "rejected": [dict(m) for m in self.rejected], "tools": self.prompt.tools}


# other names the fields go by (Intel's orca pairs: question; Argilla's: chosen_response / rejected_response)
FIELD_ALIASES = {"chosen": ("chosen", "chosen_response"), "rejected": ("rejected", "rejected_response"),
                 "prompt": ("prompt", "question", "query")}


def _with_aliases(row: dict[str, Any], columns: dict[str, str] | None) -> dict[str, str]:
    """``columns`` completed with the aliases ``row`` uses for the fields it does not map."""
    out = dict(columns or {})
    for name, aliases in FIELD_ALIASES.items():
        if name not in out:
            found = next((a for a in aliases if a in row), None)
            if found is not None and found != name:
                out[name] = found
    return out


def is_pair_row(row: dict[str, Any], columns: dict[str, str] | None = None) -> bool:
    """Whether ``row`` is in one of the paired layouts (see the module docstring)."""
    columns = _with_aliases(row, columns)

    def has(name: str) -> bool:
        return columns.get(name, name) in row

    if has("chosen") and has("rejected"):
        return True
    if has("question") and has("response_j") and has("response_k"):
        return True
    completions = row.get(columns.get("completions", "completions"))
    return (isinstance(completions, list) and bool(completions) and isinstance(completions[0], dict)
            and any(k in completions[0] for k in SCORE_KEYS))


def to_pair(row: dict[str, Any], columns: dict[str, str] | None = None, system_prompt: str = "") -> Pair:
    """One row as a :class:`Pair`; ValueError with the reason when it does not make one
    (:class:`~tunedeck.core.conversation.MediaError` for images, audio or video)."""
    from .datafile import alpaca_prompt, row_field

    columns = _with_aliases(row, columns)

    def get(name: str, required: bool = True) -> Any:
        return row_field(row, columns, name, required)

    def has(name: str) -> bool:
        return row.get(columns.get(name, name)) is not None

    check_media(row)
    tools = normalise_tools(get("tools", required=False), columns.get("tools", "tools"))
    prompt: list[dict[str, Any]]
    if has("chosen") or has("rejected"):
        chosen_raw, rejected_raw = get("chosen"), get("rejected")
        if has("conversations"):  # LLaMA-Factory's ShareGPT pairs
            raw = _json_list(get("conversations"), columns.get("conversations", "conversations"))
            prompt = sharegpt_turns(raw)
        elif has("instruction"):  # LLaMA-Factory's Alpaca ranking
            prompt = alpaca_prompt(row, columns)
        elif has("prompt"):
            prompt = _prompt_turns(get("prompt"), columns.get("prompt", "prompt"))
        else:
            prompt = []
        chosen = _answer_turns(chosen_raw, columns.get("chosen", "chosen"))
        rejected = _answer_turns(rejected_raw, columns.get("rejected", "rejected"))
        if not prompt:  # implicit: the turns the two conversations share
            prompt, chosen, rejected = _split_shared(chosen, rejected)
        else:
            chosen, rejected = _after(prompt, chosen), _after(prompt, rejected)
    elif has("response_j"):
        prompt = _prompt_turns(get("question"), columns.get("question", "question"))
        chosen = _answer_turns(get("response_j"), columns.get("response_j", "response_j"))
        rejected = _answer_turns(get("response_k"), columns.get("response_k", "response_k"))
    elif has("completions"):
        name = "instruction" if has("instruction") else "prompt"
        prompt = _prompt_turns(get(name), columns.get(name, name))
        chosen, rejected = _rated(get("completions"), columns.get("completions", "completions"))
    else:
        raise ValueError('no "chosen" and "rejected" answers (see dataset.columns to name them)')
    system = get("system", required=False)
    if isinstance(system, str) and system.strip() and (not prompt or prompt[0]["role"] != "system"):
        prompt.insert(0, {"role": "system", "content": system})
    _check_pair(prompt, chosen, rejected)
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return Pair(Conversation(prompt, tools), chosen, rejected)


def _json_list(value: Any, name: str) -> list[Any]:
    from .conversation import parse_json_field

    if isinstance(value, str):
        value = parse_json_field(value, name)
    if not isinstance(value, list):
        raise ValueError(f'"{name}" is not a list of turns (got {type(value).__name__})')
    return value


def _prompt_turns(value: Any, name: str) -> list[dict[str, Any]]:
    """A prompt: text (one user turn, or HH-style turns) or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f'"{name}" is empty')
        if HH_HUMAN in value:
            return _hh_turns(value)
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return openai_turns(value)
    raise ValueError(f'"{name}" is not text or a list of messages (got {type(value).__name__})')


def _answer_turns(value: Any, name: str) -> list[dict[str, Any]]:
    """An answer: text (one assistant turn, or HH-style turns), a turn, or a list of turns."""
    if isinstance(value, str):
        if HH_HUMAN in value or value.startswith(HH_ASSISTANT.strip()) or HH_ASSISTANT in value:
            return _hh_turns(value)
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if value and all(isinstance(m, dict) and "from" in m and "role" not in m for m in value):
            return sharegpt_turns(value)
        return openai_turns(value)
    raise ValueError(f'"{name}" is not text or a list of messages (got {type(value).__name__})')


def _hh_turns(text: str) -> list[dict[str, Any]]:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as turns."""
    import re

    pieces = re.split(r"(\n\nHuman:|\n\nAssistant:|^Human:|^Assistant:)", text)
    turns: list[dict[str, Any]] = []
    role = None
    for piece in pieces:
        marker = piece.strip()
        if marker in ("Human:", "Assistant:"):
            role = "user" if marker == "Human:" else "assistant"
            continue
        if role is None:
            if piece.strip():
                raise ValueError("text before the first Human: or Assistant: turn")
            continue
        turns.append({"role": role, "content": piece.strip()})
        role = None
    if role is not None:  # a last marker with nothing after it: an empty answer
        turns.append({"role": role, "content": ""})
    return turns


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("role", "content", "tool_calls", "reasoning_content")
    return all(a.get(k) == b.get(k) for k in keys)


def _split_shared(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The implicit prompt: the first turns the two conversations share, up to the last
    user (or tool) turn before the answers."""
    n = 0
    while n < min(len(chosen), len(rejected)) and _same(chosen[n], rejected[n]):
        n += 1
    while n > 0 and chosen[n - 1]["role"] not in ("user", "tool"):
        n -= 1
    if n == 0:
        raise ValueError("no prompt: chosen and rejected share no question before their answers (give a "
                         '"prompt" column, or conversations that start with the question)')
    return list(chosen[:n]), list(chosen[n:]), list(rejected[n:])


def _after(prompt: list[dict[str, Any]], answer: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An answer given with the prompt's turns repeated first (UltraFeedback binarized): the rest."""
    if len(answer) > len(prompt) and all(_same(p, a) for p, a in zip(prompt, answer)):
        return answer[len(prompt):]
    return answer


def _rated(value: Any, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The best and the worst rated of a list of rated answers."""
    if not isinstance(value, list):
        raise ValueError(f'"{name}" is not a list of rated answers (got {type(value).__name__})')
    rated: list[tuple[float, str]] = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise ValueError(f'"{name}" entry {i} is not an object')
        text = next((item[k] for k in RESPONSE_KEYS if isinstance(item.get(k), str)), None)
        score = next((item[k] for k in SCORE_KEYS if isinstance(item.get(k), (int, float))
                      and not isinstance(item.get(k), bool)), None)
        if text is None or score is None:
            continue
        rated.append((float(score), text))
    if len(rated) < 2:
        raise ValueError(f'"{name}" has fewer than two rated answers')
    best, worst = max(rated, key=lambda r: r[0]), min(rated, key=lambda r: r[0])
    if best[0] == worst[0]:
        raise ValueError(f'every answer in "{name}" is rated the same ({best[0]:g}): no preference')
    return [{"role": "assistant", "content": best[1]}], [{"role": "assistant", "content": worst[1]}]


def _check_pair(prompt: list[dict[str, Any]], chosen: list[dict[str, Any]],
                rejected: list[dict[str, Any]]) -> None:
    from .datafile import _check_text

    body = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    if not body:
        raise ValueError("no prompt before the answers")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"the prompt ends with a {prompt[-1]['role']} turn, not a question")
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer:
            raise ValueError(f"the {side} answer is missing")
        if answer[0]["role"] != "assistant":
            raise ValueError(f"the {side} answer is a {answer[0]['role']} turn, not the assistant's")
        if answer[-1]["role"] != "assistant":
            raise ValueError(f"the {side} answer ends with a {answer[-1]['role']} turn")
        if not any(m["content"].strip() or m.get("tool_calls") for m in answer):
            raise ValueError(f"the {side} answer is empty")
        for m in answer:
            _check_text(m["content"])
        try:
            check_turns(list(prompt) + list(answer))
        except ValueError as exc:
            raise ValueError(f"{side}: {exc}") from None
    for m in prompt:
        _check_text(m["content"])
    if len(chosen) == len(rejected) and all(
            _same(a, b) or (a["content"].strip() == b["content"].strip() and a.get("tool_calls") == b.get("tool_calls")
                            and a["role"] == b["role"]) for a, b in zip(chosen, rejected)):
        raise ValueError(SAME_ANSWERS)


# -- rendering ---------------------------------------------------------------------------------------------------


@dataclass
class RenderedPair:
    """A pair rendered and masked: the prompt followed by each answer (tunedeck.core.render.Rendered)."""

    chosen: Any
    rejected: Any

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def same_tokens(self) -> bool:
        """Both sides render the same tokens (answers that differ only in what the template drops)."""
        a, b = self.chosen.input_ids, self.rejected.input_ids
        return len(a) == len(b) and list(a) == list(b)

    def example(self) -> dict[str, list[int]]:
        """The training example: each side's input_ids and labels."""
        chosen, rejected = self.chosen.example(), self.rejected.example()
        return {"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}


def render_pair(tokenizer: Any, pair: Pair, *, max_length: int, chat_template: str | None, reasoning: str = "train",
                parts: bool = False, cache: Any = None) -> RenderedPair:
    """Both sides of ``pair`` through :func:`tunedeck.core.render.render` (the answers and
    their end-of-turn tokens train; the prompt does not). ValueError as render raises it.
    ``cache``: a :class:`tunedeck.core.rendercache.RowCache` each side is read from and added to."""
    from .render import render

    def one(messages: Any) -> Any:
        return render(tokenizer, messages, max_length=max_length, loss_on="assistant", chat_template=chat_template,
                      reasoning=reasoning, parts=parts)

    chosen, rejected = pair.conversations()
    if cache is None:
        return RenderedPair(one(chosen), one(rejected))
    return RenderedPair(cache.render(chosen, one), cache.render(rejected, one))


@dataclass
class PairStats:
    """What rendering a set of pairs found, besides :class:`tunedeck.core.render.RenderStats`."""

    chosen_trained: int = 0  # trained tokens of the chosen answers (their length)
    rejected_trained: int = 0
    chosen_longer: int = 0  # pairs whose chosen answer has more trained tokens
    truncated_pairs: int = 0
    identical: int = 0  # pairs left out: the chosen answer is the rejected one (as text, or as tokens)

    def as_dict(self, pairs: int) -> dict[str, Any]:
        return {
            "pairs": pairs, "chosen_tokens_mean": round(self.chosen_trained / pairs, 1) if pairs else 0.0,
            "rejected_tokens_mean": round(self.rejected_trained / pairs, 1) if pairs else 0.0,
            "chosen_longer_percent": round(100.0 * self.chosen_longer / pairs, 1) if pairs else 0.0,
            "truncated_pairs": self.truncated_pairs, "identical": self.identical,
        }


def render_pairs(tokenizer: Any, rows: Iterable[tuple[int, Pair]], *, max_length: int, chat_template: str | None,
                 reasoning: str = "train", until_one_trains: bool = False,
                 cache: Any = None) -> tuple[list[dict[str, list[int]]], Any, PairStats]:
    """Render (row number, pair) items into training examples, with the stats of
    :func:`tunedeck.core.render.render_rows` (a pair counts as a row; its tokens are both
    sides') and :class:`PairStats`. A pair with a side left with nothing to train after
    truncation is fully masked and left out; one the template cannot render is failed."""
    from .render import RenderStats

    examples: list[dict[str, list[int]]] = []
    stats, extra = RenderStats(), PairStats()
    for number, pair in rows:
        if until_one_trains and stats.kept:
            break
        stats.rows += 1
        try:
            r = render_pair(tokenizer, pair, max_length=max_length, chat_template=chat_template, reasoning=reasoning,
                            cache=cache)
        except ValueError as exc:
            stats.failed.append((number, str(exc)))
            continue
        stats.longest = max(stats.longest, r.chosen.full_length, r.rejected.full_length)
        stats.truncated += r.truncated
        extra.truncated_pairs += r.truncated
        stats.no_stop += not (r.chosen.stop_trained and r.rejected.stop_trained)
        if r.chosen.n_trained == 0 or r.rejected.n_trained == 0:
            stats.fully_masked.append(number)
            continue
        if r.same_tokens:
            stats.failed.append((number, SAME_TOKENS))
            extra.identical += 1
            continue
        stats.kept += 1
        stats.tokens += len(r.chosen.input_ids) + len(r.rejected.input_ids)
        stats.trained_tokens += r.chosen.n_trained + r.rejected.n_trained
        extra.chosen_trained += r.chosen.n_trained
        extra.rejected_trained += r.rejected.n_trained
        extra.chosen_longer += r.chosen.n_trained > r.rejected.n_trained
        examples.append(r.example())
    return examples, stats, extra


LENGTH_BIAS = (30.0, 70.0)  # percent of pairs whose chosen answer is the longer: a bias outside it


def length_bias(pairs: dict[str, Any]) -> str | None:
    """"longer" or "shorter" when a set's chosen answers lean that way (:meth:`PairStats.as_dict`):
    the share of pairs with the longer answer chosen outside :data:`LENGTH_BIAS` and the mean
    lengths leaning the same way (answers of equal length, such as all cut at max_length,
    count as not longer: no bias); None otherwise."""
    longer, n = pairs.get("chosen_longer_percent"), pairs.get("pairs")
    if longer is None or not n:
        return None
    chosen, rejected = pairs["chosen_tokens_mean"], pairs["rejected_tokens_mean"]
    if longer > LENGTH_BIAS[1] and chosen > rejected:
        return "longer"
    if longer < LENGTH_BIAS[0] and chosen < rejected:
        return "shorter"
    return None


def is_preference(project: Any) -> bool:
    """Whether the project trains on preference pairs (DPO, ORPO)."""
    return project["training.method"] in METHODS

