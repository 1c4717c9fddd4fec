"""The engine's requests as typed calls.

:class:`EngineCalls` names every request the engine serves as a method with its arguments
and its typed result (:mod:`tunedeck.core.engine.results`); a caller writes
``engine.lora_summary(project_text=..., layers=...)`` and never spells an op's name.
Subclasses give the transport: :meth:`call` (one answer) and :meth:`stream` (partial
answers, then one). :class:`tunedeck.core.engine.client.EngineClient` sends them to the
engine process; the tests' in-process engines run the same ops in their own process.

Every call takes ``cancel`` (a ``threading.Event``: set, the request is cancelled in the
engine too) and ``timeout`` (seconds). A streaming call's partials go to its ``on_*``
callback, in the calling thread. Failures raise :class:`EngineError` (one line).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
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

Partial = Callable[[dict[str, Any]], None]


class EngineError(UserError):
    """An engine request that failed; the message is one line."""


class EngineCalls(ABC):
    """Typed requests over a transport (:meth:`call`, :meth:`stream`, :meth:`close`)."""

    # -- the transport ----------------------------------------------------------------------

    @abstractmethod
    def call(self, op: str, *, timeout: float | None = None, cancel: threading.Event | None = None,
             **args: Any) -> Any:
        """Send request ``op`` and wait for its result; :class:`EngineError` when it fails."""

    @abstractmethod
    def stream(self, op: str, *, on_partial: Partial | None = None, timeout: float | None = None,
               cancel: threading.Event | None = None, **args: Any) -> Any:
        """Send a streaming request; ``on_partial`` gets each partial result, then the final
        result is returned."""

    @abstractmethod
    def close(self, timeout: float = 2.0) -> None:
        """Let the engine go."""

    # -- the engine itself --------------------------------------------------------------------

    def ping(self, *, timeout: float | None = None) -> Ping:
        return self.call("ping", timeout=timeout)

    def release(self, *, timeout: float | None = None) -> Released:
        """The chat model lets go of its memory (before a run trains on the GPU it holds)."""
        return self.call("release", timeout=timeout)

    def preflight(self, project_path: str, overrides: Sequence[str] = (), *, timeout: float | None = None,
                  cancel: threading.Event | None = None) -> Preflight:
        """The checks before a run (targets included): a refusal is one line, nothing created."""
        return self.call("preflight", project_path=project_path, overrides=list(overrides), timeout=timeout,
                         cancel=cancel)

    # -- models and targets -------------------------------------------------------------------

    def inspect(self, source: str, root: str | None = None, trust_remote_code: bool = False, *,
                timeout: float | None = None, cancel: threading.Event | None = None) -> Inspected:
        """A model's layers as LoRA sees them (built on the meta device, kept per model)."""
        return self.call("inspect", source=source, root=root, trust_remote_code=trust_remote_code, timeout=timeout,
                         cancel=cancel)

    def lora_summary(self, project_text: str, project_path: str | None = None, *, layers: list[str] | None = None,
                     hardware: dict[str, Any] | None = None, timeout: float | None = None,
                     cancel: threading.Event | None = None) -> LoraSummary:
        """What the project's [lora] settings (or ``layers``, a pick of layers) train, and the
        estimated memory on ``hardware`` (:func:`~tunedeck.core.engine.ops.hardware_arg`)."""
        return self.call("lora_summary", project_text=project_text, project_path=project_path, layers=layers,
                         hardware=hardware, timeout=timeout, cancel=cancel)

    # -- the dataset ----------------------------------------------------------------------------

    def preview_row(self, project_text: str, project_path: str | None = None, *, index: int | None = None,
                    row: int | None = None, source: int = 0, timeout: float | None = None,
                    cancel: threading.Event | None = None) -> PreviewRow:
        """One row, rendered and masked: by position (``index``) or by its number in ``source``."""
        return self.call("preview_row", project_text=project_text, project_path=project_path, index=index, row=row,
                         source=source, timeout=timeout, cancel=cancel)

    def preview_stats(self, project_text: str, project_path: str | None = None, *,
                      on_progress: Partial | None = None, timeout: float | None = None,
                      cancel: threading.Event | None = None) -> PreviewStats:
        """The whole dataset's stats; ``on_progress`` gets the stats so far about twice a second."""
        return self.stream("preview_stats_stream", project_text=project_text, project_path=project_path,
                           on_partial=on_progress, timeout=timeout, cancel=cancel)

    def preview_search(self, project_text: str, project_path: str | None = None, *, text: str, start: int = 0,
                       backward: bool = False, timeout: float | None = None,
                       cancel: threading.Event | None = None) -> Found:
        """The next row (or the previous one) containing ``text``."""
        return self.call("preview_search", project_text=project_text, project_path=project_path, text=text,
                         start=start, backward=backward, timeout=timeout, cancel=cancel)

    def held_out(self, project_text: str, project_path: str | None = None, *, positions: Sequence[int] = (),
                 start: int | None = None, stop: int | None = None, on_progress: Partial | None = None,
                 timeout: float | None = None, cancel: threading.Event | None = None) -> HeldOutRows:
        """Which row positions the trainer holds out for evaluation."""
        return self.stream("preview_held_out_stream", project_text=project_text, project_path=project_path,
                           positions=list(positions), start=start, stop=stop, on_partial=on_progress,
                           timeout=timeout, cancel=cancel)

    # -- chat ---------------------------------------------------------------------------------

    def chat(self, model: str, messages: list[dict[str, Any]], *, settings: dict[str, Any] | None = None,
             partner: str | None = None, project_text: str | None = None, project_path: str | None = None,
             on_text: Partial | None = None, timeout: float | None = None,
             cancel: threading.Event | None = None) -> Answer:
        """One answer of ``model`` ("base" or a run folder), streamed to ``on_text``."""
        return self.stream("chat", model=model, messages=messages, settings=settings, partner=partner,
                           project_text=project_text, project_path=project_path, on_partial=on_text,
                           timeout=timeout, cancel=cancel)

    def chat_panes(self, panes: list[dict[str, Any]], *, settings: dict[str, Any] | None = None,
                   project_text: str | None = None, project_path: str | None = None, on_text: Partial | None = None,
                   timeout: float | None = None, cancel: threading.Event | None = None) -> PaneAnswers:
        """Every pane's answer at once (``panes``: ``[{"model", "messages"}]``), streamed to
        ``on_text`` with the pane's index."""
        return self.stream("chat_panes", panes=panes, settings=settings, project_text=project_text,
                           project_path=project_path, on_partial=on_text, timeout=timeout, cancel=cancel)

    def chat_eval(self, models: list[str], *, settings: dict[str, Any] | None = None, prompts_file: str | None = None,
                  limit: int | None = None, project_text: str | None = None, project_path: str | None = None,
                  on_item: Partial | None = None, timeout: float | None = None,
                  cancel: threading.Event | None = None) -> EvalAnswers:
        """The eval prompts through each of ``models``; ``on_item`` gets each prompt answered by all."""
        return self.stream("chat_eval", models=models, settings=settings, prompts_file=prompts_file, limit=limit,
                           project_text=project_text, project_path=project_path, on_partial=on_item,
                           timeout=timeout, cancel=cancel)

    # -- long jobs: a run's adapter out of tunedeck ------------------------------------------

    def merge(self, run: str, out: str, *, cpu: bool = False, project_path: str | None = None,
              on_progress: Partial | None = None, timeout: float | None = None,
              cancel: threading.Event | None = None) -> Merged:
        """A run's adapter merged into its base, a standalone model folder at ``out``."""
        return self.stream("merge", run=run, out=out, cpu=cpu, project_path=project_path, on_partial=on_progress,
                           timeout=timeout, cancel=cancel)

    def export(self, run: str, out: str, *, quant: str = "f16", lora: bool = False, cpu: bool = False,
               project_path: str | None = None, on_progress: Partial | None = None, timeout: float | None = None,
               cancel: threading.Event | None = None) -> Exported:
        """A run as GGUF with its Modelfile at ``out``."""
        return self.stream("export", run=run, out=out, quant=quant, lora=lora, cpu=cpu, project_path=project_path,
                           on_partial=on_progress, timeout=timeout, cancel=cancel)

    # -- the Hugging Face Hub (the network, only when asked) ---------------------------------

    def hub_search(self, text: str, limit: int = 20, *, timeout: float | None = None,
                   cancel: threading.Event | None = None) -> HubModels:
        return self.call("hub_search", text=text, limit=limit, timeout=timeout, cancel=cancel)

    def hub_plan(self, repo: str, revision: str | None = None, *, dataset: bool = False, allow_pickle: bool = False,
                 timeout: float | None = None, cancel: threading.Event | None = None) -> HubPlan:
        """What pulling ``repo`` would fetch, or why it is refused."""
        return self.call("hub_plan", repo=repo, revision=revision, dataset=dataset, allow_pickle=allow_pickle,
                         timeout=timeout, cancel=cancel)

    def hub_pull(self, repo: str, revision: str | None = None, *, dataset: bool = False, allow_pickle: bool = False,
                 on_progress: Partial | None = None, timeout: float | None = None,
                 cancel: threading.Event | None = None) -> Pulled:
        """Download ``repo`` into the Hugging Face cache; a cancelled download resumes."""
        return self.stream("hub_pull", repo=repo, revision=revision, dataset=dataset, allow_pickle=allow_pickle,
                           on_partial=on_progress, timeout=timeout, cancel=cancel)
