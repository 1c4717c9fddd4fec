"""The Models screen: every model on this machine, what it is, and what training it costs.

Lists the bundled default, the folders and .gguf files named in the user config's
``model_dirs`` (or added here), the project's own model and the local Hugging Face cache
(:func:`tunedeck.core.models.list_models`: config files and file headers only, no weights,
nothing heavy imported), each with the estimated peak training memory for LoRA and QLoRA
at the project's settings as resolved for this machine (precision, batch size, max_length,
rank, targets, gradient checkpointing), the estimate every screen and command makes
(:func:`tunedeck.core.memory.estimate_for_model`: arithmetic on the config), in GiB. Its
batch is the dataset's longest row once the engine or a run has tokenized the rows (read
from their kept answer, :func:`tunedeck.core.memory.known_longest_row`), else max_length.
Both run in worker threads, row by row; a model that cannot be read is one line in its row.
Enter makes the highlighted model the project's ``model.source`` (unsaved; ctrl+s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.message import Message
from textual.widgets import DataTable, Static
from textual.worker import Worker, get_current_worker

from tunedeck.core.errors import UserError
from tunedeck.core.memory import estimate_for_model, format_gib, known_longest_row, memory_line, tokens_text
from tunedeck.core.models import ModelInfo, list_models, resolve_source
from tunedeck.core.project import Project
from tunedeck.core.schema import toml_repr

from ..session import display_path
from ..widgets.summary import human_bytes, human_count
from .base import ProjectScreen

COLUMNS = ("", "model", "arch", "params", "LoRA", "QLoRA", "layers", "hidden", "context", "dtype", "size", "chat",
           "quant")
NAME_WIDTH = 28
LISTING = "listing models… (config files and file headers only: no weights are read)"

KINDS = {"default": "the bundled default model", "dir": "model folder", "gguf": "GGUF file",
         "hub": "in the Hugging Face cache"}

EstimateKey = tuple[str, str, int | None]  # the settings the estimate reads, the machine, the longest row
ESTIMATE_KEYS = ("quantization.mode", "quantization.double_quant", "quantization.compute_dtype", "lora.r",
                 "lora.target_modules", "lora.dropout", "lora.use_dora", "dataset.max_length", "dataset.packing",
                 "training.batch_size", "training.precision", "training.gradient_checkpointing", "training.devices",
                 "training.method")


def identity(source: str, root: Path) -> str:
    """What a ``model.source`` points at: "default", a real path, or a repo id."""
    if source == "default":
        return "default"
    path = Path(os.path.expanduser(source))
    if not path.is_absolute():
        path = root / path
    return os.path.realpath(path) if path.exists() else source


def identity_of(info: ModelInfo) -> str:
    if info.kind == "default":
        return "default"
    if info.kind == "hub":
        return info.source
    return os.path.realpath(info.path)


def source_for(info: ModelInfo, root: Path) -> str:
    """The ``model.source`` that names ``info``: relative to the project's folder when inside it."""
    if info.kind in ("default", "hub"):
        return info.source
    path = Path(info.path)
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def short_name(info: ModelInfo) -> str:
    name = info.source if info.kind in ("default", "hub") else display_path(Path(info.path))
    return name if len(name) <= NAME_WIDTH else "…" + name[-(NAME_WIDTH - 1):]


