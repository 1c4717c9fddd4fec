"""The Modules screen: the target-module inspector.

The engine builds the project's model on the meta device (no weights read) and lists
every layer LoRA can wrap (:mod:`tunedeck.core.inspect`). They are shown grouped by name
(q_proj x 30) or as the model's tree, and picked by group or one by one. Each pick goes to
the engine, which keeps the model's Inspection, so the answer is a count (milliseconds):
the ``target_modules`` that selects exactly the pick (a suffix list for whole groups, a
regex for a partial pick), the trainable parameters peft will report at the project's r,
use_dora, bias and modules_to_save, the adapter's size, the estimated peak memory, and
what training would refuse. The targets are written to the project (unsaved; ctrl+s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import ContentSwitcher, Static
from textual.worker import Worker, get_current_worker

from tunedeck.core.engine import hardware_arg
from tunedeck.core.schema import toml_repr

from ..widgets.choice import ChoiceSummary
from ..widgets.layers import GroupTable, LayerTree, Toggled
from .base import ProjectScreen

READING = ("reading the model's layers… (it is built on the meta device: no weights read; the first time, "
           "the engine process starts, about 10 s)")
PRESET_NAMES = {"attention": "attention", "attention-mlp": "attention + MLP", "all-linear": "linear"}
NOTHING_PICKED = "no layers picked: pick at least one (lora.target_modules keeps its last value)"

ModelKey = tuple[str, bool, str]  # model.source, model.trust_remote_code, the project's folder
SummaryKey = tuple[str, str, str]  # the project's text, its folder, the machine


def targets_text(targets: str | list[str]) -> str:
    """``target_modules`` as TOML; a regex as a literal string, so its backslashes read as typed."""
    if isinstance(targets, str) and "\\" in targets and "'" not in targets:
        return f"'{targets}'"
    return toml_repr(targets)


class ModulesScreen(ProjectScreen):
    """Pick the layers LoRA adapts, with what they cost."""

    MODE = "modules"
    BINDINGS = [
        Binding("v", "switch_view", "Tree/groups", id="modules.view"),
        Binding("a", "preset('attention')", "Attention", id="modules.attention"),
        Binding("m", "preset('attention-mlp')", "Attn+MLP", id="modules.attention_mlp"),
        Binding("l", "preset('all-linear')", "All linear", id="modules.all_linear"),
    ]

    @dataclass
    class Inspected(Message):
        """The engine read the model's layers, and counted the project's targets."""

        model: ModelKey
        info: dict[str, Any]
        key: SummaryKey
        result: dict[str, Any]

    @dataclass
    class Counted(Message):
        """The engine counted a pick (``layers``), or the project's own targets (``layers`` None)."""

        key: SummaryKey
        layers: frozenset[str] | None
        result: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self._model: ModelKey | None = None  # the model shown, or being read
        self._info: dict[str, Any] | None = None  # its inspection, once read
        self._picked: frozenset[str] = frozenset()
        self._results: dict[SummaryKey, dict[str, Any]] = {}
        self._writing = False  # writing a pick's targets to the project

    def compose_body(self) -> ComposeResult:
        yield Static(READING, id="modules-status", classes="screen-status", markup=False)
        with ContentSwitcher(initial="groups", id="views"):
            yield GroupTable(id="groups")
            yield LayerTree(id="tree")
        yield ChoiceSummary(id="choice")

    def on_mount(self) -> None:
        super().on_mount()
        self.watch(self.app, "revision", self._sync, init=False)
        self.watch(self.app, "hardware", self._sync, init=False)

    def project_shown(self) -> None:
        self._sync()

    def forget_project(self) -> None:
        self._model, self._info, self._picked = None, None, frozenset()

    # -- what the project asks for ---------------------------------------------------

    def _key(self) -> SummaryKey:
        session = self.session
        return session.project.text(), str(session.project.root), repr(self.app.hardware)

    def _request(self) -> dict[str, Any]:
        session = self.session
        return {"project_text": session.project.text(),
                "project_path": str(session.path) if session.path else None,
                "hardware": hardware_arg(self.app.hardware)}

    def _sync(self) -> None:
        """Show what the project has now: read its model when that changed, count its targets
        when they (or the settings they are counted at) changed."""
        if self._writing or not self.is_current or self.app.session is None:
            return
        project = self.session.project
        self._show_targets()
        model = (project["model.source"], project["model.trust_remote_code"], str(project.root))
        if model != self._model:
            self._model, self._info, self._picked = model, None, frozenset()
            self._status(READING)
            self.query_one(GroupTable).show([], ())
            self.query_one(LayerTree).show("model", [], ())
            choice = self.query_one(ChoiceSummary)
            choice.result, choice.error, choice.status = None, "", "waiting for the model's layers"
            self._inspect(model, self._key(), self._request())
            return
        if self._info is None:
            return
        key = self._key()
        if key in self._results:
            self._show(self._results[key])
        else:
            self._count(key, self._request())

    @work(thread=True, exclusive=True, group="inspect", exit_on_error=False)
    def _inspect(self, model: ModelKey, key: SummaryKey, request: dict[str, Any]) -> None:
        worker = get_current_worker()
        source, trust_remote_code, root = model
        engine = self.app.engine
        info = engine.inspect(source, root, trust_remote_code,
                           cancel=worker.cancelled_event)
        result = engine.lora_summary(**request, cancel=worker.cancelled_event)
        if not worker.is_cancelled:
            self.post_message(self.Inspected(model, info, key, result))

    @on(Inspected)
    def _inspected(self, event: Inspected) -> None:
        if event.model != self._model:
            return
        info = self._info = event.info
        self._results[event.key] = event.result
        picked = frozenset(event.result["layers"])
        self.query_one(GroupTable).show(info["groups"], picked)
        self.query_one(LayerTree).show(info["architecture"], info["layers"], picked)
        self._status_for_view()
        self._sync()

    # -- picking -------------------------------------------------------------------------

    @on(Toggled)
    def _toggled(self, event: Toggled) -> None:
        layers = frozenset(event.layers)
        self.pick(self._picked - layers if layers <= self._picked else self._picked | layers)

    def action_preset(self, name: str) -> None:
        if self._info is None:
            return
        layers = self._info["presets"][name]
        if not layers:
            self.notify(f"this model has no {PRESET_NAMES[name]} layers to pick", severity="warning")
            return
        self.pick(layers)

    def pick(self, layers: Any) -> None:
        """Pick exactly ``layers`` (names of the model's layers): the marks change at once, the
        numbers and the project's target_modules when the engine has counted (milliseconds)."""
        if self._info is None:
            return
        self._picked = frozenset(layers)
        self._mark()
        choice = self.query_one(ChoiceSummary)
        if not self._picked:
            choice.error = NOTHING_PICKED
            return
        choice.error = ""
        ordered = [x["name"] for x in self._info["layers"] if x["name"] in self._picked]
        self._count_pick(self._key(), ordered, self._request())

    @work(thread=True, exclusive=True, group="count", exit_on_error=False)
    def _count(self, key: SummaryKey, request: dict[str, Any]) -> None:
        """Count the project's own targets."""
        worker = get_current_worker()
        result = self.app.engine.lora_summary(**request, cancel=worker.cancelled_event)
        if not worker.is_cancelled:
            self.post_message(self.Counted(key, None, result))

    @work(thread=True, exclusive=True, group="pick", exit_on_error=False)
    def _count_pick(self, key: SummaryKey, layers: list[str], request: dict[str, Any]) -> None:
        """Count a pick, and find the targets that select it (a newer pick cancels this one)."""
        worker = get_current_worker()
        result = self.app.engine.lora_summary(**request, layers=layers, cancel=worker.cancelled_event)
        if not worker.is_cancelled:
            self.post_message(self.Counted(key, frozenset(layers), result))

    @on(Counted)
    def _counted(self, event: Counted) -> None:
        if event.layers is None:  # the project's own targets
            self._results[event.key] = event.result
            if event.key == self._key():
                self._show(event.result)
            return
        if event.layers != self._picked:  # a newer pick is on its way
            return
        self._writing = True
        try:
            self.app.edit_setting("lora.target_modules", value=event.result["targets"])
        finally:
            self._writing = False
        self._results[self._key()] = event.result
        self._show(event.result)

    # -- showing -----------------------------------------------------------------------------

    def _show(self, result: dict[str, Any]) -> None:
        self._picked = frozenset(result["layers"])
        self._mark()
        choice = self.query_one(ChoiceSummary)
        choice.result, choice.error = result, ""
        self._show_targets()

    def _mark(self) -> None:
        self.query_one(GroupTable).mark(self._picked)
        self.query_one(LayerTree).mark(self._picked)

    def _show_targets(self) -> None:
        session, choice = self.session, self.query_one(ChoiceSummary)
        choice.targets = targets_text(session.project["lora.target_modules"])
        choice.edited = session.edited("lora.target_modules")

    def _status(self, text: str, *, error: bool = False) -> None:
        status = self.query_one("#modules-status", Static)
        status.update(text)
        status.set_class(error, "-error")

    def _status_for_view(self) -> None:
        info = self._info
        if info is None:
            return
        tree = self.query_one(ContentSwitcher).current == "tree"
        count, groups = len(info["layers"]), len(info["groups"])
        self._status(f"{info['architecture']}: {count} layers LoRA can wrap ({groups} groups) · "
                     f"v: {'groups' if tree else 'tree'} view · space/enter/click picks")

    def action_switch_view(self) -> None:
        switcher = self.query_one(ContentSwitcher)
        switcher.current = "tree" if switcher.current == "groups" else "groups"
        self.query_one(f"#{switcher.current}").focus()
        self._status_for_view()

    def work_failed(self, worker: Worker[object], message: str) -> None:
        choice = self.query_one(ChoiceSummary)
        if worker.group == "inspect":
            self._model = None  # read it again the next time the screen shows
            self._status(message, error=True)
            choice.result, choice.status = None, "no layers: the model could not be read"
        elif worker.group in ("count", "pick"):
            choice.error = message
        else:
            super().work_failed(worker, message)
