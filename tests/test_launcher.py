"""The trainer as its own process: the watchdog, stop / resume, abort, `tunedeck train`, two processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunedeck.core.launcher import start_run
from tunedeck.core.runs import checkpoint_steps, run_info

from train_support import of_type, wait_events as wait_for, write_project

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def drain(handle, timeout: float = 120.0) -> list[dict]:
    assert handle.wait(timeout) in ("finished", "stopped", "aborted", "failed", "died")
    return handle.events(0)


def test_a_killed_trainer_is_reported_as_died_within_a_second(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 1000})
    handle = start_run(project, run_name="killed")
    wait_for(handle, lambda e: e["type"] == "step")
    assert handle.status == "running"
    assert run_info(handle.run_dir).status == "running"
    os.kill(handle.pid, signal.SIGKILL)
    killed = time.monotonic()
    failed = wait_for(handle, lambda e: e["type"] == "failed", timeout=5)[-1]
    assert time.monotonic() - killed < 1.0
    assert failed["died"] is True and failed["exit_code"] == -9 and "SIGKILL" in failed["reason"]
    assert handle.wait(5) == "died" and handle.status == "died"
    on_disk = json.loads((handle.run_dir / "events.jsonl").read_text().splitlines()[-1])
    assert on_disk["died"] is True and on_disk["exit_code"] == -9
    info = run_info(handle.run_dir)
    assert info.status == "died" and info.step >= 1


def test_stop_saves_a_checkpoint_and_resume_goes_on_from_its_step(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 1000})
    handle = start_run(project, run_name="stopped")
    wait_for(handle, lambda e: e["type"] == "step" and e["step"] >= 2)
    assert "stop taken" in handle.stop()  # returns once the trainer has taken it
    wait_for(handle, lambda e: e["type"] == "control" and e["action"] == "stop")
    assert handle.status == "stopping"
    events = drain(handle)
    final = handle.final
    assert handle.status == "stopped" and final["stopped"] is True and handle.exit_code == 0
    stopped_at = final["step"]
    assert checkpoint_steps(handle.run_dir) == [stopped_at]
    assert of_type(events, "checkpoint")[-1]["step"] == stopped_at
    assert (handle.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert run_info(handle.run_dir).status == "stopped"

    resumed = start_run(project, [f"training.max_steps={stopped_at + 2}"], run_name="stopped", resume=True)
    events = drain(resumed)
    assert resumed.status == "finished", resumed.final
    assert of_type(events, "launched")[-1]["resume"] is True
    started = of_type(events, "run_started")[-1]
    assert started["resumed_from"]["step"] == stopped_at and started["step"] == stopped_at
    assert [e["step"] for e in of_type(events, "step") if e["step"] > stopped_at] == [stopped_at + 1, stopped_at + 2]
    assert resumed.final["step"] == stopped_at + 2 and not resumed.final["stopped"]
    info = run_info(resumed.run_dir)
    assert info.status == "finished" and info.step == stopped_at + 2 and info.max_steps == stopped_at + 2


def test_abort_ends_at_once_and_saves_nothing(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 1000, "save_steps": 1})
    handle = start_run(project, run_name="aborted")
    wait_for(handle, lambda e: e["type"] == "checkpoint")
    saved = checkpoint_steps(handle.run_dir)
    handle.abort()
    drain(handle, timeout=30)
    assert handle.status == "aborted" and handle.final["aborted"] is True and handle.exit_code == 130
    assert checkpoint_steps(handle.run_dir)[: len(saved)] == saved
    assert not (handle.run_dir / "adapter").exists()
    info = run_info(handle.run_dir)
    assert info.status == "aborted" and "aborted at step" in info.note


def tunedeck(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "tunedeck"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "120"})


def test_cli_train_exit_codes(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 2})
    done = tunedeck("train", str(project), "--run-name", "ok", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "finished at step 2" in done.stderr and "Traceback" not in done.stderr
    # refused by the pre-flight (the targets against the model's layers): exit 2, one line, nothing created
    bad = tunedeck("train", str(project), "--set", 'lora.target_modules=["nope"]', cwd=tmp_path)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("tunedeck: error:")]
    assert len(errors) == 1 and "matches no layer of this model" in errors[0] and "q_proj" in errors[0]
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    # refused before starting: exit 2, and no run folder
    again = tunedeck("train", str(project), "--run-name", "ok", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    listed = tunedeck("runs", str(project), "--json", cwd=tmp_path)
    runs = {r["name"]: r for r in json.loads(listed.stdout)}
    assert runs["ok"]["status"] == "finished" and runs["ok"]["step"] == 2
    assert list(runs) == ["ok"] and [p.name for p in (tmp_path / "runs").iterdir()] == ["ok"]


def test_ctrl_c_stops_with_a_checkpoint(tiny_model_dir, tmp_path):
    """SIGINT reaches the whole process group, as from a terminal: the CLI stops the run, the
    trainer (which ignores SIGINT) saves and ends cleanly."""
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 1000})
    proc = subprocess.Popen([str(VENV_BIN / "tunedeck"), "train", str(project), "--run-name", "ctrl-c"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as from a terminal, even when the test runner itself runs in the background
                            # (where SIGINT is inherited as ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    events_file = tmp_path / "runs" / "ctrl-c" / "events.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if events_file.exists() and '"type": "step"' in events_file.read_text():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopping at the end of this step" in stderr and "stopped at step" in stderr
    info = run_info(tmp_path / "runs" / "ctrl-c")
    assert info.status == "stopped" and info.checkpoints == [info.step]
    assert f"tunedeck train {project} --resume --run-name ctrl-c" in stderr  # the real project, not a placeholder


def test_two_processes_on_the_cpu_give_an_adapter(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 2, "batch_size": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "tunedeck.core.trainer",
         str(project), "--run-name", "ddp"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert of_type(events, "run_started")[0]["world_size"] == 2
    assert len(of_type(events, "run_started")) == 1  # rank 0 reports, rank 1 is silent
    assert events[-1]["type"] == "finished"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "step 2/2" in proc.stdout


def test_the_real_default_model_trains_a_few_steps(default_model_dir, tmp_path):
    sample = Path(__file__).resolve().parent.parent / "sample_data" / "python_qa.jsonl"
    shutil.copy(sample, tmp_path / "qa.jsonl")
    project = write_project(tmp_path, "default", rows=[], dataset={"path": "qa.jsonl", "max_length": 64},
                            lora={"r": 8, "alpha": 16, "dropout": 0.05},
                            training={"max_steps": 2, "batch_size": 2, "learning_rate": 2e-4})
    handle = start_run(project, run_name="smol")
    events = drain(handle, timeout=600)
    assert handle.status == "finished", handle.final
    started = of_type(events, "run_started")[0]
    assert started["total_params"] > 100_000_000  # SmolLM2-135M
    losses = [e["loss"] for e in of_type(events, "step")]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)  # a trained model, not a random one
    assert (handle.run_dir / "adapter" / "adapter_model.safetensors").is_file()
