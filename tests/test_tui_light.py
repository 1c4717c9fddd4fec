"""The UI process stays light: with every screen shown, the models listed with their memory
estimates, the engine answering and a layer group picked on the Modules screen, none of
torch, transformers, peft, trl, datasets, bitsandbytes or accelerate is imported in it.

Run in a fresh process, so that what other tests imported does not count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from tui_helpers import write_project

pytestmark = pytest.mark.slow

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from tunedeck.core.project import Project
    from tunedeck.tui.app import TunedeckApp

    HEAVY = {heavy!r}

    async def main(path):
        app = TunedeckApp(Project.load(path))  # the real engine process, started on first need
        async with app.run_test(size=(100, 30)) as pilot:
            for key in "123564":
                await pilot.press(key)
                await pilot.pause(0.2)
            await pilot.press("f1", "escape", "ctrl+p", "escape", "f2", "escape")
            summary = app.screen.query_one("SettingsSummary")
            for _ in range(900):
                if not summary.pending:
                    break
                await pilot.pause(0.2)
            await pilot.press("1")  # the Models screen: headers and estimates, in this process
            models = app.screen
            for _ in range(600):
                if models._infos and not any(w.is_running for w in app.workers if w.group in ("list", "estimate")):
                    break
                await pilot.pause(0.1)
            await pilot.press("2")  # the Modules screen: the engine reads the layers, then a toggle
            choice = app.screen.query_one("ChoiceSummary")
            for _ in range(900):
                if choice.result or app.screen.query_one("#modules-status").has_class("-error"):
                    break
                await pilot.pause(0.2)
            await pilot.press("space")  # the first group (embed_tokens) on
            for _ in range(300):
                if choice.result and "embed_tokens" in choice.result["adapted"]:
                    break
                await pilot.pause(0.1)
            found = {{
                "trainable": summary.result and summary.result["trainable_params"],
                "summary_error": summary.error,
                "models": [info.source for info in models._infos],
                "estimated": len(models._estimates),
                "groups": list(choice.result["adapted"]) if choice.result else [],
                "targets": app.session.project["lora.target_modules"],
                "engine_pid": app.engine.pid,
                "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY),
            }}
        print(json.dumps(found))

    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1]))
""").format(heavy=HEAVY)


def test_no_heavy_library_in_the_ui_process(tmp_path):
    project = write_project(tmp_path / "project")
    script = tmp_path / "light.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {**os.environ, "TUNEDECK_CONFIG_DIR": str(tmp_path / "config"), "TUNEDECK_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script), str(project)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["heavy"] == []
    assert found["summary_error"] == "" and found["trainable"] == 16384  # the engine did the counting
    assert str(project.parent / "tiny-llama") in found["models"] and found["estimated"] >= 2  # default too
    assert found["groups"][:2] == ["embed_tokens", "q_proj"] and found["engine_pid"]
    assert found["targets"][0] == "embed_tokens"  # the pick, written to the project
