"""Modal dialogs: open a project, create one, unsaved changes, presets, every key,
exporting a run as GGUF, and what a download from the Hugging Face Hub would fetch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Button, Checkbox, DataTable, Input, Label, OptionList
from textual.widgets.option_list import Option
from tunedeck.core.errors import UserError
from tunedeck.core.project import Project

from ..exporting import EXPORT_QUANTS, K_QUANT_NOTE, QUANT_NAMES, ExportChoice
from ..presets import PRESETS


class PathSuggester(Suggester):
    """Completes the last part of a path from the folder it is in (folders and ``suffix`` files)."""

    def __init__(self, suffix: str = "") -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.suffix = suffix

    async def get_suggestion(self, value: str) -> str | None:
        folder, sep, stem = value.rpartition(os.sep)
        base = Path(os.path.expanduser(folder + sep if sep else "."))
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return None
        for name in names:
            if not name.startswith(stem) or name == stem or (name.startswith(".") and not stem.startswith(".")):
                continue
            if (base / name).is_dir():
                return value + name[len(stem):] + os.sep
            if name.endswith(self.suffix):
                return value + name[len(stem):]
        return None


class Dialog(ModalScreen[object]):
    """A centred box; escape cancels (dismisses with None)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="dialog.cancel")]
    SHORT = 32
    """Below this many rows the dialog drops its blank lines and input borders (class
    ``-short``), so a dialog of three fields and its buttons fits an 80x24 terminal."""

    def on_resize(self) -> None:
        self.set_class(self.app.size.height < self.SHORT, "-short")

    def on_mount(self) -> None:
        self.on_resize()

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


class OpenProjectScreen(Dialog):
    """Ask for a project file and load it; a bad file is reported in the dialog."""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Open a project", classes="dialog-title")
            yield Label("Path of a project file (→ completes):", classes="dialog-help")
            yield Input(placeholder="path/to/project.toml", suggester=PathSuggester(".toml"), id="path")
            yield Label("", classes="dialog-problem")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Open", variant="primary", id="open")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#open")
    def _open(self) -> None:
        path = self.query_one("#path", Input).value.strip()
        if not path:
            self._problem("type the path of a project file")
            return
        try:
            project = Project.load(os.path.expanduser(path))
        except UserError as exc:
            self._problem(exc.message)
            return
        self.dismiss(project)

    def _problem(self, message: str) -> None:
        self.query_one(".dialog-problem", Label).update(message)


class NewProjectScreen(Dialog):
    """Create a starter project file (like ``tunedeck new``) and open it."""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("New project", classes="dialog-title")
            yield Label("Project file to create:", classes="dialog-help")
            yield Input(placeholder="myrun.toml", suggester=PathSuggester(".toml"), id="path")
            yield Label("Model (\"default\", a folder, a .gguf file or a cached repo id):", classes="dialog-help")
            yield Input("default", id="model", suggester=PathSuggester())
            yield Label("Training data (optional; JSONL, JSON, CSV or Parquet):", classes="dialog-help")
            yield Input(placeholder="data.jsonl", id="dataset", suggester=PathSuggester())
            yield Label("", classes="dialog-problem")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#create")
    def _create(self) -> None:
        from tunedeck.core.commands.new import create

        path, model, dataset = (self.query_one(f"#{name}", Input).value.strip()
                                for name in ("path", "model", "dataset"))
        try:
            if not path:
                raise UserError("type the path of the project file to create, e.g. myrun.toml")
            if Path(os.path.expanduser(path)).exists():
                raise UserError(f"{path} already exists; open it (ctrl+o) or pick another name")
            if dataset and not Path(os.path.expanduser(dataset)).exists():
                raise UserError(f"training data {dataset}: no such file")
            project = create(Path(os.path.expanduser(path)), model=model or "default",
                             dataset=os.path.expanduser(dataset))
        except UserError as exc:
            self.query_one(".dialog-problem", Label).update(exc.message)
            return
        self.dismiss(project)


