"""The settings editor: every key of the project, grouped by section, validated as you
type with the CLI's validator, with presets and a live summary of what would train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.timer import Timer
from textual.widgets import OptionList
from textual.worker import Worker, get_current_worker

from tunedeck.core.errors import UserError
from tunedeck.core.resolve import Resolved, resolve
from tunedeck.core.schema import AUTO, FIELDS, field_for, toml_repr

from ..session import Session
from ..widgets.settings_list import FieldView, SettingsList, SettingsSearch
from ..widgets.summary import SettingsSummary
from .base import ProjectScreen

if TYPE_CHECKING:
    from ..widgets.field_editor import FieldEditor

# every sectioned key: [model], [quantization], [lora], [dataset], [training], [output]
EDITED_FIELDS = tuple(f for f in FIELDS if f.section)
# "auto" keys and the attribute of core.resolve.Resolved that makes them concrete
AUTO_RESOLVED = {
    "training.devices": "processes",
    "training.precision": "precision",
    "training.gradient_checkpointing": "gradient_checkpointing",
    "quantization.compute_dtype": "compute_dtype",
}
# what the summary shown depends on (counts, not memory); other edits keep the last answer
SUMMARY_KEYS = tuple(f.key for f in FIELDS if f.section in ("model", "lora"))
SUMMARY_DELAY_S = 0.3


def summary_key(session: Session) -> tuple[str, ...]:
    project = session.project
    return tuple(toml_repr(project.get(k)) for k in SUMMARY_KEYS) + (str(project.root),)


def source_text(session: Session, key: str, resolved: Resolved | None) -> str:
    """Where the value comes from: edited (unsaved) / project / default, and what "auto" means here."""
    text = "edited" if session.edited(key) else session.project.source_of(key)
    if key in AUTO_RESOLVED and session.project.get(key) == AUTO and resolved is not None:
        value = getattr(resolved, AUTO_RESOLVED[key])
        text += f", auto -> {toml_repr(value) if isinstance(value, bool) else value}"
    return text


def help_text(session: Session, key: str, resolved: Resolved | None) -> str:
    """The setting's one-line help; for a precision left at "auto", why auto chose what it chose."""
    if key == "training.precision" and session.project.get(key) == AUTO and resolved is not None:
        return f"auto chose {resolved.precision}: {resolved.precision_reason}"
    return field_for(key).help


def choices_of(key: str) -> list[tuple[str, Any]]:
    """(label, value) pairs for a setting picked from a list."""
    fld = field_for(key)
    if fld.kind == "auto_bool":
        return [(AUTO, AUTO), ("true", True), ("false", False)]
    return [(choice, choice) for choice in fld.choices]


