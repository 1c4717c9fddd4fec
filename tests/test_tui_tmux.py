"""The app in a real terminal, the way a user over SSH sees it: tmux, keys, the screen's text."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tui_helpers import write_project

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]

TUNEDECK = str(Path(sys.executable).with_name("tunedeck"))


class Tmux:
    """One detached 100x30 tmux session on a private server."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True,
                              text=True).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "app")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "app", *keys)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never showed; the screen:\n{self.screen()}")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "-L", self.socket, "has-session", "-t", "app"],
                              capture_output=True).returncode == 0


@pytest.fixture
def tmux(tmp_path):
    session = Tmux(f"tunedeck-test-{os.getpid()}")
    yield session
    subprocess.run(["tmux", "-L", session.socket, "kill-server"], capture_output=True)


def test_start_switch_edit_save_quit(tmp_path, tmux):
    project = write_project(tmp_path)
    env = {"TUNEDECK_CONFIG_DIR": str(tmp_path / "config"), "TUNEDECK_CACHE_DIR": str(tmp_path / "cache"),
           "TERM": "xterm-256color"}
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    tmux.run("new-session", "-d", "-s", "app", "-x", "100", "-y", "30", "-c", str(tmp_path), *env_args,
             f"env -u COLUMNS -u LINES {TUNEDECK} demo.toml")  # the pane's own size, not the caller's
    tmux.wait_for("4 Settings")
    screen = tmux.wait_for("demo — demo.toml")  # the title, once the project is shown
    assert "─" * 100 in screen  # drawn at 100 columns (the summary's top border)
    assert "target_modules" not in screen  # top of the list
    tmux.keys("1")
    tmux.wait_for("(● the project's)")
    tmux.wait_for("LlamaForCausalLM (llama)")  # the model's config, read in a worker
    tmux.keys("2")
    tmux.wait_for("LlamaForCausalLM: 16 layers LoRA can wrap", timeout=120)  # the engine process started
    tmux.wait_for("16,384 trainable")
    tmux.keys("3")
    tmux.wait_for("row 1 (#1, messages)")  # detected; this model has no tokenizer, which is said in one line
    tmux.wait_for("cannot load its")
    tmux.keys("4")
    tmux.wait_for("4 Settings")
    tmux.keys(*["Down"] * 9, "Enter")  # model.source ... lora.r
    tmux.wait_for("lora.r  enter keeps")
    tmux.keys("0")
    tmux.wait_for("0 is not valid: expected an integer >= 1 and <= 4096")
    tmux.keys("BSpace")  # alone: Textual may run a burst's backspace after the next character
    tmux.wait_for('"" is not valid')
    tmux.keys("8", "Enter")
    screen = tmux.wait_for("--set lora.r=8")
    assert "demo * — demo.toml" in screen
    tmux.keys("C-s")
    tmux.wait_for("saved demo.toml")
    tmux.keys("C-q")
    deadline = time.monotonic() + 15
    while tmux.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tmux.alive()
    text = project.read_text()
    assert "\nr = 8\n" in text and "# a model folder next to this file" in text


def test_a_run_outlives_its_terminal_and_the_dashboard_reattaches_and_stops_it(tmp_path, tmux, tiny_model_dir):
    """Start from the Train screen, kill the terminal (SIGHUP to the app), then
    `tunedeck attach` opens the dashboard on the run that went on, and x stops it."""
    from train_support import write_project as write_training_project

    from tunedeck.core.events import read_events
    from tunedeck.core.runs import trainer_pid

    write_training_project(tmp_path, tiny_model_dir, training={"max_steps": 100000, "logging_steps": 1})
    env = {"TERM": "xterm-256color", "TUNEDECK_CONFIG_DIR": str(tmp_path / "config")}
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    project = next(tmp_path.glob("*.toml"))
    tmux.run("new-session", "-d", "-s", "app", "-x", "120", "-y", "40", "-c", str(tmp_path), *env_args,
             f"env -u COLUMNS -u LINES {TUNEDECK} {project.name}")
    tmux.wait_for("4 Settings")
    tmux.keys("5")
    tmux.wait_for("no run followed")
    tmux.keys("s")
    tmux.wait_for("RUNNING", timeout=120)
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    pid = trainer_pid(run_dir)
    assert pid is not None
    tmux.run("kill-server")  # the terminal goes away: SIGHUP
    time.sleep(2)
    assert trainer_pid(run_dir) == pid  # it goes on
    steps_before = sum(e["type"] == "step" for e in read_events(run_dir / "events.jsonl"))
    tmux.run("new-session", "-d", "-s", "app", "-x", "120", "-y", "40", "-c", str(tmp_path), *env_args,
             f"env -u COLUMNS -u LINES {TUNEDECK} attach runs/{run_dir.name}; sleep 60")
    screen = tmux.wait_for("RUNNING", timeout=60)
    assert f"run {run_dir.name}" in screen
    tmux.wait_for("checkpoint")  # the control keys are shown: the run is controllable from here
    tmux.keys("x")
    tmux.wait_for("STOPPED EARLY", timeout=120)
    events = read_events(run_dir / "events.jsonl")
    assert events[-1]["type"] == "finished" and events[-1]["stopped"] is True
    assert sum(e["type"] == "step" for e in events) > steps_before  # it trained while nobody watched
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
