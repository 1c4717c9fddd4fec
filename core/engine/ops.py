"""What the engine can be asked: one function per request, and the registries that name them.

Each ``op_*`` function takes the request's arguments (plain data) and returns its result
(plain data, typed in :mod:`tunedeck.core.engine.results`). Streaming ops also get
``emit`` (called with each partial result) and ``cancel`` (set when the client cancels).
The functions run in the engine process; tests and the CLI may call them in-process.

- ``ping``; ``preflight`` (the checks before a run, :func:`tunedeck.core.preflight.preflight`);
  ``release`` (the chat model lets go of its GPU memory, before a run trains there);
- ``inspect`` (a model's layers as LoRA sees them, built on the meta device by
  :mod:`tunedeck.core.inspect`); ``lora_summary`` (what a project's [lora] settings, or a
  pick of layers, train: the parameters peft will report, the adapter's size, the
  estimated peak memory, and why training would refuse). One Inspection is kept per
  model, so after the first request about a model each one costs a count, not a build;
- the Dataset screen's: ``preview_row``, ``preview_stats_stream``, ``preview_search``,
  ``preview_held_out_stream``, over
  :mod:`tunedeck.core.preview`;
- ``chat`` (one answer of a base model or a run's adapter, streamed), ``chat_panes``
  (both panes' answers at once, one batch on the shared base model), ``chat_eval`` (the
  eval prompts through two models), ``merge`` and ``export`` (a run's adapter merged into
  a standalone model folder, or written as GGUF): one base model is kept, with every
  run's adapter loaded onto it by name;
- ``hub_search``, ``hub_plan``, ``hub_pull``: the Hugging Face Hub, only when asked.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import UserError
from .results import (
    Answer,
    EvalAnswers,
    Exported,
    Found,
    HeldOutRows,
    HubModels,
    HubPlan,
    Inspected,
    LoraSummary,
    Merged,
    PaneAnswers,
    Ping,
    Preflight,
    PreviewRow,
    PreviewStats,
    Pulled,
    Released,
)

Emit = Callable[[dict[str, Any]], None]


# -- the inspector, with one Inspection kept per model ----------------------------------

INSPECTIONS_KEPT = 4
"""Inspections kept in the engine (least recently used goes first); a 70B one is ~1 MB."""


def inspection(source: str, root: str | None = None, *, trust_remote_code: bool = False) -> Any:
    """The :class:`~tunedeck.core.inspect.Inspection` of ``source`` (relative to ``root``).

    Built once per (source, root, trust_remote_code) and kept, so every later request about
    the same model (each toggle of the Modules screen) costs a count, not a build.
    """
    return _inspection(source, root or "", trust_remote_code)


@lru_cache(maxsize=INSPECTIONS_KEPT)
def _inspection(source: str, root: str, trust_remote_code: bool) -> Any:
    from ..inspect import inspect_model

    return inspect_model(source, root=Path(root) if root else None, trust_remote_code=trust_remote_code)


def project_inspection(project: Any) -> Any:
    """The kept :class:`~tunedeck.core.inspect.Inspection` of a project's model."""
    return inspection(project["model.source"], str(project.root), trust_remote_code=project["model.trust_remote_code"])


