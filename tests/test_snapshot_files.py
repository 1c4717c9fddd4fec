"""Every snapshot file belongs to a test. syrupy fails a run that leaves a snapshot unused
(a test renamed or removed, its old SVG left behind), but not under pytest-xdist, where no
process sees every test; this check holds under both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SNAPSHOTS = TESTS / "__snapshots__"


def test_every_snapshot_file_has_its_test():
    modules = sorted(p.name for p in SNAPSHOTS.iterdir() if p.is_dir())
    assert modules
    present = [m for m in modules if (TESTS / f"{m}.py").is_file()]
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist",
                           "-p", "no:cacheprovider", *(f"tests/{m}.py" for m in present)],
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tests = {(Path(line.split("::")[0]).stem, line.split("::")[-1]) for line in done.stdout.splitlines()
             if "::" in line}
    assert {module for module, _ in tests} == set(present)
    files = [p for p in sorted(SNAPSHOTS.glob("*/*")) if p.is_file()]
    assert files
    unused = [f"{p.parent.name}/{p.name}" for p in files if (p.parent.name, p.stem) not in tests]
    assert not unused, f"snapshot files no test uses (remove them, or run pytest --snapshot-update): {unused}"
