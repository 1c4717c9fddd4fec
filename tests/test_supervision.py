"""Runs you can trust, with real trainer processes: killed under a parent that never reaps,
resumed twice at once, a control from an earlier session, two processes stopped, saved
and aborted together, the network never touched, and a disk that fills up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tunedeck.core.events import read_events
from tunedeck.core.launcher import attach, start_run
from tunedeck.core.runs import checkpoint_steps, run_info, trainer_pid

from train_support import of_type, wait_events, write_project

pytestmark = pytest.mark.slow

TUNEDECK = str(Path(sys.executable).parent / "tunedeck")


def tunedeck(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TUNEDECK, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**(env or os.environ), "COLUMNS": "200"})


def wait_until(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def steps_in(run_dir: Path) -> list[int]:
    return [e["step"] for e in read_events(run_dir / "events.jsonl") if e["type"] == "step"]


SUBREAPER = textwrap.dedent("""
    # Adopts the orphans of the command it runs (PR_SET_CHILD_SUBREAPER) and never reaps them.
    import ctypes, subprocess, sys, time
    assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    done = subprocess.run(sys.argv[1:])
    print("started", done.returncode, flush=True)
    time.sleep(3600)
""")


def test_a_killed_trainer_under_a_parent_that_never_reaps_is_died_within_a_second(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 100000})
    script = tmp_path / "subreaper.py"
    script.write_text(SUBREAPER)
    reaper = subprocess.Popen([sys.executable, str(script), TUNEDECK, "train", str(project), "--run-name", "z",
                               "--detach"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert reaper.stdout.readline().split() == ["started", "0"]
        run_dir = tmp_path / "runs" / "z"
        wait_until(lambda: steps_in(run_dir), what="a step")
        pid = trainer_pid(run_dir)
        assert psutil.Process(pid).ppid() == reaper.pid  # adopted by a parent that never reaps
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: run_info(run_dir).status == "died", timeout=5)
        assert time.monotonic() - killed < 1.0
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # still unreaped: a zombie is dead
        listed = json.loads(tunedeck("runs", str(project), "--json", cwd=tmp_path).stdout)
        assert [r["status"] for r in listed] == ["died"]
        followed = tunedeck("attach", str(run_dir), "--text", cwd=tmp_path, timeout=60)
        assert followed.returncode == 1 and "gone without a final event" in followed.stderr
        last = read_events(run_dir / "events.jsonl")[-1]
        assert last["type"] == "failed" and last["died"] is True  # written once, by a certain observer
    finally:
        reaper.kill()
        reaper.wait()


def test_one_trainer_per_run_two_resumes_at_once(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 2, "save_steps": 1})
    assert tunedeck("train", str(project), "--run-name", "r", cwd=tmp_path).returncode == 0
    more = ["--resume", "--run-name", "r", "--set", "training.max_steps=100000"]
    both = [subprocess.Popen([TUNEDECK, "train", str(project), *more], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(2)]
    run_dir = tmp_path / "runs" / "r"
    try:
        refused = None
        deadline = time.monotonic() + 180
        while refused is None and time.monotonic() < deadline:
            refused = next((p for p in both if p.poll() is not None), None)
            time.sleep(0.1)
        assert refused is not None, "both resumes were accepted"
        _, err = refused.communicate()
        assert refused.returncode == 2 and "is being trained by another trainer" in err and "Traceback" not in err
        assert err.count("\n") == 1
        winner = next(p for p in both if p is not refused)
        wait_until(lambda: max(steps_in(run_dir)) > 2, what="the resumed run training")
        assert winner.poll() is None
        launched = [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "launched"]
        assert len(launched) == 2  # the first run and one resume: the refused one began no session
        os.killpg(winner.pid, signal.SIGINT)  # Ctrl-C: stop with a checkpoint
        _, err = winner.communicate(timeout=120)
        assert winner.returncode == 0, err
    finally:
        for p in both:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert run_info(run_dir).status == "stopped"


def test_a_control_of_an_earlier_session_never_reaches_a_resume(tiny_model_dir, tmp_path):
    """Ctrl-C twice in a row: stop, then abort before the step ended. The resume trains on."""
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 100000, "save_steps": 1})
    handle = start_run(project, run_name="twice")
    wait_events(handle, lambda e: e["type"] == "checkpoint")
    handle.stop()
    try:
        handle.abort()
    except Exception:  # noqa: BLE001 - the stop may have ended it first
        pass
    assert handle.wait(60) in ("aborted", "stopped")
    saved = checkpoint_steps(handle.run_dir)[-1]
    resumed = start_run(project, [f"training.max_steps={saved + 3}"], run_name="twice", resume=True)
    assert resumed.wait(180) == "finished", resumed.final
    assert resumed.final["stopped"] is False and resumed.final["step"] == saved + 3


@pytest.fixture
def audit_dir(tmp_path) -> Path:
    """A sitecustomize that records every connection to a non-loopback address and every
    name lookup of a host that is not this machine, in every Python process started with it."""
    folder = tmp_path / "audit"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, socket, sys
        LOG = {str(folder / "violations.log")!r}
        LOCAL = {{None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}}

        def _hook(event, args):
            if event == "socket.connect":
                sock, address = args
                if isinstance(address, tuple) and address and str(address[0]) not in LOCAL \\
                        and not str(address[0]).startswith("127."):
                    _record(event, address)
            elif event == "socket.getaddrinfo":
                host = args[0]
                if isinstance(host, bytes):
                    host = host.decode()
                if host not in LOCAL and not str(host).startswith("127.") and host != socket.gethostname():
                    _record(event, host)

        def _record(event, what):
            with open(LOG, "a") as fh:
                fh.write(f"{{os.getpid()}} {{event}} {{what!r}}\\n")
            raise OSError("network use refused by the test")

        sys.addaudithook(_hook)
    """))
    return folder