def _known(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _number(text: str, style: str = "") -> Text:
    return Text(text, style=style, justify="right")


def facts_line(info: ModelInfo) -> str:
    """Everything the listing read about a model, on one line."""
    params = human_count(info.params) if info.params else "?"
    quantized = f"quantized ({info.quantized})" if info.quantized else "not quantized"
    return (f"{info.architecture} ({info.model_type}) · {params} params · {_known(info.layers)} layers · hidden "
            f"{_known(info.hidden_size)} · context {_known(info.context_length)} · vocab {_known(info.vocab_size)} · "
            f"{info.dtype} · {human_bytes(info.size_bytes)} on disk · "
            f"{'chat template' if info.chat_template else 'no chat template'} · {quantized}")


@dataclass(frozen=True)
class Estimate:
    """Peak training memory of one model (MemoryEstimate.as_dict()s), or why there is none."""

    lora: dict[str, Any] | None = None
    qlora: dict[str, Any] | None = None
    error: str = ""


class ModelsScreen(ProjectScreen):
    """Every model found, and which one the project trains."""

    MODE = "models"
    AUTO_FOCUS = "#models-table"
    BINDINGS = [
        Binding("a", "add", "Add path", id="models.add"),
        Binding("r", "rescan", "Rescan", id="models.rescan"),
    ]

    @dataclass
    class Listed(Message):
        """The models found (``added``: the path that was added to find them)."""

        infos: list[ModelInfo]
        added: str = ""

    @dataclass
    class Checked(Message):
        """Whether the project's model (``identity``) can be used, and if not, why."""

        identity: str
        problem: str

    @dataclass
    class Estimated(Message):
        """The memory estimate of the model at ``path`` for the settings ``key``."""

        key: EstimateKey
        path: str
        estimate: Estimate

    def __init__(self) -> None:
        super().__init__()
        self._infos: list[ModelInfo] = []
        self._listed_for: str | None = None  # the project's model when the list was made
        self._checked_for: str | None = None  # the project's model, as last checked
        self._project_problem = ""  # why it cannot be used
        self._added: list[Path] = []  # folders and files added here
        self._estimates: dict[tuple[EstimateKey, str], Estimate] = {}
        self._estimating: EstimateKey | None = None

    def compose_body(self) -> ComposeResult:
        yield Static(LISTING, id="models-status", classes="screen-status", markup=False)
        table: DataTable[Any] = DataTable(cursor_type="row", zebra_stripes=True, id="models-table")
        for label in COLUMNS:
            table.add_column(label, key=label or "current")
        yield table
        yield Static("", id="model-detail")

    def on_mount(self) -> None:
        super().on_mount()
        self.watch(self.app, "revision", self._sync, init=False)
        self.watch(self.app, "hardware", self._sync, init=False)

    def project_shown(self) -> None:
        self._sync()

    def forget_project(self) -> None:
        self._infos, self._listed_for, self._checked_for, self._estimating = [], None, None, None

    # -- listing ---------------------------------------------------------------------------

    def _project_model(self) -> tuple[str, Path]:
        project = self.session.project
        return project["model.source"], project.root

    def _sync(self) -> None:
        if not self.is_current or self.app.session is None:
            return
        source, root = self._project_model()
        current = identity(source, root)
        if current != self._checked_for:
            self._checked_for, self._project_problem = current, ""
            self._check(source, root, self.session.project["model.allow_pickle"])
        if current != self._listed_for and current not in {identity_of(i) for i in self._infos}:
            self._list()
            return
        self._mark_current()
        self._status_line()
        self._estimate_all()

    @work(thread=True, exclusive=True, group="check", exit_on_error=False)
    def _check(self, source: str, root: Path, allow_pickle: bool) -> None:
        try:
            resolve_source(source, root, allow_pickle=allow_pickle)
        except UserError as exc:
            self.post_message(self.Checked(identity(source, root), exc.message))

    @on(Checked)
    def _checked(self, event: Checked) -> None:
        if event.identity == self._checked_for:
            self._project_problem = event.problem
            self._status_line()

    def _list(self, new: Path | None = None) -> None:
        source, root = self._project_model()
        self._listed_for = current = identity(source, root)
        self._status(LISTING)
        added = [*self._added, *([new] if new is not None and new not in self._added else [])]
        if os.path.isabs(current):  # the project's own model, wherever it is
            added.append(Path(current))
        self._scan(added, str(new) if new is not None else "")

    @work(thread=True, exclusive=True, group="list", exit_on_error=False)
    def _scan(self, extra: list[Path], new: str) -> None:
        infos = list_models(extra)
        if new:
            wanted = os.path.realpath(new)
            if not any(os.path.realpath(i.path) == wanted or os.path.realpath(i.path).startswith(wanted + os.sep)
                       for i in infos):
                raise UserError(f"{new}: no model there; a model folder has a config.json, or give a .gguf file "
                                "or a folder holding those")
        if not get_current_worker().is_cancelled:
            self.post_message(self.Listed(infos, new))

    @on(Listed)
    def _listed(self, event: Listed) -> None:
        table = self.query_one("#models-table", DataTable)
        self._infos = event.infos
        table.clear()
        for index, info in enumerate(event.infos):
            table.add_row(*self._cells(info), key=str(index))
        self._mark_current()
        source, root = self._project_model()
        current = identity(source, root)
        row = next((i for i, info in enumerate(self._infos) if identity_of(info) == current), 0)
        if event.added:
            if Path(event.added) not in self._added:
                self._added.append(Path(event.added))
            wanted = os.path.realpath(event.added)
            row = next((i for i, info in enumerate(self._infos) if os.path.realpath(info.path).startswith(wanted)),
                       row)
            self.app.remember_model_dir(event.added)
            self.notify(f"added {display_path(Path(event.added))} to the model folders (user config)", title="Models")
        if self._infos:
            table.move_cursor(row=row)
        self._status_line()
        self._estimating = None
        self._estimate_all()

    def _cells(self, info: ModelInfo) -> list[Text]:
        name = Text(short_name(info))
        if info.error:
            return [Text(""), name.append(" ✗", style="bold red"), Text("unreadable", style="red"),
                    *(Text("") for _ in COLUMNS[3:])]
        return [
            Text(""), name, Text(info.model_type), _number(human_count(info.params) if info.params else "?"),
            _number("…", "dim"), _number("…", "dim"), _number(_known(info.layers)),
            _number(_known(info.hidden_size)), _number(_known(info.context_length)), Text(info.dtype),
            _number(human_bytes(info.size_bytes) if info.size_bytes else "?"),
            Text("yes" if info.chat_template else "no"), Text(info.quantized or "no"),
        ]

    def _mark_current(self) -> None:
        table = self.query_one("#models-table", DataTable)
        source, root = self._project_model()
        current = identity(source, root)
        for index, info in enumerate(self._infos):
            here = identity_of(info) == current
            table.update_cell(str(index), "current", Text("●", style="bold green") if here else Text(""))

    # -- memory estimates ----------------------------------------------------------------------

    def _estimate_key(self) -> EstimateKey | None:
        hardware = self.app.hardware
        if hardware is None:  # detected in the background at start-up
            return None
        project = self.session.project
        settings = toml_repr([project[k] for k in ESTIMATE_KEYS])
        return settings, repr(hardware), known_longest_row(project)

    def _estimate_all(self) -> None:
        key = self._estimate_key()
        if key is None or key == self._estimating or not self._infos:
            return
        self._estimating = key
        todo = []
        for info in self._infos:
            known = self._estimates.get((key, info.path))
            if known is not None:
                self._show_estimate(info.path, known)
            elif not info.error:
                todo.append(info)
        if todo:
            project = self.session.project
            self._estimate(key, Project.from_text(project.text(), project.path), todo)

    @work(thread=True, exclusive=True, group="estimate", exit_on_error=False)
    def _estimate(self, key: EstimateKey, project: Project, infos: list[ModelInfo]) -> None:
        worker = get_current_worker()
        hardware, longest = self.app.hardware, key[2]
        for info in infos:
            if worker.is_cancelled:
                return
            try:
                found = estimate_for_model(info, project, hardware=hardware, longest_row=longest)
            except UserError as exc:  # settings that cannot resolve here (fp16 on a CPU)
                estimate = Estimate(error=f"no memory estimate: {exc.message}")
            except Exception as exc:  # a header without the sizes: one line in the row, never a crash
                estimate = Estimate(error=f"no memory estimate: {exc.__class__.__name__}: {exc}".splitlines()[0])
            else:
                estimate = Estimate(found["lora"].as_dict(), found["qlora"].as_dict())
            self.post_message(self.Estimated(key, info.path, estimate))

    @on(Estimated)
    def _estimated(self, event: Estimated) -> None:
        self._estimates[(event.key, event.path)] = event.estimate
        if event.key == self._estimating:
            self._show_estimate(event.path, event.estimate)

    def _show_estimate(self, path: str, estimate: Estimate) -> None:
        table = self.query_one("#models-table", DataTable)
        for index, info in enumerate(self._infos):
            if info.path != path:
                continue
            for column, memory in (("LoRA", estimate.lora), ("QLoRA", estimate.qlora)):
                cell = _number(format_gib(memory["total"]), "") if memory else _number("?", "dim")
                table.update_cell(str(index), column, cell, update_width=True)
        self._show_detail()

    # -- the highlighted model ------------------------------------------------------------------

    @on(DataTable.RowHighlighted, "#models-table")
    def _highlighted(self) -> None:
        self._show_detail()

    def _highlighted_info(self) -> ModelInfo | None:
        table = self.query_one("#models-table", DataTable)
        if not self._infos or not 0 <= table.cursor_row < len(self._infos):
            return None
        return self._infos[table.cursor_row]

    def _show_detail(self) -> None:
        info = self._highlighted_info()
        detail = self.query_one("#model-detail", Static)
        if info is None:
            detail.update("")
            return
        name, where = short_name(info), display_path(Path(info.path)) if info.path else ""
        lines = [Content.assemble((name, "bold"), f"  {KINDS[info.kind]}",
                                  (f"  {where}" if where != name else "", "$text-muted"))]
        if info.error:
            lines.append(Content.styled(info.error, "$text-error"))
        else:
            lines.append(Content(facts_line(info)))
            key = self._estimating
            estimate = self._estimates.get((key, info.path)) if key else None
            if estimate is None:
                lines.append(Content.styled("estimating peak training memory…", "$text-muted"))
            elif estimate.error:
                lines.append(Content.styled(estimate.error, "$text-warning"))
            else:
                assert estimate.lora is not None and estimate.qlora is not None
                lines.append(Content.assemble(("LoRA peak   ", "bold"), memory_line(estimate.lora)))
                lines.append(Content.assemble(("QLoRA peak  ", "bold"), memory_line(estimate.qlora)))
            if info.note:
                lines.append(Content.styled(info.note, "$text-muted"))
        detail.update(Content("\n").join(lines))  # lines wrap: every column of the table can be read here

    # -- the status line ----------------------------------------------------------------------------

    def _status(self, text: str, *, error: bool = False) -> None:
        status = self.query_one("#models-status", Static)
        status.update(text)
        status.set_class(error, "-error")

    def _status_line(self) -> None:
        if self._project_problem:
            self._status(self._project_problem, error=True)
            return
        project = self.session.project
        hardware = self.app.hardware
        on = f" on {hardware.device}" if hardware else ""
        key = self._estimate_key()
        batch = tokens_text(project["training.batch_size"], project["dataset.max_length"], key[2] if key else None,
                            project["dataset.packing"])
        if project["training.method"] != "sft":  # both answers of each pair go through the model
            size = project["training.batch_size"]
            batch = batch.replace(f"batch {size} × ", f"batch {size} pairs × 2 answers × ", 1)
        self._status(f"{len(self._infos)} models (● the project's) · memory in GiB at {batch}, r "
                     f"{project['lora.r']}{on} · enter uses · a adds")

    # -- actions -------------------------------------------------------------------------------------

    @on(DataTable.RowSelected, "#models-table")
    def _selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        info = self._highlighted_info()
        if info is None:
            return
        if info.error:
            self.notify(f"{short_name(info)} cannot be used: {info.error}", severity="error", timeout=10)
            return
        session = self.session
        source = source_for(info, session.project.root)
        if identity(session.project["model.source"], session.project.root) == identity_of(info):
            self.notify(f"{source} is already the project's model", title="Model")
            return
        self.app.edit_setting("model.source", value=source)
        invalid = session.invalid.get("model.source")
        if invalid is not None:
            self.notify(f"model.source refused: {invalid.reason}", severity="error", timeout=10)
            return
        self.notify(f"model.source = {source!r} (unsaved; ctrl+s saves)", title="Model")

    def action_add(self) -> None:
        from .dialogs import AddModelScreen

        def added(path: object) -> None:
            if isinstance(path, str):
                self.add_path(path)

        self.app.push_screen(AddModelScreen(), added)

    def add_path(self, text: str) -> None:
        """List the models at ``text`` (a model folder, a folder of them, or a .gguf file)."""
        path = Path(os.path.expanduser(text)).absolute()
        if not path.exists():
            self.notify(f"{text}: no such file or folder", severity="error", timeout=10)
            return
        if path.is_file() and path.suffix.lower() != ".gguf":
            self.notify(f"{text}: not a .gguf file; give a model folder (with config.json) or a .gguf file",
                        severity="error", timeout=10)
            return
        self._list(path)

    def action_rescan(self) -> None:
        self._list()

    def work_failed(self, worker: Worker[object], message: str) -> None:
        if worker.group == "list":
            if self._infos:
                self._status_line()
            else:
                self._status(message, error=True)
            self.notify(message, severity="error", timeout=10)
        else:
            super().work_failed(worker, message)
