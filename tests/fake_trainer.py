"""A scripted trainer for UI tests: ``python fake_trainer.py RUN_DIR SCRIPT.jsonl``.

It behaves like the real one seen from outside, with the real parts of the trainer
process (the run's lock and record, the channel that followers connect to, the emitter,
the controls, SIGUSR1 for abort) but its events come from a script, one JSON object per
line:

- an event (``{"type": "step", "step": 3, "loss": 1.2}``): written with the time added;
- ``{"sleep": 0.5}``: wait;
- ``{"wait_for_control": true}``: wait until stop (a checkpoint and a ``finished`` event
  with ``stopped``) or abort; save writes a checkpoint event and goes on waiting;
- ``{"crash": "RuntimeError: boom"}``: a ``failed`` event with a traceback, exit code 1;
- ``{"kill": true}``: SIGKILL itself, with no final event (the UI must say "died").

``python fake_trainer.py --launched RUN_DIR SCRIPT.jsonl`` plays the trainer as the launcher
starts it (a test puts it in :func:`tunedeck.core.launcher.trainer_command`): the run folder
is made, its session begun and its lock held by the launcher, and inherited.

tests/test_fake_trainer.py holds it to the real trainer: its events, fields, exit codes and
calls into tunedeck.core.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from tunedeck.core.channel import Server
from tunedeck.core.events import EventLog, append_event, event
from tunedeck.core.runs import EXIT_ABORTED, EXIT_FAILED, EXIT_OK, RunLock, write_record
from tunedeck.core.trainer import Aborted, Controls, Emitter, install_signals


def main(run_dir: Path, script: Path, launched: bool = False) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    if not launched:  # the launcher holds the lock (inherited) and has begun the session
        assert lock.acquire(), "another trainer holds this run"
    install_signals(started_by_tunedeck=True)
    if not launched:
        append_event(run_dir / "events.jsonl", event("launched", resume=False, processes=1))
    log = EventLog(run_dir / "events.jsonl")
    emit = Emitter(log)
    emit.health.observe = lambda ev: []  # the script says which alarms come
    controls = Controls(emit)
    server = Server(run_dir, log, controls.take)
    emit.server = server
    write_record(run_dir, address=server.address)
    from tunedeck.core import trainer

    trainer._SESSION["emit"] = emit
    try:
        return play(run_dir, script, emit, controls)
    except Aborted:
        emit("failed", reason=f"aborted at step {emit.step}; nothing more saved", failure="aborted", traceback=None,
             user_error=False, aborted=True)
        return EXIT_ABORTED
    finally:
        server.close()
        log.close()


def play(run_dir: Path, script: Path, emit: Emitter, controls: Controls) -> int:
    for line in script.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if "sleep" in item:
            time.sleep(item["sleep"])
        elif "wait_for_control" in item:
            while True:
                checkpoint = run_dir / "checkpoints" / f"checkpoint-{emit.step}"
                if controls.stop.is_set():
                    checkpoint.mkdir(parents=True, exist_ok=True)
                    emit("checkpoint", path=str(checkpoint))
                    emit("finished", adapter=str(run_dir / "adapter"), run_dir=str(run_dir), final_loss=None,
                         stopped=True)
                    return EXIT_OK
                if controls.save.is_set():
                    controls.save.clear()
                    emit("checkpoint", path=str(checkpoint))
                time.sleep(0.05)
        elif "crash" in item:
            emit("failed", reason=item["crash"], failure="crash", user_error=False,
                 traceback="Traceback (most recent call last):\n  File \"train.py\", line 1, in <module>\n"
                           f"    trainer.train()\n{item['crash']}\n")
            return EXIT_FAILED
        elif "kill" in item:
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            step = int(item.get("step", emit.step))
            fields = {k: v for k, v in item.items() if k not in ("type", "step")}
            emit(item["type"], step, **fields)
    return EXIT_OK


if __name__ == "__main__":
    if sys.argv[1] == "--launched":
        sys.exit(main(Path(sys.argv[2]), Path(sys.argv[3]), launched=True))
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