def lora_summary(project: Any, *, layers: list[str] | None = None, hardware: Any = None) -> LoraSummary:
    """What the project's [lora] settings train, and the estimated peak memory.

    ``layers`` (names of the inspection's layers) replaces ``lora.target_modules`` with the
    targets that select exactly them (:func:`~tunedeck.core.targets.targets_for`: a suffix
    list for whole groups, a regex for a partial pick); ``targets`` in the reply is what to
    write to the project. Counts are :func:`~tunedeck.core.targets.count_trainable`'s, equal
    to what peft reports after wrapping. Settings training would refuse (targets matching
    nothing, the output layer) are in ``errors``, one line each, not raised; a model that
    cannot be inspected raises UserError. ``hardware`` (a :class:`~tunedeck.core.hardware.Hardware`,
    default: this machine) decides "auto" precision and the device of the memory estimate
    (:func:`~tunedeck.core.inspect.project_memory`), made at the dataset's longest row
    (:func:`~tunedeck.core.memory.longest_row`: the rows are rendered once per model, data
    file and dataset settings, then kept).
    """
    from ..inspect import project_choice, project_memory
    from ..targets import targets_for
    from ..memory import longest_row

    ins = project_inspection(project)
    choice = project_choice(project, ins, None if layers is None else targets_for(ins, layers))
    mode = project["quantization.mode"]
    memory, memory_error, base_bytes = None, "", 4 if mode != "none" else 2
    try:
        estimate = project_memory(project, ins, choice, hardware=hardware, longest_row=longest_row(project))
    except UserError as exc:  # e.g. fp16 on a CPU: the settings screen marks the key
        memory_error = exc.message
    else:
        base_bytes = 4 if mode != "none" or estimate.precision == "fp32" else 2
        memory = estimate.as_dict()
    group_of = {layer.name: layer.group for layer in ins.layers}
    adapted: dict[str, int] = {}
    for name in choice.layers:
        adapted[group_of[name]] = adapted.get(group_of[name], 0) + 1
    attention = ins.presets["attention"]
    return {
        "model": ins.source,
        "architecture": ins.architecture,
        "targets": choice.targets,
        "layers": list(choice.layers),
        "adapted": adapted,
        "adapted_layers": len(choice.layers),
        "trainable_params": choice.trainable_params,
        "total_params": choice.total_params,
        "percent": choice.percent,
        "adapter_bytes": choice.adapter_bytes(base_bytes),
        "errors": [f"lora.{e}" if e.startswith("target_modules") else e for e in choice.errors],
        "warnings": list(choice.warnings),
        "notes": list(ins.notes),
        "attention_targets": targets_for(ins, attention) if attention else None,
        "memory": memory,
        "memory_error": memory_error,
    }


def hardware_arg(hardware: Any) -> dict[str, Any] | None:
    """A :class:`~tunedeck.core.hardware.Hardware` as a request argument (plain data)."""
    return None if hardware is None else asdict(hardware)


def _hardware(arg: dict[str, Any] | None) -> Any:
    if arg is None:
        return None
    from ..hardware import Gpu, Hardware

    gpus = tuple(Gpu(**{**g, "compute_capability": tuple(g["compute_capability"]),
                        "instance": tuple(g["instance"]) if g.get("instance") else None}) for g in arg["gpus"])
    return Hardware(gpus=gpus, cpu_count=arg["cpu_count"], ram_total=arg["ram_total"],
                    notes=tuple(arg.get("notes") or ()))


# -- the engine, models and targets ----------------------------------------------------


def op_ping() -> Ping:
    return {"pid": os.getpid()}


def op_inspect(source: str, root: str | None = None, trust_remote_code: bool = False) -> Inspected:
    """The model's layers as LoRA sees them: ``Inspection.as_dict()`` (groups, layers, presets...)."""
    return inspection(source, root, trust_remote_code=trust_remote_code).as_dict()


def op_lora_summary(project_text: str, project_path: str | None = None, layers: list[str] | None = None,
                    hardware: dict[str, Any] | None = None) -> LoraSummary:
    """``project_text``: the project as the user sees it (unsaved edits included)."""
    from ..project import Project

    project = Project.from_text(project_text, Path(project_path) if project_path else None)
    return lora_summary(project, layers=layers, hardware=_hardware(hardware))


def op_release() -> Released:
    """Let go of the chat model (before a run trains on the GPU it holds)."""
    had = chat_state().model is not None
    chat_state().release()
    return {"released": had}


def op_preflight(project_path: str, overrides: list[str] | None = None) -> Preflight:
    """The pre-flight of a run (:func:`tunedeck.core.preflight.preflight`, targets included),
    for the app's Train screen: it refuses, in one line, before anything is created."""
    from ..preflight import load_project, preflight

    project = load_project(project_path, overrides or [])
    found = preflight(project, inspection=project_inspection(project))
    return {"counts": found.counts, "processes": found.resolved.processes, "device": found.resolved.device}


