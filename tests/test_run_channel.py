"""The run folder as the one truth, without training (fast; no torch): the fold, liveness,
the run's lock, the channel's authentication, and the creation of run folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tunedeck.core.channel import ChannelError, Client, Server, ensure_key, private_dir
from tunedeck.core.events import EventLog, event, read_events
from tunedeck.core.runs import (
    RECORD_FILE, RunLock, fold, liveness, read_record, record_death, run_info, write_record,
)
from tunedeck.tui.training import RunView


def ev(kind, step, t, **fields):
    return {"type": kind, "step": step, "time": t, **fields}


def write_events(run_dir: Path, events) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with EventLog(run_dir / "events.jsonl") as log:
        for e in events:
            log.write(e)
    return run_dir


def zombie() -> subprocess.Popen:
    """A child that has exited and is not reaped yet (the caller reaps it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    import psutil

    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return child


# -- the fold ----------------------------------------------------------------------------------


def test_one_fold_gives_the_status_of_every_session():
    events = [ev("launched", 0, 1.0), ev("run_started", 0, 2.0, max_steps=10), ev("step", 1, 3.0, loss=2.0),
              ev("system", 3, 4.0), ev("control", 3, 5.0, action="stop", message="stop taken")]
    state = fold(events)
    assert (state.status(None), state.step, state.max_steps) == ("stopping", 3, 10)  # a system event's step counts
    state.take(ev("finished", 3, 6.0, stopped=True, final_loss=1.5))
    assert state.status(None) == "stopped" and state.final_loss == 1.5
    state.take(ev("launched", 3, 10.0, resume=True))  # a resume: the earlier end no longer holds
    assert state.status(None) == "starting" and state.final is None
    state.take(ev("run_started", 3, 11.0, resumed_from={"step": 3}))
    state.take(ev("failed", 3, 12.0, reason="aborted at step 3", aborted=True))
    assert state.status(None) == "aborted" and state.duration_s == pytest.approx(5.0)  # 2..6 and 11..12
    assert fold([ev("launched", 0, 1.0), ev("failed", 0, 2.0, reason="x", died=True)]).status(None) == "died"


def test_the_runs_list_and_the_dashboard_agree_on_the_step(tmp_path):
    events = [ev("launched", 0, 1.0), ev("run_started", 0, 2.0, max_steps=20), ev("step", 5, 3.0, loss=2.0),
              ev("system", 7, 4.0), ev("checkpoint", 8, 5.0, path="c"), ev("finished", 8, 6.0, final_loss=1.0)]
    run_dir = write_events(tmp_path / "r", events)
    view = RunView("r", run_dir)
    view.fold(events, "finished")
    info = run_info(run_dir)
    numbers = dict(view.snapshot().numbers)
    assert info.step == view.step == 8 and numbers["step"].startswith("8 / 20")
    assert info.status == view.status == "finished"


def test_the_eta_counts_down_between_steps():
    view = RunView("r", Path("runs/r"))
    view.fold([ev("run_started", 0, 100.0, max_steps=10), ev("step", 1, 110.0, loss=1.0, eta_s=90.0),
               ev("step", 2, 120.0, loss=1.0, eta_s=80.0)], "running")
    assert dict(view.snapshot(now=120.0).numbers)["ETA"] == "1m20s"  # 8 steps of 10 s
    assert dict(view.snapshot(now=125.0).numbers)["ETA"] == "1m15s"  # five seconds later, not frozen
    assert dict(view.snapshot(now=500.0).numbers)["ETA"] == "0s"
    view.fold([], "stopped")
    assert dict(view.snapshot(now=500.0).numbers)["ETA"] == "-"


def test_the_machine_panel_stops_when_the_trainer_ends():
    view = RunView("r", Path("runs/r"))
    view.fold([ev("system", 1, 1.0, cpu_percent=100.0, ram_used=2**30, ram_total=2**33, rss=2**30, gpus=[])],
              "running")
    assert dict(view.snapshot().system)["CPU busy"] == "100%"
    view.fold([ev("failed", 1, 2.0, reason="aborted at step 1", aborted=True)], "aborted")
    system = dict(view.snapshot().system)
    assert "CPU busy" not in system and system["trainer"] == "ended: no live readings"
    assert dict(view.snapshot().numbers)["status"] == "aborted"


# -- liveness ------------------------------------------------------------------------------------


def test_a_zombie_is_dead_and_its_end_is_written_once(tmp_path):
    run_dir = write_events(tmp_path / "z", [ev("launched", 0, 1.0), ev("run_started", 0, 2.0, max_steps=5),
                                           ev("step", 2, 3.0, loss=1.0)])
    child = zombie()
    try:
        write_record(run_dir, child.pid)
        assert liveness(run_dir).dead and run_info(run_dir).status == "died"
        written = record_death(run_dir)
        assert written is not None and written["died"] is True and written["step"] == 2
        assert record_death(run_dir) is None  # ended already: nothing more
        assert [e["type"] for e in read_events(run_dir / "events.jsonl")].count("failed") == 1
    finally:
        child.wait()


def test_a_reused_pid_is_not_the_trainer(tmp_path):
    run_dir = write_events(tmp_path / "r", [ev("launched", 0, 1.0)])
    write_record(run_dir)  # this process ...
    assert liveness(run_dir).alive and run_info(run_dir).status == "starting"
    record = read_record(run_dir)
    (run_dir / RECORD_FILE).write_text(json.dumps({**record, "start": record["start"] - 1000}))
    assert liveness(run_dir).dead  # ... but started at another time: another process with the same pid


def test_a_run_on_another_host_is_unknown_never_died(tmp_path):
    run_dir = write_events(tmp_path / "r", [ev("launched", 0, 1.0), ev("run_started", 0, 2.0)])
    (run_dir / RECORD_FILE).write_text('{"pid": 999999, "start": 1.0, "host": "gpu-box-7"}')
    info = run_info(run_dir)
    assert (info.status, info.note, info.host) == ("unknown", "on gpu-box-7", "gpu-box-7")
    assert record_death(run_dir) is None and len(read_events(run_dir / "events.jsonl")) == 2


def test_nothing_writes_the_end_of_a_run_whose_lock_is_held(tmp_path):
    run_dir = write_events(tmp_path / "r", [ev("launched", 0, 1.0)])
    child = zombie()
    child.wait()
    write_record(run_dir, child.pid)  # a dead pid ...
    with RunLock(run_dir) as lock:  # ... but someone (a launcher starting the next trainer) holds the run
        assert lock.acquire()
        assert record_death(run_dir) is None
    assert record_death(run_dir) is not None


def test_the_run_lock_is_held_by_one_process_and_dies_with_it(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    code = textwrap.dedent(f"""
        import sys, time
        from tunedeck.core.runs import RunLock
        lock = RunLock({str(run_dir)!r})
        assert lock.acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = RunLock(run_dir)
        assert not lock.acquire(wait=0.2)
        holder.kill()  # however it ends, the kernel lets go of the lock
        holder.wait()
        assert lock.acquire()
        lock.release()
    finally:
        holder.kill()


# -- the channel ------------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    """A run folder with a live channel (this process plays the trainer)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = EventLog(run_dir / "events.jsonl")
    taken: list[str] = []

    def on_control(action: str) -> tuple[bool, str]:
        taken.append(action)
        return action != "abort", f"{action} taken"

    server = Server(run_dir, log, on_control)
    write_record(run_dir, address=server.address)
    yield run_dir, server, taken
    server.close()
    log.close()


def test_a_follower_gets_the_history_position_then_every_event_live(served):
    run_dir, server, taken = served
    server.emit(event("run_started", 0))
    client = Client.connect(run_dir)
    try:
        assert client.offset == (run_dir / "events.jsonl").stat().st_size  # the file up to here, then live
        for step in (1, 2, 3):
            server.emit(event("step", step, loss=1.0))
        frames = []
        deadline = time.monotonic() + 5
        while len(frames) < 3 and time.monotonic() < deadline:
            frames += client.events(0.2)
        assert [f["event"]["step"] for f in frames] == [1, 2, 3]
        assert frames[0]["at"] == client.offset and frames[-1]["end"] == (run_dir / "events.jsonl").stat().st_size
        assert client.control("stop") == {"ack": 1, "taken": True, "message": "stop taken"}
        assert client.control("abort")["taken"] is False and taken == ["stop", "abort"]
    finally:
        client.close()


def test_the_channel_refuses_a_follower_without_the_key(served, tmp_path):
    run_dir, server, _ = served
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    ensure_key(impostor)  # another key
    (private_dir(run_dir) / "key").rename(private_dir(run_dir) / "key.real")
    shutil.copy(private_dir(impostor) / "key", private_dir(run_dir) / "key")
    with pytest.raises(ChannelError, match="key"):
        Client.connect(run_dir)
    # and raw bytes instead of the handshake: the trainer closes the connection, nothing is unpickled
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(server.address)
    sock.recv(64)
    sock.sendall(b"\x80\x04\x95" + b"x" * 61)  # a pickle's opening bytes
    assert sock.recv(64) == b""
    sock.close()


def test_the_key_and_socket_are_the_owners_alone(served):
    run_dir, server, _ = served
    assert (private_dir(run_dir).stat().st_mode & 0o777) == 0o700
    assert ((private_dir(run_dir) / "key").stat().st_mode & 0o777) == 0o600
    assert (os.stat(server.address).st_mode & 0o077) == 0


OTHER_USER = textwrap.dedent("""
    import os, socket, sys
    address, key_path = sys.argv[1], sys.argv[2]
    try:
        open(key_path, "rb").read()
        print("key read")
    except PermissionError:
        print("key refused")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(address)
        greeting = sock.recv(64)
        print("greeted" if greeting else "refused")
    except PermissionError:
        print("connect refused")
    except OSError as exc:
        print("refused", exc)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another user needs root")
def test_another_users_process_is_refused(tmp_path):
    """On a shared box: another user cannot read the key nor reach the socket; and even with
    both opened up to everyone, the trainer refuses a peer that is not its own user."""
    shared = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(shared, 0o755)
        run_dir = shared / "run"
        run_dir.mkdir()
        log = EventLog(run_dir / "events.jsonl")
        server = Server(run_dir, log, lambda action: (True, ""))
        script = shared / "other.py"
        script.write_text(OTHER_USER)
        os.chmod(script, 0o644)

        def as_nobody(*args: str) -> list[str]:
            def drop() -> None:
                os.setgid(65534)
                os.setuid(65534)

            out = subprocess.run(["/usr/bin/python3", str(script), *args], capture_output=True, text=True,
                                 timeout=30, preexec_fn=drop, cwd="/")
            return out.stdout.split("\n")

        key = str(private_dir(run_dir) / "key")
        assert as_nobody(server.address, key)[:2] == ["key refused", "connect refused"]
        os.chmod(private_dir(run_dir), 0o755)
        os.chmod(server.address, 0o777)
        os.chmod(key, 0o644)
        lines = as_nobody(server.address, key)
        assert lines[0] == "key read" and lines[1].startswith("refused")  # refused by its uid, before a greeting
        with pytest.raises(ChannelError, match="readable by other users"):
            Client.connect(run_dir)  # and its owner does not use a key others could have read
        server.close()
        log.close()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_follower_that_stops_reading_is_dropped_not_queued_for(served, monkeypatch):
    from tunedeck.core import channel

    monkeypatch.setattr(channel, "FOLLOWER_QUEUE", 50)
    run_dir, server, _ = served
    client = Client.connect(run_dir, keep=10)  # keeps at most 10 events for a reader that never comes
    for step in range(2000):
        server.emit(event("step", step, loss=1.0))
    assert client.closed.wait(10)  # it let go instead of growing
    deadline = time.monotonic() + 5
    while server._followers and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server._followers  # and the trainer dropped it
    client.close()


# -- run folders --------------------------------------------------------------------------------------


def test_two_new_runs_with_the_same_name_race_and_one_wins(tmp_path):
    from tunedeck.core.errors import UserError
    from tunedeck.core.rundir import prepare_run
    from tui_helpers import write_project

    project = write_project(tmp_path)
    results: list[object] = []
    barrier = threading.Barrier(4)

    def make() -> None:
        barrier.wait()
        try:
            results.append(prepare_run(project, [], run_name="same", deep=False))
        except UserError as exc:
            results.append(exc)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(made) == 1 and len(refused) == 3
    assert all("already exists" in str(e) for e in refused)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["same"]  # no half-made folder left
    made[0].release()


def test_a_run_name_with_a_line_break_is_refused(tmp_path):
    from tunedeck.core.errors import UserError
    from tunedeck.core.rundir import prepare_run
    from tui_helpers import write_project

    project = write_project(tmp_path)
    for name in ("ok\n", "a/b", ".hidden", "x y"):
        with pytest.raises(UserError, match="--run-name"):
            prepare_run(project, [], run_name=name, deep=False)
    with pytest.raises(UserError, match="training.accelerate_config: .*nope.yaml is not a file"):
        prepare_run(project, ["training.accelerate_config=nope.yaml"], deep=False)
    assert not (tmp_path / "runs").exists()


def test_the_launcher_side_imports_nothing_heavy_and_the_trainer_starts_light():
    code = ("import sys; import tunedeck.core.launcher, tunedeck.core.channel, tunedeck.core.trainer; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'multiprocessing') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    code = "import sys, tunedeck.core.launcher; sys.exit('tunedeck.core.trainer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0  # no launcher/trainer cycle


def test_the_hub_is_offline_before_any_library_reads_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "DO_NOT_TRACK"))}
    code = ("import tunedeck.core.trainer, os; import huggingface_hub.constants as c; "
            "print(c.HF_HUB_OFFLINE, c.HF_HUB_DISABLE_TELEMETRY)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.split() == ["True", "True"], out.stderr
    env["HF_HUB_OFFLINE"] = "0"  # asked for by the user: kept
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.split()[0] == "False"


def test_sigterm_at_rank_0_says_which_rank_failed(tmp_path, monkeypatch):
    from tunedeck.core.trainer import _terminated_reason

    monkeypatch.setenv("WORLD_SIZE", "4")
    private = tmp_path / ".trainer"
    private.mkdir()
    assert _terminated_reason(tmp_path)[0] == "terminated"  # nobody else failed: stopped from outside
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for rank in (1, 2, 3):
        (private / f"rank-{rank}.json").write_text(json.dumps({"pid": dead.pid if rank > 1 else os.getpid()}))
    (private / "rank-2.error").write_text('{"reason": "rank 2 was terminated", "failure": "terminated"}')
    (private / "rank-3.error").write_text('{"reason": "out of GPU memory at step 4", "failure": "out_of_memory"}')
    assert _terminated_reason(tmp_path) == ("out_of_memory", "rank 3 failed: out of GPU memory at step 4")
    (private / "rank-3.error").unlink()  # gone without a report: killed
    failure, reason = _terminated_reason(tmp_path)
    assert failure == "died" and reason.startswith(f"rank 3 (pid {dead.pid}) ended without a report")


def test_failures_are_named_in_words(tmp_path):
    import errno
    from types import SimpleNamespace

    from tunedeck.core.trainer import failure_of

    spec = SimpleNamespace(run_dir=str(tmp_path), project_path="p.toml")
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("could not save the checkpoint") from exc
    except RuntimeError as wrapped:
        kind, reason = failure_of(wrapped, spec, 7)
    assert kind == "disk_full" and "the disk is full" in reason and "step 7" in reason and "start the run again" in reason
    kind, reason = failure_of(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), spec, 3)
    assert kind == "out_of_memory" and "GPU memory" in reason and "batch_size" in reason
    assert failure_of(MemoryError(), spec, 1)[0] == "out_of_memory"
    assert failure_of(ValueError("bad\nsecond"), spec, 1) == ("crash", "ValueError: bad")


def test_a_trainer_started_by_tunedeck_ignores_the_terminals_hangup_and_ctrl_c():
    from tunedeck.core.trainer import install_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        install_signals(started_by_tunedeck=True)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_devices_become_processes_and_the_launch_command():
    from tunedeck.core.errors import ProjectError
    from tunedeck.core.hardware import Gpu, Hardware
    from tunedeck.core.launcher import trainer_command, trainer_env
    from tunedeck.core.rundir import RunSpec
    from tunedeck.core.project import Project
    from tunedeck.core.resolve import resolve

    gpus = Hardware(gpus=tuple(Gpu(i, "H100", 80 * 2**30, (9, 0)) for i in (0, 1, 2, 3)), cpu_count=32)
    cpu = Hardware(gpus=(), cpu_count=2)

    def resolved(devices, hw):
        project = Project.from_text(f"schema = 1\n[training]\ndevices = {devices}\nbatch_size = 2\ngrad_accum = 3\n")
        return resolve(project, hw)

    assert (resolved('"auto"', gpus).processes, resolved('"auto"', gpus).gpus) == (4, ("0", "1", "2", "3"))
    assert resolved("2", gpus).gpus == ("0", "1") and resolved("[1, 3]", gpus).gpus == ("1", "3")
    assert resolved("[1, 3]", gpus).effective_batch == 2 * 3 * 2
    assert (resolved('"auto"', cpu).processes, resolved("3", cpu).processes, resolved("3", cpu).gpus) == (1, 3, None)
    for devices, hw, line in (("5", gpus, "5 GPUs asked for, 4 visible"), ("[0, 7]", gpus, "GPU 7 is not visible"),
                              ("[0]", cpu, "names GPUs, but this machine has none")):
        with pytest.raises(ProjectError, match=line):
            resolved(devices, hw)
    with pytest.raises(ProjectError, match="training.devices"):
        Project.from_text("schema = 1\n[training]\ndevices = [0, 0]\n")

    spec = RunSpec(run_dir="/r/x", name="x", resume=False, project_path="/p.toml", processes=2, gpus=("1", "3"))
    command = trainer_command(spec, python="py")
    assert command[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert command[command.index("-m", 2) + 1] == "tunedeck.core.trainer" and "--run-dir" in command
    assert RunSpec.from_dict(json.loads(command[command.index("--launch") + 1])) == spec
    env = trainer_env(spec, base={})
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    fsdp = RunSpec(run_dir="/r/x", name="x", resume=False, project_path="/p.toml", processes=4,
                   accelerate_config="/p/fsdp.yaml")
    command = trainer_command(fsdp, python="py")
    assert command[:7] == ["py", "-m", "accelerate.commands.launch", "--config_file", "/p/fsdp.yaml",
                           "--num_processes", "4"]
    assert trainer_command(RunSpec(run_dir="/r/x", name="x", resume=False, project_path="/p"), python="py")[:3] == [
        "py", "-m", "tunedeck.core.trainer"]
