"""Runs that outlive the process that started them: --detach, the terminal going away,
attach (history, then live, then controls), and statuses when the trainer is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunedeck.core.events import read_events
from tunedeck.core.launcher import attach
from tunedeck.core.runs import checkpoint_steps, run_info, trainer_pid

from train_support import write_project

pytestmark = pytest.mark.slow

TUNEDECK = str(Path(sys.executable).parent / "tunedeck")


def tunedeck(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([TUNEDECK, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "120"})


def statuses(project: Path, cwd: Path) -> dict[str, dict]:
    listed = tunedeck("runs", str(project), "--json", cwd=cwd)
    assert listed.returncode == 0, listed.stderr
    return {r["name"]: r for r in json.loads(listed.stdout)}


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def has_step(run_dir: Path) -> bool:
    return any(e["type"] == "step" for e in read_events(run_dir / "events.jsonl"))


def test_detach_returns_and_attach_stops_the_run(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 100000})
    started = tunedeck("train", str(project), "--run-name", "bg", "--detach", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    run_dir = tmp_path / "runs" / "bg"
    assert "tunedeck attach" in started.stderr and str(run_dir) in started.stderr
    assert statuses(project, tmp_path)["bg"]["status"] == "running"
    pid = trainer_pid(run_dir)
    assert pid is not None and os.getsid(pid) == pid  # its own session
    wait_until(lambda: has_step(run_dir))
    # attach from Python: history first, then the run still going
    handle = attach("bg", runs_dir=tmp_path / "runs")
    history = handle.events(0)
    assert [e["type"] for e in history[:2]] == ["launched", "run_started"]
    assert handle.status == "running" and not handle.ended
    # stop from the command line: it returns once the trainer has taken the request, and
    # --wait follows the run to its end
    stopped = tunedeck("attach", str(run_dir), "--stop", "--wait", cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert "stop taken" in stopped.stderr and "stopped at step" in stopped.stderr and "Traceback" not in stopped.stderr
    assert f"tunedeck train {project} --resume --run-name bg" in stopped.stderr
    info = statuses(project, tmp_path)["bg"]
    assert info["status"] == "stopped"
    assert checkpoint_steps(run_dir) == [info["step"]] and (run_dir / "adapter" / "adapter_config.json").is_file()
    assert handle.wait(30) == "stopped" and handle.final["stopped"] is True


def test_the_run_survives_its_terminal_hanging_up_and_is_reattached(tiny_model_dir, tmp_path):
    """`tunedeck train` in the foreground of a terminal that goes away (SIGHUP to its process
    group, as sshd does): the CLI dies, the trainer goes on; attach follows it and stops it."""
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 100000})
    ui = subprocess.Popen([TUNEDECK, "train", str(project), "--run-name", "hup"], cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = tmp_path / "runs" / "hup"
    wait_until(lambda: run_dir.is_dir() and has_step(run_dir))
    os.killpg(ui.pid, signal.SIGHUP)
    assert ui.wait(30) == -signal.SIGHUP
    time.sleep(1.0)
    assert run_info(run_dir).status == "running"
    steps_then = run_info(run_dir).step
    wait_until(lambda: run_info(run_dir).step > steps_then)  # still training, nobody reading
    handle = attach(run_dir)
    assert handle.status == "running"
    assert "save taken" in handle.save_now() and "stop taken" in handle.stop()
    assert handle.wait(120) == "stopped", handle.final
    assert handle.final["stopped"] is True and run_info(run_dir).status == "stopped"
    types = [e["type"] for e in read_events(run_dir / "events.jsonl")]
    assert types.count("checkpoint") >= 1 and types[-1] == "finished"


def test_a_killed_detached_trainer_reads_as_died(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 100000})
    assert tunedeck("train", str(project), "--run-name", "k", "--detach", cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "runs" / "k"
    wait_until(lambda: has_step(run_dir))
    os.kill(trainer_pid(run_dir), signal.SIGKILL)
    wait_until(lambda: trainer_pid(run_dir) is None, timeout=10)
    assert statuses(project, tmp_path)["k"]["status"] == "died"
    followed = tunedeck("attach", "k", cwd=tmp_path)  # a name in ./runs
    assert followed.returncode == 1 and "gone without a final event" in followed.stderr
    last = read_events(run_dir / "events.jsonl")[-1]
    assert last["type"] == "failed" and last["died"] is True
    assert statuses(project, tmp_path)["k"]["status"] == "died"
    # controls refuse a run that is not going, in one line
    refused = tunedeck("attach", str(run_dir), "--stop", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("tunedeck: error:") and "Traceback" not in refused.stderr
    missing = tunedeck("attach", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "no such run folder" in missing.stderr