# -- chat, eval, merge, export, the Hub -----------------------------------------------------

_chat_state: Any = None


def chat_state() -> Any:
    """The engine's :class:`~tunedeck.core.chat.ChatState`: one base model and its adapters."""
    global _chat_state
    if _chat_state is None:
        from ..chat import ChatState

        _chat_state = ChatState()
    return _chat_state


def _chat_project(project_text: str | None, project_path: str | None) -> Any:
    if project_text is None and project_path is None:
        return None
    from ..project import Project

    if project_text is not None:
        return Project.from_text(project_text, Path(project_path) if project_path else None)
    return Project.load(project_path)  # type: ignore[arg-type]


def _runs_dir(project: Any) -> Path | None:
    return project.resolve_path(project["output.runs_dir"]) if project is not None else None


def op_chat(emit: Emit, cancel: threading.Event, model: str,
            messages: list[dict[str, str]], settings: dict[str, Any] | None = None, partner: str | None = None,
            project_text: str | None = None, project_path: str | None = None) -> Answer:
    """One answer of ``model`` ("base" or a run folder) to ``messages``, alone, streamed: a
    partial ``{"text": piece, "tokens": n, "tokens_per_s": x}`` per decoded piece; the final
    result is the whole answer (``cancelled`` when stopped). ``partner`` is the model of the
    other pane (base takes a run's template and system prompt from it)."""
    from ..chat import GenSettings, target_for

    project = _chat_project(project_text, project_path)
    target = target_for(model, project=project, partner=partner, runs_dir=_runs_dir(project))
    gen = GenSettings.from_dict(settings)

    def on_text(piece: str, answer: Any) -> None:
        emit({"text": piece, "tokens": answer.tokens, "tokens_per_s": answer.tokens_per_s})

    return chat_state().answer(target, messages, gen, cancel=cancel, on_text=on_text).as_dict()


def op_chat_panes(emit: Emit, cancel: threading.Event, panes: list[dict[str, Any]],
                  settings: dict[str, Any] | None = None, project_text: str | None = None,
                  project_path: str | None = None) -> PaneAnswers:
    """Every pane's answer at once: ``panes`` is ``[{"model", "messages"}, ...]`` (each pane's
    model and its conversation). Answers on one base model share a batch
    (:meth:`~tunedeck.core.chat.ChatState.answer_all`) and stream together: a partial
    ``{"pane": i, "text": piece, "tokens": n, "tokens_per_s": x}`` per decoded piece of pane
    i. The final result is ``{"answers": [answer or None], "errors": [one line or None],
    "together": bool}``: a pane whose model cannot answer gets its error, the others answer."""
    from ..chat import BASE, GenSettings, target_for

    project = _chat_project(project_text, project_path)
    runs_dir = _runs_dir(project)
    gen = GenSettings.from_dict(settings)
    models = [str(pane["model"]) for pane in panes]
    asks: list[tuple[Any, list[dict[str, str]]]] = []
    where: list[int] = []  # the pane of each ask
    errors: list[str | None] = [None] * len(panes)
    for i, pane in enumerate(panes):
        partner = next((m for j, m in enumerate(models) if j != i and m != BASE), None)
        try:
            try:
                target = target_for(models[i], project=project, partner=partner, runs_dir=runs_dir)
            except UserError:
                if models[i] != BASE or partner is None or project is None:
                    raise
                # the other pane's run is unreadable (it says why): base answers as the project has it
                target = target_for(BASE, project=project, runs_dir=runs_dir)
        except UserError as exc:
            errors[i] = exc.message
            continue
        asks.append((target, list(pane["messages"])))
        where.append(i)

    def on_text(index: int, piece: str, answer: Any) -> None:
        emit({"pane": where[index], "text": piece, "tokens": answer.tokens, "tokens_per_s": answer.tokens_per_s})

    result = chat_state().answer_all(asks, gen, cancel=cancel, on_text=on_text)
    answers: list[dict[str, Any] | None] = [None] * len(panes)
    for index, pane in enumerate(where):
        answer = result.answers[index]
        answers[pane] = answer.as_dict() if answer is not None else None
        errors[pane] = result.errors[index]
    return {"answers": answers, "errors": errors, "together": result.together}


