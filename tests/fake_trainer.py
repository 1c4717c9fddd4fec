"""A scripted trainer for UI tests: ``python fake_trainer.py RUN_DIR SCRIPT.jsonl``.

It behaves like the real one seen from outside (its pid in ``trainer.pid``, events appended
to ``events.jsonl``, the control file read between steps, SIGUSR1 aborts) but its events
come from a script, one JSON object per line:

- an event (``{"type": "step", "step": 3, "loss": 1.2}``): written with the time added;
- ``{"sleep": 0.5}``: wait;
- ``{"wait_for_control": true}``: wait (reading the control file) until stop or abort;
  stop writes a checkpoint and a ``finished`` event with ``stopped``;
- ``{"crash": "RuntimeError: boom"}``: a ``failed`` event with a traceback, exit code 1;
- ``{"kill": true}``: SIGKILL itself, with no final event (the UI must say "died").
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from tunedeck.core.events import EventLog, event
from tunedeck.core.runs import take_control, write_pid_file


def main(run_dir: Path, script: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_pid_file(run_dir)
    log = EventLog(run_dir / "events.jsonl")
    step = 0

    def emit(type: str, **fields) -> None:
        log.write(event(type, step, **fields))

    def aborted(signum, frame) -> None:
        emit("failed", reason=f"aborted at step {step}; nothing saved", traceback=None, user_error=False,
             aborted=True)
        log.close()
        os._exit(1)

    signal.signal(signal.SIGUSR1, aborted)
    for line in script.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if "sleep" in item:
            time.sleep(item["sleep"])
        elif "wait_for_control" in item:
            while True:
                control = take_control(run_dir)
                if control == "stop":
                    (run_dir / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
                    emit("checkpoint", path=str(run_dir / "checkpoints" / f"checkpoint-{step}"))
                    emit("finished", adapter=str(run_dir / "adapter"), run_dir=str(run_dir), final_loss=None,
                         stopped=True)
                    return 0
                if control == "save":
                    emit("checkpoint", path=str(run_dir / "checkpoints" / f"checkpoint-{step}"))
                time.sleep(0.05)
        elif "crash" in item:
            emit("failed", reason=item["crash"], user_error=False,
                 traceback="Traceback (most recent call last):\n  File \"train.py\", line 1, in <module>\n"
                           f"    trainer.train()\n{item['crash']}\n")
            return 1
        elif "kill" in item:
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            step = int(item.get("step", step))
            fields = {k: v for k, v in item.items() if k not in ("type", "step")}
            emit(item["type"], **fields)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