def clean_env(audit: Path) -> dict[str, str]:
    """This machine's environment without the offline settings (tunedeck must set them) and
    without CI (which trl's telemetry skips)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "TRANSFORMERS_", "DO_NOT_TRACK")) and k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(audit), env.get("PYTHONPATH")) if p)
    return env


def test_training_never_opens_a_network_connection(tiny_model_dir, tmp_path, audit_dir):
    env = clean_env(audit_dir)
    violations = audit_dir / "violations.log"
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('203.0.113.7', 443), 1)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "203.0.113.7" in violations.read_text()  # the audit can fail
    violations.unlink()
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 2})
    done = tunedeck("train", str(project), "--run-name", "offline", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    # the trainer program started by hand, too (it reads its environment before importing anything)
    by_hand = subprocess.run([sys.executable, "-m", "tunedeck.core.trainer", str(project), "--run-name", "by-hand"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert by_hand.returncode == 0, by_hand.stderr[-2000:]
    assert not violations.exists(), violations.read_text()


def run_processes(handle) -> list[psutil.Process]:
    """The trainer's launcher (torchrun) and every process under it."""
    root = psutil.Process(handle._process.pid)
    return [root, *root.children(recursive=True)]


def test_two_processes_from_tunedeck_train_stop_save_and_abort_together(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 100000, "batch_size": 2, "devices": 2})
    handle = start_run(project, run_name="ddp")
    assert handle.spec.processes == 2
    started = wait_events(handle, lambda e: e["type"] == "step" and e["step"] >= 2, timeout=240)
    assert of_type(started, "run_started")[0]["world_size"] == 2
    procs = run_processes(handle)
    ranks = [p for p in procs if "tunedeck.core.trainer" in " ".join(p.cmdline()) and p.pid != handle._process.pid]
    assert len(ranks) == 2
    assert "save taken" in handle.save_now()
    saved = wait_events(handle, lambda e: e["type"] == "checkpoint")[-1]["step"]
    assert "stop taken" in handle.stop()
    assert handle.wait(120) == "stopped", handle.final
    assert handle.exit_code == 0  # torchrun: every rank ended cleanly
    stopped_at = handle.final["step"]
    assert checkpoint_steps(handle.run_dir) == [saved, stopped_at] and stopped_at > saved
    assert (handle.run_dir / "adapter" / "adapter_model.safetensors").is_file()

    second = start_run(project, run_name="ddp-abort")
    wait_events(second, lambda e: e["type"] == "step", timeout=240)
    procs = run_processes(second)
    assert len(procs) >= 3
    assert "abort taken" in second.abort()
    assert second.wait(60) == "aborted"
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes of the aborted run still alive: {alive}"
    assert second.final["aborted"] is True and not (second.run_dir / "adapter").exists()
    assert run_info(second.run_dir).status == "aborted"


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs, where the machine allows mounting one."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_disk_that_fills_up_mid_run_is_the_reason(tiny_model_dir, tmp_path, small_disk):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 500, "save_steps": 1},
                            output={"runs_dir": str(small_disk / "runs")})
    done = tunedeck("train", str(project), "--run-name", "full", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "the disk is full" in done.stderr and "Traceback" not in done.stderr
    info = json.loads(tunedeck("runs", str(project), "--json", cwd=tmp_path).stdout)[0]
    assert info["status"] == "failed" and "the disk is full" in info["note"] and "--resume" in info["note"]
    final = read_events(small_disk / "runs" / "full" / "events.jsonl")[-1]
    assert final["failure"] == "disk_full"
    # a disk that is full before the run: one line, and nothing is left to block the name
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    refused = tunedeck("train", str(project), "--run-name", "next", cwd=tmp_path)
    assert refused.returncode == 2 and "the disk is full" in refused.stderr and refused.stderr.count("\n") == 1
    assert sorted(p.name for p in (small_disk / "runs").iterdir()) == ["full"]
    filler.unlink()
    again = tunedeck("train", str(project), "--run-name", "next", "--set", "training.max_steps=1", cwd=tmp_path)
    assert again.returncode in (0, 1), again.stderr  # the name was not blocked
    assert (small_disk / "runs" / "next" / "events.jsonl").is_file()


def test_attach_follows_a_run_started_elsewhere_live_through_its_channel(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 100000})
    handle = start_run(project, run_name="live")
    wait_events(handle, lambda e: e["type"] == "step")
    follower = attach(handle.run_dir)
    history = follower.events(0)
    assert history[0]["type"] == "launched" and follower._client is not None  # live, not polling the file
    seen = {e["step"] for e in history if e["type"] == "step"}
    wait_events(follower, lambda e: e["type"] == "step" and e["step"] >= max(seen) + 2)
    steps = [e["step"] for e in read_events(handle.run_dir / "events.jsonl") if e["type"] == "step"]
    assert steps == sorted(set(steps))
    follower.detach()
    handle.abort()
    assert handle.wait(60) == "aborted"


def test_a_rank_that_dies_ends_the_run_with_its_reason(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 100000, "batch_size": 2, "devices": 2})
    handle = start_run(project, run_name="rank-dies")
    wait_events(handle, lambda e: e["type"] == "step", timeout=240)
    procs = run_processes(handle)
    rank1 = json.loads((handle.run_dir / ".trainer" / "rank-1.json").read_text())["pid"]
    os.kill(rank1, signal.SIGKILL)  # e.g. the out-of-memory killer, on one rank
    assert handle.wait(60) == "failed", handle.final
    assert handle.final["reason"].startswith(f"rank 1 (pid {rank1}) ended without a report")
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    info = run_info(handle.run_dir)
    assert info.status == "failed" and "rank 1" in info.note
