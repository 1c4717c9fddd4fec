"""Library output goes to the log; a command's own lines reach the real stdout and stderr."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from pathlib import Path
    from tunedeck.core.quiet import library_output

    noisy = logging.getLogger("noisy")
    noisy.addHandler(logging.StreamHandler(sys.stderr))  # bound to stderr before the block
    with library_output(Path(sys.argv[1])) as (out, err):
        os.write(1, b"C-level stdout\\n")
        os.write(2, b"C-level stderr\\n")
        print("python stdout")
        print("python stderr", file=sys.stderr)
        warnings.warn("a deprecation", FutureWarning)
        noisy.warning("a kernel notice")
        print("own result", file=out)
        print("own progress", file=err)
    print("after: stdout")
    print("after: stderr", file=sys.stderr)
""")


def test_library_output_goes_to_the_log_and_own_lines_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "lib.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["own result", "after: stdout"]
    assert done.stderr.splitlines() == ["own progress", "after: stderr"]
    text = log.read_text()
    for line in ("C-level stdout", "C-level stderr", "python stdout", "python stderr", "a deprecation",
                 "a kernel notice"):
        assert line in text, line


def test_a_log_that_cannot_be_written_drops_the_library_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(blocker / "lib.log")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["own result", "after: stdout"]
    assert done.stderr.splitlines() == ["own progress", "after: stderr"]
