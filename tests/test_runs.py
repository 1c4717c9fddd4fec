"""Events on disk and run status, without training (fast; no torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunedeck.core.events import EventLog, EventReader, event, read_events, system_fields
from tunedeck.core.runs import death_reason, list_runs, run_info, write_record


def test_events_are_flat_json_lines_with_type_time_and_step(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.write(event("step", 3, loss=float("nan"), grad_norm=float("inf"), learning_rate=1e-4, path=tmp_path))
        # readable while the file is still open: each event is flushed as written
        assert read_events(path)[0]["step"] == 3
    ev = read_events(path)[0]
    assert ev["type"] == "step" and isinstance(ev["time"], float)
    assert ev["loss"] is None and ev["grad_norm"] is None  # JSON has no NaN
    assert ev["path"] == str(tmp_path)
    with pytest.raises(ValueError):
        event("progress", 1)


def test_a_reader_follows_a_file_and_skips_a_half_written_line(tmp_path):
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.read_new() == []  # no file yet
    with EventLog(path) as log:
        log.write(event("run_started", 0))
        assert [e["type"] for e in reader.read_new()] == ["run_started"]
        with open(path, "a", encoding="utf-8") as fh:
            fh.write('{"type": "step", "step": 1')  # the writer is mid-line
        assert reader.read_new() == []
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(', "time": 1.0}\n')
        assert [e["step"] for e in reader.read_new()] == [1]


def test_system_fields_say_not_available_without_a_gpu():
    fields = system_fields(None, None)
    assert fields["gpu_memory_used"] is None and fields["gpu_utilization"] is None
    assert fields["rss"] > 0 and fields["ram_total"] >= fields["ram_used"] > 0


def test_system_fields_read_every_visible_gpu_and_the_other_processes(monkeypatch):
    from nvml_stand_in import GiB, Card, forget, use

    from tunedeck.tui.training import RunView

    cards = [Card("H100", "GPU-0", 80 * GiB, used=10 * GiB, util=90, temp=60, procs=[(os.getpid(), 8 * GiB)]),
             Card("H100", "GPU-1", 80 * GiB, used=40 * GiB, util=91, temp=61,
                  procs=[(os.getpid(), 8 * GiB), (1, 28 * GiB)])]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    use(monkeypatch, cards)
    try:
        fields = system_fields(1, 9 * 2**30)
        assert (fields["gpu_memory_used"], fields["gpu_memory_total"]) == (40 * 2**30, 80 * 2**30)
        assert (fields["gpu_utilization"], fields["gpu_temperature"], fields["gpu_memory_others"]) == (
            91, 61, 28 * 2**30)
        assert [g["index"] for g in fields["gpus"]] == [0, 1] and fields["gpus"][0]["gpu_memory_others"] == 0
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
        use(monkeypatch, cards)
        fields = system_fields(0, None)  # CUDA's device 0 is NVML's 1 here
        assert fields["gpu_memory_used"] == 40 * 2**30 and [g["index"] for g in fields["gpus"]] == [1]
    finally:
        forget()

    view = RunView("r", Path("runs/r"))
    view.fold([{"type": "system", "step": 3, **system_fields(None, None), "gpus": [
        {"index": 0, "gpu_memory_used": 10 * 2**30, "gpu_memory_total": 80 * 2**30, "gpu_utilization": 90,
         "gpu_temperature": 60},
        {"index": 1, "gpu_memory_used": 40 * 2**30, "gpu_memory_total": 80 * 2**30}],
        "gpu_memory_used": 10 * 2**30, "gpu_memory_total": 80 * 2**30, "gpu_memory_others": 0,
        "gpu_utilization": 90, "gpu_temperature": 60, "torch_peak_memory": 9 * 2**30}], "running")
    rows = dict(view.snapshot().system)
    assert rows["GPU 0"] == "10.0/80 GiB 90% 60°C" and rows["GPU 1"] == "40.0/80 GiB"
    assert rows["GPU memory"] == "10.0 GiB / 80.0 GiB (12%)" and rows["torch peak"] == "9.0 GiB"
    assert rows["other processes"] == "0.0 GiB" and rows["temperature"] == "60 °C"


def write_run(folder, events, pid: int | None = None):
    folder.mkdir(parents=True)
    with EventLog(folder / "events.jsonl") as log:
        for ev in events:
            log.write(ev)
    if pid is not None:
        write_record(folder, pid)
    return folder


def ev(kind, step, t, **fields):
    return {"type": kind, "step": step, "time": t, **fields}


def test_status_steps_loss_and_duration_of_runs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a-finished", [
        ev("run_started", 0, 100.0, max_steps=4), ev("step", 2, 110.0, loss=2.0),
        ev("finished", 2, 120.0, stopped=True, final_loss=1.5),
        ev("run_started", 2, 200.0, max_steps=4, resumed_from={"step": 2}), ev("step", 4, 205.0, loss=1.0),
        ev("eval", 4, 206.0, eval_loss=1.2), ev("finished", 4, 210.0, stopped=False, final_loss=1.0),
    ])
    write_run(runs / "b-failed", [ev("failed", 0, 300.0, reason="dataset.path: x has no rows", user_error=True)])
    write_run(runs / "c-running", [ev("run_started", 0, 400.0, max_steps=10), ev("step", 1, 401.0, loss=3.0)],
              pid=os.getpid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_run(runs / "d-died", [ev("run_started", 0, 500.0, max_steps=10), ev("step", 3, 530.0, loss=2.5)],
              pid=dead.pid)
    (runs / "not-a-run").mkdir()

    infos = {i.name: i for i in list_runs(runs)}
    assert list(infos) == ["b-failed", "a-finished", "c-running", "d-died"]  # by first start
    a = infos["a-finished"]
    assert (a.status, a.step, a.max_steps, a.final_loss, a.eval_loss, a.note) == ("finished", 4, 4, 1.0, 1.2, "")
    assert run_info(runs / "a-finished").status == "finished"
    assert a.duration_s == pytest.approx(30.0)  # two sessions: 20 s + 10 s
    assert infos["b-failed"].status == "failed" and "has no rows" in infos["b-failed"].note
    assert infos["c-running"].status == "running" and infos["c-running"].step == 1
    d = infos["d-died"]
    assert d.status == "died" and d.step == 3 and d.duration_s == pytest.approx(30.0)


def test_a_watchdog_death_record_reads_as_died(tmp_path):
    folder = write_run(tmp_path / "r", [ev("run_started", 0, 1.0), ev("step", 5, 2.0, loss=1.0),
                                        ev("failed", 5, 3.0, died=True, exit_code=-9, reason="killed")])
    assert run_info(folder).status == "died"


def test_death_reasons_name_the_signal_or_the_exit_code(tmp_path):
    failure, reason = death_reason(tmp_path, -9, oom_before=None)
    assert failure == "died" and "killed by SIGKILL (exit code -9)" in reason and "out-of-memory" in reason
    assert "killed by SIGSEGV" in death_reason(tmp_path, -11)[1]
    assert "exited with code 3" in death_reason(tmp_path, 3)[1] and "trainer.log" in death_reason(tmp_path, 3)[1]


def test_a_sigkill_while_the_oom_killer_ran_is_called_out_of_memory(tmp_path, monkeypatch):
    from tunedeck.core import runs

    monkeypatch.setattr(runs, "oom_kills", lambda: 8)
    failure, reason = death_reason(tmp_path, -9, oom_before=7)
    assert failure == "oom_killed" and "out-of-memory killer" in reason and "ran out of RAM" in reason
    assert death_reason(tmp_path, -9, oom_before=8)[0] == "died"  # the count did not move


@pytest.mark.slow
def test_cli_runs_lists_a_folder(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "x", [ev("run_started", 0, 1.0, max_steps=2), ev("step", 2, 2.0, loss=0.5),
                           ev("finished", 2, 3.0, final_loss=0.5)])
    out = subprocess.run([sys.executable, "-m", "tunedeck.core", "runs", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (info,) = json.loads(out.stdout)
    assert info["name"] == "x" and info["status"] == "finished" and info["final_loss"] == 0.5
    table = subprocess.run([sys.executable, "-m", "tunedeck.core", "runs", str(runs)], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "COLUMNS": "120"})
    assert table.returncode == 0 and "finished" in table.stdout and "2/2" in table.stdout
    missing = subprocess.run([sys.executable, "-m", "tunedeck.core", "runs", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such project file or runs folder" in missing.stderr


def test_the_parent_side_imports_no_torch():
    code = ("import sys; import tunedeck.core.launcher, tunedeck.core.runs, tunedeck.core.events, "
            "tunedeck.core.render, tunedeck.core.commands.train, tunedeck.core.commands.runs; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_attach_text_follows_a_hand_made_run_folder(tmp_path, monkeypatch, capsys):
    from tunedeck.core import cli

    monkeypatch.chdir(tmp_path)
    run_dir = write_run(tmp_path / "runs" / "old", [
        event("run_started", 0, max_steps=4), event("step", 2, loss=1.5), event("warning", 2, message="careful"),
        event("finished", 4, final_loss=1.25, adapter="runs/old/adapter", stopped=False)])
    assert cli.main(["attach", "old", "--text"]) == 0  # a name in ./runs; not a terminal: text
    err = capsys.readouterr().err
    assert "warning: careful" in err and "finished at step 4: loss 1.2500" in err
    assert cli.main(["attach", str(run_dir), "--stop"]) == 2
    assert "old has ended (finished); nothing to stop" in capsys.readouterr().err


def test_the_dashboard_shows_the_recorded_estimate_next_to_the_measured_peak():
    from tunedeck.tui.training import RunView

    view = RunView("r", Path("runs/r"))
    view.fold([{"type": "run_started", "step": 0, "max_steps": 4, "memory_estimate": {"total": 3 * 2**30}},
               {"type": "system", "step": 1, "rss": 2 * 2**30, "rss_peak": int(3.5 * 2**30)}], "running")
    assert dict(view.snapshot().system)["memory"] == "estimated 3.00 GiB · measured peak 3.50 GiB"
    view.fold([{"type": "finished", "step": 4, "final_loss": 1.0}], "finished")
    assert dict(view.snapshot().system)["memory"] == "estimated 3.00 GiB · measured peak 3.50 GiB"
    bare = RunView("r", Path("runs/r"))  # an older run with neither: no line
    bare.fold([{"type": "run_started", "step": 0, "max_steps": 4}], "running")
    assert "memory" not in dict(bare.snapshot().system)
