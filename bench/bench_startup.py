"""Start-up to first frame of ``tunedeck PROJECT``, against ``import textual.app`` alone.

Both are launched the same way, in one run, in a real terminal: a detached tmux session of
100x30 on a private tmux server. Each process writes the wall-clock time at which it is
done to a file: the app when its first frame is on the screen (Textual's Ready event,
``TUNEDECK_FIRST_FRAME_FILE``), the baseline right after ``import textual.app``. The time
from just before ``tmux new-session`` to that stamp is the start-up time; both include
tmux starting the process and Python's own start-up. The app opens a project (so its
first frame is the settings editor, the heaviest screen) and the ratio of the medians is
reported; the goal is under 2.

    python bench/bench_startup.py [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
TUNEDECK = str(Path(PYTHON).with_name("tunedeck"))
SOCKET = f"tunedeck-bench-{os.getpid()}"
TIMEOUT_S = 60.0


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", "-L", SOCKET, *args], check=True, capture_output=True, text=True).stdout


def timed_launch(command: str, stamp: Path, env: dict[str, str], expect: str | None = None) -> float:
    """Seconds from launching ``command`` in a fresh tmux session until it writes ``stamp``."""
    stamp.unlink(missing_ok=True)
    session = f"s{time.monotonic_ns()}"
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    start = time.time()
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", *env_args, command)
    deadline = time.monotonic() + TIMEOUT_S
    while not stamp.exists() or not stamp.read_text():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {command!r}; screen:\n{tmux('capture-pane', '-p', '-t', session)}")
        time.sleep(0.002)
    elapsed = float(stamp.read_text()) - start
    if expect is not None:  # the frame really is on the terminal
        for _ in range(500):
            if expect in tmux("capture-pane", "-p", "-t", session):
                break
            time.sleep(0.01)
        else:
            raise SystemExit(f"{expect!r} never showed:\n{tmux('capture-pane', '-p', '-t', session)}")
        tmux("send-keys", "-t", session, "C-q")
        for _ in range(500):
            if session not in tmux("list-sessions", "-F", "#{session_name}"):
                break
            time.sleep(0.01)
    subprocess.run(["tmux", "-L", SOCKET, "kill-session", "-t", session], capture_output=True)
    return elapsed


def write_project(folder: Path) -> Path:
    from tunedeck.core.project import Project

    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(20)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    project = Project.new("bench", dataset="data.jsonl", path=folder / "bench.toml")
    return project.save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="launches of each, alternating (default 7)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        raise SystemExit("bench_startup needs tmux (apt-get install tmux)")
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as tmp:
        folder = Path(tmp)
        project = write_project(folder)
        stamp = folder / "stamp"
        env = {"TUNEDECK_CONFIG_DIR": str(folder / "config"), "TERM": "xterm-256color"}
        # both see the pane's size (a COLUMNS inherited from the caller would override it)
        baseline_cmd = (f"env -u COLUMNS -u LINES {PYTHON} -c 'import time; import textual.app; "
                        f"open(\"{stamp}\", \"w\").write(repr(time.time()))'")
        app_cmd = f"env -u COLUMNS -u LINES {TUNEDECK} {project}"
        app_env = {**env, "TUNEDECK_FIRST_FRAME_FILE": str(stamp)}
        tmux("new-session", "-d", "-s", "keepalive", "-x", "100", "-y", "30")  # the server stays up between runs
        try:
            timed_launch(baseline_cmd, stamp, env)  # warm the file cache for both
            timed_launch(app_cmd, stamp, app_env, expect="4 Settings")
            baseline, app = [], []
            for _ in range(args.repeats):
                baseline.append(timed_launch(baseline_cmd, stamp, env))
                app.append(timed_launch(app_cmd, stamp, app_env, expect="4 Settings"))
        finally:
            subprocess.run(["tmux", "-L", SOCKET, "kill-server"], capture_output=True)
    result = {
        "import_textual_app_s": statistics.median(baseline),
        "first_frame_s": statistics.median(app),
        "ratio": statistics.median(app) / statistics.median(baseline),
        "goal": "< 2",
        "repeats": args.repeats,
        "runs": {"import_textual_app_s": baseline, "first_frame_s": app},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"import textual.app        {1000 * result['import_textual_app_s']:7.0f} ms (median of {args.repeats})")
        print(f"tunedeck to first frame   {1000 * result['first_frame_s']:7.0f} ms (median of {args.repeats})")
        print(f"ratio                     {result['ratio']:7.2f}  (goal < 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