def op_chat_eval(emit: Emit, cancel: threading.Event, models: list[str],
                 settings: dict[str, Any] | None = None, prompts_file: str | None = None, limit: int | None = None,
                 project_text: str | None = None, project_path: str | None = None) -> EvalAnswers:
    """The eval split's prompts (or a prompts file's) through each of ``models``, all models
    answering a prompt at once (one batch when they share the base model); a partial
    ``{"index", "total", "item"}`` per prompt answered by all, where ``item`` is
    ``{"messages", "reference", "answers": [answer per model]}``."""
    from ..chat import GenSettings, eval_items, target_for

    project = _chat_project(project_text, project_path)
    runs_dir = _runs_dir(project)
    targets = []
    for i, model in enumerate(models):
        partner = next((m for j, m in enumerate(models) if j != i and m != "base"), None)
        targets.append(target_for(model, project=project, partner=partner, runs_dir=runs_dir))
    if project is None:
        run = next((t for t in targets if t.adapter), None)
        if run is None:
            raise UserError("eval mode needs a project or a run (its eval split)")
        project = _chat_project(None, str(Path(run.adapter).parent / "project.toml"))  # type: ignore[arg-type]
    gen = GenSettings.from_dict(settings)
    items = eval_items(project, prompts_file, limit)
    done: list[dict[str, Any]] = []
    state = chat_state()
    for index, item in enumerate(items):
        result = state.answer_all([(target, item["messages"]) for target in targets], gen, cancel=cancel)
        problem = next((e for e in result.errors if e is not None), None)
        if problem is not None:
            raise UserError(problem)
        if cancel.is_set():
            break
        done.append({**item, "answers": [a.as_dict() for a in result.answers if a is not None]})
        emit({"index": index, "total": len(items), "item": done[-1]})
    return {"items": done, "total": len(items), "cancelled": cancel.is_set()}


def op_merge(emit: Emit, cancel: threading.Event, run: str, out: str,
             cpu: bool = False, project_path: str | None = None) -> Merged:
    """Merge a run's adapter into its base: a standalone model folder at ``out``
    (:func:`tunedeck.core.merge.merge_run`); a partial ``{"message"}`` per stage."""
    from ..chat import run_folder
    from ..merge import merge_run

    project = _chat_project(None, project_path)
    run_dir = run_folder(run, _runs_dir(project))
    chat_state().release()  # the chat model's GPU memory goes to the merge (it loads again on the next question)
    return merge_run(run_dir, Path(out), cpu=cpu, progress=lambda message: emit({"message": message}))


def op_export(emit: Emit, cancel: threading.Event, run: str, out: str,
              quant: str = "f16", lora: bool = False, cpu: bool = False,
              project_path: str | None = None) -> Exported:
    """Export a run as GGUF with its Modelfile (:func:`tunedeck.core.export.export_run`); a
    partial ``{"stage", "message", "done", "total"}`` per step; ``cancel`` stops it."""
    from ..chat import run_folder
    from ..export import export_run

    project = _chat_project(None, project_path)
    run_dir = run_folder(run, _runs_dir(project))
    chat_state().release()  # the chat model's memory goes to the merge (it loads again on the next question)
    return export_run(run_dir, Path(out), quant=quant, lora=lora, cpu=cpu, progress=emit, cancel=cancel)


def op_hub_search(text: str, limit: int = 20) -> HubModels:
    """Hub models matching ``text`` (:func:`tunedeck.core.hub.search_models`): the network, when asked."""
    from ..hub import search_models

    return {"models": search_models(text, limit)}


def op_hub_plan(repo: str, revision: str | None = None, dataset: bool = False,
                allow_pickle: bool = False) -> HubPlan:
    """What pulling ``repo`` would fetch (:func:`tunedeck.core.hub.plan_pull`)."""
    from ..hub import plan_pull

    return plan_pull(repo, revision, dataset=dataset, allow_pickle=allow_pickle)


