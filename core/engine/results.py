"""What each engine request answers, as typed dicts.

A result crosses a pipe between processes, so it stays plain data (JSON-able dicts, lists,
numbers and strings): reading one never imports torch in the UI. These ``TypedDict``\\ s say
which keys each op's result has; the functions in :mod:`tunedeck.core.engine.ops` build
them and the typed calls of :class:`tunedeck.core.engine.calls.EngineCalls` return them.
Wide results (a model's inspection, a dataset's stats) list the keys the callers read.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Ping(TypedDict):
    pid: int


class Released(TypedDict):
    released: bool  # whether a chat model was loaded


class Preflight(TypedDict):
    counts: dict[str, Any]  # trainable / total parameters, as peft will report them
    processes: int
    device: str  # "cuda" | "cpu" | "mps"


class Inspected(TypedDict, total=False):
    """A model's layers as LoRA sees them (:meth:`tunedeck.core.inspect.Inspection.as_dict`)."""

    source: str
    model_type: str
    architecture: str
    arch: dict[str, Any]
    total_params: int
    bias_params: int
    groups: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    presets: dict[str, list[str]]
    peft_default: list[str] | None
    output_layer: str | None
    input_embedding: str | None
    not_wrappable: list[dict[str, Any]]
    notes: list[str]


class LoraSummary(TypedDict):
    """What a project's [lora] settings (or a pick of layers) train, and the estimated memory."""

    model: str
    architecture: str
    targets: str | list[str]  # what to write to lora.target_modules for this pick
    layers: list[str]
    adapted: dict[str, int]  # group -> wrapped layers
    adapted_layers: int
    trainable_params: int
    total_params: int
    percent: float
    adapter_bytes: int
    errors: list[str]  # settings training would refuse, one line each
    warnings: list[str]
    notes: list[str]
    attention_targets: str | list[str] | None
    memory: dict[str, Any] | None  # :meth:`tunedeck.core.memory.Estimate.as_dict`
    memory_error: str


class PreviewRow(TypedDict, total=False):
    """One dataset row rendered and masked (:func:`tunedeck.core.preview.preview_row`)."""

    index: int  # the position, across the sources in order
    row: int  # the row's number in its source (the line number for JSONL)
    source: dict[str, Any]
    sources: int
    last: bool
    format: str
    fields: Any  # the row as read
    error: str | None  # why the row is skipped
    messages: list[dict[str, Any]] | None
    tools: Any
    text: str
    tokens: list[dict[str, Any]]  # {"id", "text", "trained", "part"}
    length: int
    truncated_at: int | None
    trained: int
    stop_trained: bool
    max_length: int
    unrendered: str | None  # no tokenizer or chat template: shown unrendered
    chosen: dict[str, Any]  # a preference pair's answers, each with its tokens
    rejected: dict[str, Any]


class PreviewStats(TypedDict, total=False):
    """The whole dataset's stats (:func:`tunedeck.core.preview.preview_stats`); partials while
    streaming have ``done`` false."""

    path: str
    format: str
    sources: list[dict[str, Any]]
    rows: int
    usable: int
    skipped: list[dict[str, Any]]
    skipped_count: int
    max_length: int
    histogram: dict[str, list[int]]
    longest: int
    truncated: int
    tokens: int
    trained_tokens: int
    eval: dict[str, Any]
    refusal: str | None
    done: bool


class Found(TypedDict):
    index: int | None  # the dataset position of the row found, None when no row matches
    row: int | None


class HeldOutRows(TypedDict, total=False):
    held: list[bool]  # per position asked
    held_in: list[int]
    eval_rows: int
    usable: int | None
    rows: int | None
    done: bool


class Answer(TypedDict):
    """One model's answer (:meth:`tunedeck.core.chat.Answer.as_dict`)."""

    model: str
    text: str
    tokens: int
    seconds: float
    tokens_per_s: float | None
    cancelled: bool


class PaneAnswers(TypedDict):
    answers: list[Answer | None]  # per pane
    errors: list[str | None]  # per pane: why its model could not answer
    together: bool  # the answers shared one batch


class EvalAnswers(TypedDict):
    items: list[dict[str, Any]]  # {"messages", "reference", "answers": [Answer per model]}
    total: int
    cancelled: bool


class Merged(TypedDict):
    out: str
    run: str
    base: str
    dtype: str
    files: list[str]
    params: int
    device: str


class Exported(TypedDict):
    out: str
    gguf: str
    modelfile: str
    lora: str | None
    quant: str
    arch: str
    size: int
    commands: list[str]
    pre_tokenizer: str | None
    template: str | None


class HubModels(TypedDict):
    models: list[dict[str, Any]]  # id, downloads, likes, gated, license, size...


class HubPlan(TypedDict, total=False):
    repo: str
    kind: str  # "model" | "dataset"
    revision: str
    files: list[dict[str, Any]]  # {"name", "size"}, weights last
    total: int
    cached: int
    free: int
    skipped: list[str]
    source: str  # what to write as model.source / dataset.path


class Pulled(TypedDict):
    repo: str
    kind: str
    revision: str
    path: str
    files: list[str]
    bytes: int
    source: str
