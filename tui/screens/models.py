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

``/`` searches the Hugging Face Hub (the engine's ``hub_search``: the only network use, and
only when asked): enter on a model found shows what a download would fetch (``hub_plan``:
the files, their size against the free disk space, the pickle files left out, whether it is
gated) and asks; a download (stream ``hub_pull``) shows a bar for the current file and one
for the whole, and esc, its Cancel button or "Cancel download" in the palette stop it (the
partial file is kept: pulling again resumes). Once done the list shows the model (it is in
the Hugging Face cache) and the screen offers to make it the project's model. A refusal (no
network, a gated repo, no space) is one line, never a traceback.
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
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.widgets import ContentSwitcher, DataTable, Static
from textual.worker import Worker, get_current_worker

from tunedeck.core.errors import UserError, first_line
from tunedeck.core.memory import estimate_for_model, known_longest_row, memory_line, tokens_text
from tunedeck.core.models import ModelInfo, list_models, resolve_source
from tunedeck.core.project import Project
from tunedeck.core.schema import toml_repr
from tunedeck.core.units import format_bytes, format_count, format_gib

from ..commands import Command, ListedCommands
from ..session import display_path
from ..widgets.hub_search import HubDownload, HubSearch, hub_size
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
    params = format_count(info.params) if info.params else "?"
    quantized = f"quantized ({info.quantized})" if info.quantized else "not quantized"
    return (f"{info.architecture} ({info.model_type}) · {params} params · {_known(info.layers)} layers · hidden "
            f"{_known(info.hidden_size)} · context {_known(info.context_length)} · vocab {_known(info.vocab_size)} · "
            f"{info.dtype} · {format_bytes(info.size_bytes)} on disk · "
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
        Binding("slash", "hub_search", "Hub search", id="models.hub_search"),
        Binding("escape", "cancel_download", "Cancel download", id="models.hub_cancel"),
        Binding("escape", "hub_back", "Back to the list", show=False, id="models.hub_back"),
    ]
    COMMANDS = {lambda: HubCommands}

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

    @dataclass
    class HubFound(Message):
        """The Hub's models matching ``text`` (``hub_search``'s dicts)."""

        text: str
        models: list[dict[str, Any]]

    @dataclass
    class HubRefused(Message):
        """A Hub request that failed (no network, no such repo...): one line."""

        message: str

    @dataclass
    class HubPlanned(Message):
        """What downloading a repo would fetch (``hub_plan``'s answer)."""

        plan: dict[str, Any]

    @dataclass
    class PullProgress(Message):
        """How far the download is (a ``hub_pull`` partial); a newer one replaces one still queued."""

        partial: dict[str, Any]

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, ModelsScreen.PullProgress)

    @dataclass
    class PullEnded(Message):
        """The download of ``repo`` is over: done (``result``), cancelled, or refused (``error``)."""

        repo: str
        result: dict[str, Any] | None
        error: str = ""
        cancelled: bool = False
        session: object = None  # the project open when it started

    def __init__(self) -> None:
        super().__init__()
        self._infos: list[ModelInfo] = []
        self._listed_for: str | None = None  # the project's model when the list was made
        self._checked_for: str | None = None  # the project's model, as last checked
        self._project_problem = ""  # why it cannot be used
        self._added: list[Path] = []  # folders and files added here
        self._estimates: dict[tuple[EstimateKey, str], Estimate] = {}
        self._estimating: EstimateKey | None = None
        self.pulling: str | None = None  # the repo being downloaded
        self._pulled: tuple[str, object] | None = None  # (model.source, session) to offer once listed

    def compose_body(self) -> ComposeResult:
        yield Static(LISTING, id="models-status", classes="screen-status", markup=False)
        with ContentSwitcher(initial="models-local", id="models-switcher"):
            with Vertical(id="models-local"):
                table: DataTable[Any] = DataTable(cursor_type="row", zebra_stripes=True, id="models-table")
                for label in COLUMNS:
                    table.add_column(label, key=label or "current")
                yield table
                yield Static("", id="model-detail")
            yield HubSearch(id="models-hub")
        yield HubDownload(id="hub-pull", classes="-going" if self.pulling else "")

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
        pulled, self._pulled = self._pulled, None
        if pulled is not None:
            row = next((i for i, info in enumerate(self._infos) if info.kind == "hub" and info.source == pulled[0]),
                       row)
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
        if pulled is not None:
            self._offer(*pulled)

    def _cells(self, info: ModelInfo) -> list[Text]:
        name = Text(short_name(info))
        if info.error:
            return [Text(""), name.append(" ✗", style="bold red"), Text("unreadable", style="red"),
                    *(Text("") for _ in COLUMNS[3:])]
        return [
            Text(""), name, Text(info.model_type), _number(format_count(info.params) if info.params else "?"),
            _number("…", "dim"), _number("…", "dim"), _number(_known(info.layers)),
            _number(_known(info.hidden_size)), _number(_known(info.context_length)), Text(info.dtype),
            _number(format_bytes(info.size_bytes) if info.size_bytes else "?"),
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
                estimate = Estimate(error=f"no memory estimate: {exc.__class__.__name__}: {first_line(exc)}")
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
        self.use_source(source_for(info, self.session.project.root))

    def use_source(self, source: str) -> None:
        """Make ``source`` the project's ``model.source`` (unsaved), as enter on a model does."""
        session = self.session
        if identity(session.project["model.source"], session.project.root) == identity(source, session.project.root):
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

    # -- the Hugging Face Hub -------------------------------------------------------------------

    def _hub(self) -> HubSearch:
        return self.query_one("#models-hub", HubSearch)

    def _hub_showing(self) -> bool:
        switchers = self.query("#models-switcher").results(ContentSwitcher)
        return any(switcher.current == "models-hub" for switcher in switchers)

    def action_hub_search(self) -> None:
        """Show the Hub search (the results of the last one stay) with the cursor in its field."""
        self.query_one("#models-switcher", ContentSwitcher).current = "models-hub"
        self._hub().focus_query()
        self.refresh_bindings()

    def action_hub_back(self) -> None:
        self.query_one("#models-switcher", ContentSwitcher).current = "models-local"
        self.query_one("#models-table", DataTable).focus()
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel_download":
            return self.pulling is not None
        if action == "hub_back":
            return self._hub_showing()
        return True

    @on(HubSearch.Search)
    def _hub_search_asked(self, event: HubSearch.Search) -> None:
        self._hub_search(event.text)

    @work(thread=True, exclusive=True, group="hub-search", exit_on_error=False)
    def _hub_search(self, text: str) -> None:
        try:
            found = self.app.engine.hub_search(text, limit=30)
        except UserError as exc:  # EngineError: no network, a bad answer from the Hub...
            self.post_message(self.HubRefused(exc.message))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(self.HubFound(text, list(found.get("models") or [])))

    @on(HubFound)
    def _hub_found(self, event: HubFound) -> None:
        self._hub().show_results(event.text, event.models)

    @on(HubRefused)
    def _hub_refused(self, event: HubRefused) -> None:
        if self.is_mounted:
            self._hub().show_line(event.message, error=True)
        self.notify(event.message, title="Hub", severity="error", timeout=10)

    @on(HubSearch.Chosen)
    def _hub_chosen(self, event: HubSearch.Chosen) -> None:
        repo = str(event.model.get("id") or "")
        if not repo:
            return
        if self.pulling is not None:
            self.notify(f"downloading {self.pulling}: one download at a time (esc cancels it)", title="Hub",
                        severity="warning")
            return
        self._hub().show_line(f"asking the Hub what {repo} would fetch…")
        self._hub_plan(repo, bool(self.session.project["model.allow_pickle"]))

    @work(thread=True, exclusive=True, group="hub-plan", exit_on_error=False)
    def _hub_plan(self, repo: str, allow_pickle: bool) -> None:
        try:
            plan = self.app.engine.hub_plan(repo, allow_pickle=allow_pickle)
        except UserError as exc:  # gated without access, pickle-only weights, an unknown architecture...
            self.post_message(self.HubRefused(exc.message))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(self.HubPlanned({**plan, "allow_pickle": allow_pickle}))

    @on(HubPlanned)
    def _hub_planned(self, event: HubPlanned) -> None:
        from .dialogs import HubPlanDialog

        plan = event.plan
        self._hub().show_line(f"{plan.get('repo')}: {len(plan.get('files') or [])} files, "
                              f"{hub_size(int(plan.get('total') or 0))}")

        def answered(answer: object) -> None:
            if answer == "download":
                self.pull(plan)

        self.app.push_screen(HubPlanDialog(plan), answered)

    def pull(self, plan: dict[str, Any]) -> None:
        """Download what ``plan`` (``hub_plan``'s answer) names, showing its progress."""
        repo = str(plan["repo"])
        if self.pulling is not None:
            self.notify(f"downloading {self.pulling}: one download at a time (esc cancels it)", title="Hub",
                        severity="warning")
            return
        self.pulling = repo
        panel = self.query_one("#hub-pull", HubDownload)
        panel.start(repo, int(plan.get("total") or 0), len(plan.get("files") or []))
        panel.add_class("-going")
        self.refresh_bindings()
        self._hub_pull(repo, plan.get("revision"), bool(plan.get("allow_pickle")), self.app.session)

    @work(thread=True, exclusive=True, group="hub-pull", exit_on_error=False)
    def _hub_pull(self, repo: str, revision: str | None, allow_pickle: bool, session: object) -> None:
        worker = get_current_worker()
        try:
            result = self.app.engine.hub_pull(
                repo, revision, allow_pickle=allow_pickle,
                on_progress=lambda partial: self.post_message(self.PullProgress(partial)),
                cancel=worker.cancelled_event)
        except UserError as exc:  # cancelled (the partial file is kept), no space, the network gone...
            cancelled = worker.is_cancelled or "cancelled" in exc.message
            self.post_message(self.PullEnded(repo, None, exc.message, cancelled))
            return
        self.post_message(self.PullEnded(repo, result, session=session))

    @on(PullProgress)
    def _pull_progress(self, event: PullProgress) -> None:
        if self.pulling is None:
            return
        panel = self.query_one("#hub-pull", HubDownload)
        if panel.repo != self.pulling:  # rebuilt (another project opened) while downloading
            partial = event.partial
            panel.start(self.pulling, int(partial.get("total") or 0), int(partial.get("files_total") or 0))
        panel.progress(event.partial)

    def action_cancel_download(self) -> None:
        """Stop the download (at the next bytes; the partial file is kept for resuming)."""
        going = [w for w in self.workers if w.group == "hub-pull" and w.is_running]
        if self.pulling is None or not going:
            self.notify("no download is going", title="Hub", severity="warning")
            return
        for worker in going:
            worker.cancel()
        self.query_one("#hub-pull", HubDownload).stopping()

    @on(HubDownload.CancelPressed)
    def _cancel_pressed(self) -> None:
        self.action_cancel_download()

    def _pull_over(self) -> None:
        self.pulling = None
        self.query_one("#hub-pull", HubDownload).remove_class("-going")
        self.refresh_bindings()

    @on(PullEnded)
    def _pull_ended(self, event: PullEnded) -> None:
        self._pull_over()
        if event.cancelled:
            self.notify(f"{event.repo}: download cancelled; pull again to resume (the partial file is kept)",
                        title="Hub", severity="warning", timeout=10)
            return
        if event.result is None:
            self.notify(event.error, title="Hub", severity="error", timeout=10)
            return
        result = event.result
        source = str(result.get("source") or event.repo)
        self.notify(f"{event.repo} downloaded ({hub_size(int(result.get('bytes') or 0))}) into the Hugging Face "
                    f"cache: model.source = {source!r} uses it", title="Hub", timeout=15)
        self._pulled = (source, event.session)
        self.action_hub_back()
        self._list()

    def _offer(self, source: str, session: object) -> None:
        """Offer to make the model just downloaded the project's model (the same project, on this screen)."""
        if session is not self.app.session or not self.is_current:
            return
        project = self.session.project
        if identity(project["model.source"], project.root) == identity(source, project.root):
            return
        from .dialogs import ChoiceScreen

        def answered(answer: object) -> None:
            if answer == "use":
                self.use_source(source)

        self.app.push_screen(ChoiceScreen(
            "Downloaded", f"{source} is in the Hugging Face cache. Make it the project's model "
            f"(model.source = {source!r}, unsaved; ctrl+s saves)?", [("Use it", "use")]), answered)

    def work_failed(self, worker: Worker[object], message: str) -> None:
        if worker.group in ("hub-search", "hub-plan"):
            self.post_message(self.HubRefused(message))
            return
        if worker.group == "hub-pull":  # not a refusal (those end it in PullEnded): a bug, still one line
            self._pull_over()
        if worker.group == "list":
            if self._infos:
                self._status_line()
            else:
                self._status(message, error=True)
            self.notify(message, severity="error", timeout=10)
        else:
            super().work_failed(worker, message)


class HubCommands(ListedCommands):
    """The Models screen's palette commands: search the Hub, cancel the download going."""

    def commands(self) -> list[Command]:
        screen = self.screen
        if not isinstance(screen, ModelsScreen):
            return []
        found: list[Command] = [
            ("Search the Hugging Face Hub", "Find a model to download (/ on the Models screen)",
             screen.action_hub_search)]
        if screen.pulling is not None:
            found.append(("Cancel download", (f"Stop downloading {screen.pulling}; the partial file is kept, "
                                              "pulling again resumes (esc)"), screen.action_cancel_download))
        return found