class ChoiceScreen(Dialog):
    """A question with a few answers (buttons); dismisses with the chosen answer, or None."""

    def __init__(self, title: str, message: str, answers: list[tuple[str, str]], *,
                 disabled: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.title_text = title
        self.message = message
        self.answers = answers
        self.disabled = disabled

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Label(self.message, classes="dialog-help")
            with Horizontal(classes="dialog-buttons"):
                for index, (label, answer) in enumerate(self.answers):
                    yield Button(label, id=f"answer-{answer}", disabled=answer in self.disabled,
                                 variant="primary" if index == 0 else "default")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        """Enter takes the first answer, unless it is unavailable: then it cancels."""
        first = self.query_one(f"#answer-{self.answers[0][1]}", Button)
        (self.query_one("#cancel", Button) if first.disabled else first).focus()

    @on(Button.Pressed, ".dialog-buttons Button")
    def _answered(self, event: Button.Pressed) -> None:
        button_id = str(event.button.id)
        if button_id.startswith("answer-"):
            self.dismiss(button_id.removeprefix("answer-"))


class PresetScreen(Dialog):
    """Pick a preset; the editor applies it as visible edits."""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog -wide"):
            yield Label("Apply a preset", classes="dialog-title")
            yield OptionList(*(Option(f"{p.name}\n  [dim]{p.help}[/dim]", id=p.name) for p in PRESETS))
            yield Label("enter applies · esc cancels · the edits show in the editor, unsaved",
                        classes="dialog-help")

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


@dataclass(frozen=True)
class KeyRow:
    """One binding as the keys dialog lists it."""

    key: str
    description: str
    where: str
    binding_id: str


class KeysScreen(Dialog):
    """Every key bound where the user is now: the app's, the screen's and the focused widget's."""

    BINDINGS = [Binding("f1,question_mark", "cancel", "Close", id="keys.close")]

    def __init__(self, rows: list[KeyRow]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog -wide -tall"):
            yield Label("Keys", classes="dialog-title")
            table: DataTable[str] = DataTable(cursor_type="row", zebra_stripes=True)
            table.add_columns("key", "does", "where", "binding id")
            for row in self.rows:
                table.add_row(row.key, row.description, row.where, row.binding_id)
            yield table
            yield Label("Single keys (1-6, ?) work outside text fields; while a value is being edited, enter "
                        "keeps it and esc puts it back. Remap a key by its binding id in the user config, "
                        'e.g. \\[keymap] "screen.models" = "f5".', classes="dialog-help")


class AddModelScreen(Dialog):
    """Ask for a model folder, a folder of models or a .gguf file to list (dismisses with the path)."""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Add models", classes="dialog-title")
            yield Label("A model folder (with config.json), a folder of model folders, or a .gguf file "
                        "(→ completes). It is remembered in the user config's model_dirs.", classes="dialog-help")
            yield Input(placeholder="~/models/my-model", suggester=PathSuggester(".gguf"), id="path")
            yield Label("", classes="dialog-problem")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Add", variant="primary", id="add")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#add")
    def _add(self) -> None:
        path = self.query_one("#path", Input).value.strip()
        if not path:
            self.query_one(".dialog-problem", Label).update("type the path of a model folder or a .gguf file")
            return
        self.dismiss(path)


class SpaceCheckbox(Checkbox, inherit_bindings=False):
    """A checkbox that space (or a click) ticks; enter is left to the dialog."""

    BINDINGS = [Binding("space", "toggle_button", "Toggle", show=False, id="dialog.tick")]


class ExportDialog(Dialog):
    """Export a run as GGUF: the quantization (a list), the output folder and whether the
    adapter is written as a GGUF LoRA too. Enter (on the list, in the field or on the
    checkbox) and ctrl+s export; dismisses with an :class:`~tunedeck.tui.exporting.ExportChoice`
    (``out`` None when the default folder is kept), or None."""

    BINDINGS = [Binding("ctrl+s,enter", "export", "Export", id="export.go")]

    def __init__(self, run_name: str, default_out: str, quant: str = "f16") -> None:
        super().__init__()
        self.run_name = run_name
        self.default_out = default_out
        self.quant = quant if quant in QUANT_NAMES else QUANT_NAMES[0]

    def compose(self) -> ComposeResult:
        width = max(len(name) for name in QUANT_NAMES) + 2
        with Vertical(classes="dialog"):
            yield Label(Content.assemble("Export ", (self.run_name, "bold"), " as GGUF"), classes="dialog-title")
            yield Label("Quantization (↑↓) of the file for llama.cpp, Ollama, LM Studio:", classes="dialog-help")
            yield OptionList(*(Option(Content.assemble((name.ljust(width), "bold"), (help_text, "$text-muted")),
                                      id=name) for name, help_text in EXPORT_QUANTS), id="export-quant")
            yield Label(K_QUANT_NOTE, classes="export-note", markup=False)
            yield Label("Output folder (→ completes):", classes="dialog-help")
            yield Input(self.default_out, suggester=PathSuggester(), id="export-out")
            yield SpaceCheckbox("also the adapter as a GGUF LoRA (space ticks)", id="export-lora")
            yield Label("", classes="dialog-problem")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Export", variant="primary", id="export")
                yield Button("Cancel", id="cancel")
            yield Label("enter or ctrl+s exports · esc cancels", classes="dialog-help")

    def on_mount(self) -> None:
        super().on_mount()
        quants = self.query_one("#export-quant", OptionList)
        quants.highlighted = QUANT_NAMES.index(self.quant)
        quants.focus()

    @on(OptionList.OptionSelected, "#export-quant")
    @on(Input.Submitted, "#export-out")
    @on(Button.Pressed, "#export")
    def action_export(self) -> None:
        quants = self.query_one("#export-quant", OptionList)
        option = quants.highlighted_option
        out = self.query_one("#export-out", Input).value.strip()
        if option is None or option.id is None:
            self._problem("pick a quantization")
            return
        if not out:
            self._problem(f"type the folder to write the GGUF files to (e.g. {self.default_out})")
            return
        self.dismiss(ExportChoice(quant=option.id, out=None if out == self.default_out else
                                  str(Path(os.path.expanduser(out)).absolute()),
                                  lora=self.query_one("#export-lora", Checkbox).value))

    def _problem(self, message: str) -> None:
        self.query_one(".dialog-problem", Label).update(message)


class HubPlanDialog(Dialog):
    """What downloading a Hub repo would fetch (``hub_plan``'s answer): the files, their size
    against the free space of the cache's disk, the pickle files left out, whether it is gated.
    Dismisses with "download", or None. Download is disabled when the disk is too small."""

    def __init__(self, plan: dict[str, object]) -> None:
        super().__init__()
        self.plan = plan

    def compose(self) -> ComposeResult:
        from ..widgets.hub_search import gated_text, hub_size

        plan = self.plan
        files = [f for f in plan.get("files", []) if isinstance(f, dict)]  # type: ignore[union-attr]
        total, cached, free = (int(plan.get(k) or 0) for k in ("total", "cached", "free"))  # type: ignore[call-overload]
        needed = max(total - cached, 0)
        skipped = [str(n) for n in plan.get("skipped", [])]  # type: ignore[union-attr]
        gated = gated_text(plan.get("gated"))
        with Vertical(classes="dialog"):
            yield Label(Content.assemble("Download ", (str(plan.get("repo", "?")), "bold"), " from the Hub"),
                        classes="dialog-title")
            revision = str(plan.get("revision") or "")
            got = f" ({hub_size(cached)} already in the cache)" if cached else ""
            yield Label(f"{len(files)} files, {hub_size(total)}{got} · revision {revision[:12]}",
                        classes="hub-plan-line", markup=False)
            short = needed > free
            space = Label(f"{hub_size(needed)} to fetch · {hub_size(free)} free on the cache's disk"
                          + (" · not enough space: free some, or set HF_HUB_CACHE to a bigger disk" if short else ""),
                          classes="hub-plan-line", markup=False)
            space.set_class(short, "-error")
            yield space
            table: DataTable[str] = DataTable(cursor_type="none", zebra_stripes=True, id="hub-plan-files")
            table.add_columns("file", "size")
            for entry in files:
                table.add_row(str(entry.get("name", "?")), hub_size(int(entry.get("size") or 0)))
            yield table
            if skipped:
                names = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
                yield Label(f"left out: {names} (pickle weights can run code when loaded; the safetensors are "
                            "fetched)", classes="hub-plan-line -warning", markup=False)
            if gated != "no":
                yield Label(f"gated ({gated}): accept its terms on the Hub page, then set HF_TOKEN or run "
                            "`hf auth login`", classes="hub-plan-line -warning", markup=False)
            else:
                yield Label("not gated", classes="hub-plan-line", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Download", variant="primary", id="hub-download", disabled=short)
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        super().on_mount()
        download = self.query_one("#hub-download", Button)
        (self.query_one("#cancel", Button) if download.disabled else download).focus()

    @on(Button.Pressed, "#hub-download")
    def _download(self) -> None:
        self.dismiss("download")