def op_hub_pull(emit: Emit, cancel: threading.Event, repo: str,
                revision: str | None = None, dataset: bool = False, allow_pickle: bool = False) -> Pulled:
    """Download ``repo`` into the Hugging Face cache (:func:`tunedeck.core.hub.pull`); a partial per
    progress step; ``cancel`` stops it (the partial file is kept for resume)."""
    from ..hub import pull

    return pull(repo, revision, dataset=dataset, allow_pickle=allow_pickle, progress=emit, cancel=cancel)


# -- the Dataset screen's ops -------------------------------------------------------------


def _project(project_text: str, project_path: str | None) -> Any:
    from ..project import Project

    return Project.from_text(project_text, Path(project_path) if project_path else None)


def op_preview_row(project_text: str, project_path: str | None = None, index: int | None = None,
                   row: int | None = None, source: int = 0) -> PreviewRow:
    """One row of the project's dataset, rendered and masked (:func:`~tunedeck.core.preview.preview_row`)."""
    from ..preview import preview_row

    return preview_row(_project(project_text, project_path), index=index, row=row, source=source)  # type: ignore[return-value]


def op_preview_stats_stream(emit: Emit, cancel: threading.Event, project_text: str,
                            project_path: str | None = None) -> PreviewStats:
    """The whole dataset's stats, streamed: a partial (the stats so far, ``done`` false)
    about twice a second; a cancel stops the pass."""
    from ..preview import preview_stats

    return preview_stats(_project(project_text, project_path), progress=emit, cancel=cancel)  # type: ignore[return-value]


def op_preview_search(project_text: str, project_path: str | None = None, text: str = "", start: int = 0,
                      backward: bool = False) -> Found:
    """The next row containing ``text`` (:func:`~tunedeck.core.preview.preview_search`)."""
    from ..preview import preview_search

    return preview_search(_project(project_text, project_path), text, start=start, backward=backward)  # type: ignore[return-value]


def op_preview_held_out_stream(emit: Emit, cancel: threading.Event, project_text: str,
                               project_path: str | None = None, positions: Any = (), start: int | None = None,
                               stop: int | None = None) -> HeldOutRows:
    """The held-out positions, streamed: ``{"done": false, "rows"}`` about twice a second
    while the rows are read; a cancel stops the pass."""
    from ..preview import held_out_positions

    return held_out_positions(_project(project_text, project_path), positions, start=start, stop=stop,  # type: ignore[return-value]
                              cancel=cancel, progress=emit)


# -- the registries -----------------------------------------------------------------------

OPS: dict[str, Callable[..., Any]] = {
    "ping": op_ping,
    "preflight": op_preflight,
    "release": op_release,
    "inspect": op_inspect,
    "lora_summary": op_lora_summary,
    "preview_row": op_preview_row,
    "preview_search": op_preview_search,
    "hub_search": op_hub_search,
    "hub_plan": op_hub_plan,
}
"""Ops that answer once."""

STREAMS: dict[str, Callable[..., Any]] = {
    "chat": op_chat,
    "chat_panes": op_chat_panes,
    "chat_eval": op_chat_eval,
    "merge": op_merge,
    "export": op_export,
    "hub_pull": op_hub_pull,
    "preview_stats_stream": op_preview_stats_stream,
    "preview_held_out_stream": op_preview_held_out_stream,
}
"""Ops that stream partial results; each is called with ``emit`` and ``cancel`` too."""

LANES: dict[str, str] = {
    **dict.fromkeys(("chat", "chat_panes", "chat_eval", "merge", "export", "release"), "models"),
    "hub_pull": "downloads",
}
"""Ops served in order on a lane (a thread) of their own, beside the quick ones: those that
load models share the chat model and its memory; a download can take minutes."""

OWN_THREAD = ("preview_stats_stream", "preview_held_out_stream")
"""Passes over a whole dataset: each in a thread of its own (renders take turns on
:data:`tunedeck.core.preview.RENDER_LOCK`), so the rows asked for meanwhile are answered
between two rows of the pass."""