class SettingsScreen(ProjectScreen):
    """Edit the project's settings."""

    MODE = "settings"
    AUTO_FOCUS = "SettingsList"
    BINDINGS = [
        Binding("slash", "search", "Search", id="settings.search",
                tooltip="Show only the settings whose key has a text; esc shows them all again"),
        Binding("escape", "clear_search", "Clear search", show=False, id="settings.clear_search"),
        Binding("f2", "presets", "Presets", id="settings.presets"),
        Binding("ctrl+r", "reset_field", "Default", id="settings.reset_field",
                tooltip="Set the default value (an edit, saved with ctrl+s); on a setting that already "
                        "has its default, remove its line from the file"),
    ]

    @dataclass
    class SummaryReady(Message):
        """The engine counted the LoRA parameters for the settings ``key``."""

        key: tuple[str, ...]
        result: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self._summaries: dict[tuple[str, ...], dict[str, Any]] = {}
        self._summary_key: tuple[str, ...] | None = None
        self._summary_timer: Timer | None = None
        self._before_edit: tuple[str, tuple[bool, Any]] | None = None

    def compose_body(self) -> ComposeResult:
        yield SettingsSearch(self._search_typed, id="settings-search")
        yield SettingsList(EDITED_FIELDS, self._views(self.session, *self._resolve(self.session)), id="settings")
        yield SettingsSummary(id="summary")  # the field editor is mounted above it on the first edit

    def on_mount(self) -> None:
        super().on_mount()
        self.watch(self.app, "revision", self._sync, init=False)
        self.watch(self.app, "hardware", self._sync, init=False)

    def project_shown(self) -> None:
        self._summary_key = None
        self._sync()

    @property
    def last_summary(self) -> dict[str, Any] | None:
        """The engine's latest answer for the settings shown, if any."""
        return self._summaries.get(summary_key(self.session))

    # -- keeping the list and the summary up to date --------------------------------

    def _views(self, session: Session, resolved: Resolved | None,
               problem: tuple[str, str] | None) -> dict[str, FieldView]:
        views = {}
        for fld in EDITED_FIELDS:
            key = fld.key
            invalid = session.invalid.get(key)
            warning = problem[1] if problem and problem[0] == key else self._warning(session, key)
            views[key] = FieldView(
                name=fld.name,
                value=invalid.text if invalid else session.shown(key),
                source=source_text(session, key, resolved),
                help=help_text(session, key, resolved),
                edited=session.edited(key) or session.line_changed(key) or invalid is not None,
                problem=invalid.reason if invalid else warning or "",
                severity="error" if invalid else "warning" if warning else "",
            )
        return views

    def _sync(self) -> None:
        session = self.app.session
        if session is None or not self.is_mounted:
            return
        resolved, problem = self._resolve(session)
        self.query_one(SettingsList).show(self._views(session, resolved, problem))
        editor = self._editor
        if editor is not None and editor.key is not None:
            invalid = session.invalid.get(editor.key)
            note = f"✗ {invalid.reason}" if invalid else help_text(session, editor.key, resolved)
            editor.note(note, error=invalid is not None)
            self.call_after_refresh(self.query_one(SettingsList).scroll_to_highlight)  # rows may have grown
        summary = self.query_one(SettingsSummary)
        summary.invalid = tuple(session.invalid)
        summary.command = session.train_command()
        self._request_summary(session)

    def _resolve(self, session: Session) -> tuple[Resolved | None, tuple[str, str] | None]:
        """"auto" made concrete for this machine, or the key it cannot work for and why."""
        hardware = self.app.hardware
        if hardware is None:
            return None, None
        try:
            return resolve(session.project, hardware), None
        except UserError as exc:
            key = getattr(exc, "key", "")
            return None, (key, f"on this machine: {exc.message.split(f'{key}: ', 1)[-1]}")

    @staticmethod
    def _warning(session: Session, key: str) -> str | None:
        """A valid value that will not work as it stands (a data file that is not there)."""
        if key not in ("dataset.path", "dataset.eval_split"):
            return None
        value = session.project.get(key)
        if not isinstance(value, str) or not value:
            return "no training data set yet" if key == "dataset.path" else None
        if not session.project.resolve_path(value).exists():
            return f"{value}: no such file (relative to the project file)"
        return None

    def _request_summary(self, session: Session) -> None:
        """Ask the engine for the LoRA summary when what it depends on changed (debounced)."""
        key = summary_key(session)
        if key == self._summary_key:
            return
        self._summary_key = key
        summary = self.query_one(SettingsSummary)
        if self._summary_timer is not None:
            self._summary_timer.stop()
        if key in self._summaries:
            summary.result, summary.error, summary.pending = self._summaries[key], "", False
            return
        summary.pending = True
        text, path = session.project.text(), str(session.path) if session.path else None
        self._summary_timer = self.set_timer(SUMMARY_DELAY_S, lambda: self._compute_summary(key, text, path))

    @work(thread=True, exclusive=True, group="summary", exit_on_error=False)
    def _compute_summary(self, key: tuple[str, ...], text: str, path: str | None) -> None:
        from tunedeck.core.engine import hardware_arg

        worker = get_current_worker()
        result = self.app.engine.lora_summary(project_text=text, project_path=path,
                                      hardware=hardware_arg(self.app.hardware), cancel=worker.cancelled_event)
        if not worker.is_cancelled:
            self.post_message(self.SummaryReady(key, result))

    @on(SummaryReady)
    def _summary_ready(self, event: SummaryReady) -> None:
        self._summaries[event.key] = event.result
        if event.key == self._summary_key:
            summary = self.query_one(SettingsSummary)
            summary.result, summary.error, summary.pending = event.result, "", False

    def work_failed(self, worker: Worker[object], message: str) -> None:
        if worker.group == "summary":
            summary = self.query_one(SettingsSummary)
            summary.error, summary.pending = message, False
        else:
            super().work_failed(worker, message)

    # -- searching ---------------------------------------------------------------------------

    def action_search(self) -> None:
        search = self.query_one(SettingsSearch)
        search.open()
        text = self.query_one(SettingsList).query_text
        search.count(len(self.query_one(SettingsList).matching(text)), len(EDITED_FIELDS), text)

    def _search_typed(self, text: str) -> None:
        """Every change of the search text, applied as it happens."""
        shown = self.query_one(SettingsList).filter(text)
        self.query_one(SettingsSearch).count(shown, len(EDITED_FIELDS), text)

    @on(SettingsSearch.Changed)
    def _search_changed(self, event: SettingsSearch.Changed) -> None:
        settings = self.query_one(SettingsList)
        if event.cleared:
            settings.filter("")
        settings.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "search":  # while a value is typed, / is part of it
            editor = self._editor
            return editor is None or editor.key is None
        if action == "clear_search":
            searches = self.query(SettingsSearch)
            return bool(searches) and (searches.first().is_open or bool(self.query_one(SettingsList).query_text))
        return super().check_action(action, parameters)

    def action_clear_search(self) -> None:
        self.query_one(SettingsSearch).action_clear()

    # -- editing -------------------------------------------------------------------------

    @on(OptionList.OptionSelected, "#settings")
    async def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            await self.edit_field(event.option.id)

    @property
    def _editor(self) -> FieldEditor | None:
        """The field editor, once the first edit has mounted it."""
        editors = self.query("#editor")
        return editors.first() if editors else None  # type: ignore[return-value]

    async def edit_field(self, key: str) -> None:
        """Edit setting ``key``: a switch flips, a choice opens a list, the rest a text field."""
        session, fld = self.session, field_for(key)
        value = session.project.get(key)
        if fld.kind == "bool":  # the highlight stays where the keys after this one moved it
            self.app.edit_setting(key, value=not value)
            return
        self.query_one(SettingsList).highlight(key)
        self._before_edit = (key, session.snapshot(key))
        editor = self._editor
        if editor is None:
            from ..widgets.field_editor import FieldEditor

            editor = FieldEditor(self._typed, id="editor")
            await self.mount(editor, before="#summary")
        self.refresh_bindings()
        if fld.kind in ("choice", "auto_bool"):
            editor.edit_choice(fld, choices_of(key), value)
        else:
            invalid = session.invalid.get(key)
            editor.edit_text(fld, invalid.text if invalid else session.shown(key))
        self._sync()

    def _typed(self, key: str, text: str) -> None:
        """Every change of the typed text, applied as it happens (in order, never behind later keys)."""
        self.app.edit_setting(key, text=text)

    def on_field_editor_chosen(self, event: FieldEditor.Chosen) -> None:
        self.app.edit_setting(event.key, value=event.value)

    def on_field_editor_closed(self, event: FieldEditor.Closed) -> None:
        before = self._before_edit
        if event.cancelled and before is not None and before[0] == event.key:
            self.app.restore_setting(event.key, before[1])
        self._before_edit = None
        if self._editor is not None:
            self._editor.close()
        self.refresh_bindings()
        settings = self.query_one(SettingsList)
        settings.highlight(event.key)
        settings.focus()

    def action_presets(self) -> None:
        from .dialogs import PresetScreen

        def chosen(name: object) -> None:
            if isinstance(name, str):
                self.apply_preset(name)

        self.app.push_screen(PresetScreen(), chosen)

    def apply_preset(self, name: str) -> None:
        """Apply preset ``name`` as edits the user sees (unsaved, marked "edited")."""
        from ..presets import PRESETS_BY_NAME

        preset = PRESETS_BY_NAME[name]
        if self._editor is not None and self._editor.key is not None:  # the preset may change what it shows
            self._editor.close()
            self._before_edit = None
        summary = self.last_summary
        edits = preset.edits(summary["attention_targets"] if summary else None)
        changed, refused = self.app.edit_settings(edits)
        if refused:
            key, reason = next(iter(refused.items()))
            self.notify(f"{name}: {key} refused: {reason}", severity="error", timeout=10)
        elif changed:
            shown = ", ".join(f"{k} = {toml_repr(edits[k])}" for k in changed)
            self.notify(f"{name}: {shown} (unsaved; ctrl+s saves)", title="Preset applied", timeout=8)
        else:
            self.notify(f"{name}: the settings already match", title="Preset")

    async def action_reset_field(self) -> None:
        """ctrl+r: set the default value, an edit like typing it (marked, shown as ``--set``,
        written on save). On a setting that already has its default, ctrl+r removes its line
        from the file instead, so the program's default applies."""
        editing = self._editor.key if self._editor is not None else None
        key = editing or self.query_one(SettingsList).highlighted_key
        if key is None or key.startswith("section:"):
            return
        session, fld = self.session, field_for(key)
        default = toml_repr(fld.default)
        if key in session.invalid or session.project.get(key) != fld.default:
            self.app.edit_setting(key, value=fld.default)
            if key in session.invalid:
                self.notify(f"{key}: the default {default} is refused: {session.invalid[key].reason}",
                            severity="error", timeout=10, markup=False)
            else:
                self.notify(f"{key} = {default}, the default (unsaved; ctrl+s saves; "
                            "ctrl+r again removes the line from the file)", title="Default", timeout=8, markup=False)
        elif session.project.source_of(key) == "project":
            self.app.reset_setting(key)
            self.notify(f"{key}: the line goes from the file on save; the default {default} applies",
                        title="Default", timeout=8, markup=False)
        else:
            self.notify(f"{key} is not in the file: the default {default} applies", title="Default", markup=False)
        if editing == key:  # show the default in the open editor
            await self.edit_field(key)
