"""The command palette's tunedeck commands (ctrl+p): projects, screens, presets, themes, training,
merging and exporting runs."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

from tunedeck.core.runs import FINISHED_STATUS

from .exporting import export_refusal
from .presets import PRESETS
from .widgets.mode_tabs import SCREENS

if TYPE_CHECKING:
    from .app import TunedeckApp

Command = tuple[str, str, Callable[[], object]]


class ListedCommands(Provider):
    """A palette provider whose commands are a list of (name, help, callback), made afresh
    each time the palette asks (:meth:`commands`)."""

    def commands(self) -> list[Command]:
        raise NotImplementedError

    async def discover(self) -> Hits:
        for name, help_text, callback in self.commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, callback in self.commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)


class TunedeckCommands(ListedCommands):
    """Commands for what the app can do now (some need an open project)."""

    def commands(self) -> list[Command]:
        app: TunedeckApp = self.app  # type: ignore[assignment]
        found: list[Command] = [
            ("Open project…", "Open a project file (ctrl+o)", app.action_open),
            ("New project…", "Write a starter project file and open it (ctrl+n)", app.action_new),
        ]
        if app.session is not None:
            found.append(("Save project", "Write the edits to the project file (ctrl+s)", app.action_save))
            found += [(f"Screen: {title}", f"Switch to the {title} screen ({number})",
                       partial(app.action_switch_screen, mode))
                      for number, (mode, title) in enumerate(SCREENS, 1)]
            found += [(f"Preset: {p.name}", p.help, partial(app.apply_preset, p.name)) for p in PRESETS]
            if app.training:
                found += [("Stop training", "Save a checkpoint and the adapter at the end of this step, then end "
                           "the run (x on the Train screen)", app.action_stop_training),
                          ("Save a checkpoint now", "At the end of this step; training goes on (c on the Train "
                           "screen)", app.action_save_checkpoint),
                          ("Abort training", "End the run at once, saving nothing (asks first; A on the Train "
                           "screen)", app.action_abort_training)]
            else:
                found.append(("Start training", "Train the settings shown (unsaved edits included) in a "
                              "background process", app.action_start_training))
            runs = _runs(app)
            found += [(f"Merge run: {run.name}", f"Merge its adapter into the base model: a standalone model "
                       f"folder in runs/{run.name}/merged", partial(app.merge_run, run.path))
                      for run in runs if run.status == FINISHED_STATUS and run.adapter]
            found += [(f"Export run: {run.name}", f"As GGUF for llama.cpp, Ollama, LM Studio: pick the quantization "
                       f"and the folder (runs/{run.name}/gguf; e on the Train screen's list)",
                       partial(app.export_dialog, run))
                      for run in runs if export_refusal(run) is None]
        if app.exporting is not None:
            found.append(("Cancel export", f"Stop exporting {app.exporting}; nothing half-written is left",
                          app.cancel_export))
        found += [(f"Theme: {name}", "Switch to this colour theme (remembered)", partial(app.set_theme, name))
                  for name in app.tunedeck_themes]
        found.append(("Keys", "Show every key binding (f1 or ?)", app.action_keys))
        return found


def _runs(app: TunedeckApp) -> list:
    """The open project's runs (newest first)."""
    from tunedeck.core.runs import list_runs

    project = app.session.project  # type: ignore[union-attr]
    return list(reversed(list_runs(project.resolve_path(project["output.runs_dir"]))))
