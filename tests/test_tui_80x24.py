"""Every screen and every dialog at 80x24, the smallest terminal a user brings: snapshots
of each (update with --snapshot-update after reviewing the SVGs), and the checks behind
them: each dialog's fields, lists and buttons lie inside the terminal and the dialog, the
footer's keys are whole and do not run under the palette key."""

from __future__ import annotations

import pytest
from test_tui_snapshots import keys_then_settle, make_app  # noqa: F401 - a fixture
from textual.widgets import Input
from textual.widgets._footer import FooterKey
from tui_helpers import settle

from tunedeck.core.paths import save_user_config
from tunedeck.tui.screens.dialogs import Dialog

SIZE = (80, 24)


async def _dirty_then_quit(pilot) -> None:
    await settle(pilot)
    pilot.app.session.edit_value("lora.r", 32)
    await pilot.press("ctrl+q")
    await settle(pilot)


SCREENS = {"models": "1", "modules": "2", "dataset": "3", "settings": "4", "train": "5", "chat": "6"}
DIALOGS = {
    "open": keys_then_settle("ctrl+o"),
    "new": keys_then_settle("ctrl+n"),
    "presets": keys_then_settle("4", "f2"),
    "keys": keys_then_settle("f1"),
    "add-model": keys_then_settle("1", "a"),
    "generation": keys_then_settle("6", "ctrl+g"),
    "unsaved-changes": _dirty_then_quit,
}


FOOTER_CHECKED = {"dataset", "settings", "train", "chat"}  # the screens with the most keys


def assert_footer_keys_are_whole(app) -> None:
    """The footer's keys are whole and do not run under the palette key; f1 is among them."""
    keys = list(app.screen.query(FooterKey))
    palette = [k for k in keys if k.has_class("-command-palette")]
    shown = [k for k in keys if not k.has_class("-command-palette")]
    assert palette and shown
    assert any(k.action == "keys" for k in shown)  # f1: every key, whatever the footer leaves out
    for key in shown:
        assert key.region.right <= palette[0].region.x, (key.description, key.region, palette[0].region)
        assert key.region.width >= len(key.description)


@pytest.mark.parametrize("name", list(SCREENS))
def test_screen_80x24(name, make_app, snap_compare):
    """The screen's snapshot; on the screens with the most keys, the footer's keys are whole
    too (checked on the same app, before the snapshot is compared)."""
    async def run_before(pilot) -> None:
        await keys_then_settle(SCREENS[name])(pilot)
        if name in FOOTER_CHECKED:
            assert_footer_keys_are_whole(pilot.app)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_start_screen_80x24(make_app, snap_compare):
    save_user_config({"recent_projects": ["/projects/python-qa/demo.toml", "/projects/old/run.toml"]})
    assert snap_compare(make_app(project=False), terminal_size=SIZE)


def test_new_project_from_the_start_screen_80x24(make_app, snap_compare):
    assert snap_compare(make_app(project=False), terminal_size=SIZE, run_before=keys_then_settle("ctrl+n"))


def _inside(inner, outer) -> bool:
    return (inner.x >= outer.x and inner.y >= outer.y and inner.right <= outer.right
            and inner.bottom <= outer.bottom and inner.width > 0 and inner.height > 0)


def assert_every_control_is_on_screen(name, app) -> None:
    """The open dialog's box lies inside the terminal, and each of its shown controls inside the box."""
    dialog = app.screen
    assert isinstance(dialog, Dialog), f"{name}: no dialog open but {dialog!r}"
    box = dialog.query_one(".dialog")
    assert _inside(box.region, dialog.region), (name, box.region)
    controls = [w for w in dialog.query("*") if w.can_focus]
    assert controls
    for widget in controls:
        if widget.display:
            assert _inside(widget.region, box.content_region), (name, widget, widget.region, box.content_region)


@pytest.mark.parametrize("name", list(DIALOGS))
def test_dialog_80x24(name, make_app, snap_compare):
    """The dialog's snapshot, and every field, list and button of it lies inside the terminal
    and the dialog (checked on the same app, before the snapshot is compared)."""
    async def run_before(pilot) -> None:
        await DIALOGS[name](pilot)
        assert_every_control_is_on_screen(name, pilot.app)
        for field in pilot.app.screen.query(Input):
            field.cursor_blink = False  # a blinking cursor would make the picture depend on the time
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)
