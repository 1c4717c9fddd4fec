"""The wheel: everything under tunedeck.*, data files included, usable outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=600,
    )
    (path,) = out.glob("tunedeck-*.whl")
    return path


def test_wheel_holds_only_tunedeck_packages_and_their_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tunedeck"}
    for needed in (
        "tunedeck/core/cli.py",
        "tunedeck/core/project.py",
        "tunedeck/tui/app.py",
        "tunedeck/sample_data/demo.toml",
        "tunedeck/sample_data/python_qa.jsonl",
    ):
        assert needed in names
    assert any(n.startswith("tunedeck/themes/") and n.endswith(".toml") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tunedeck = tunedeck.core.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import tunedeck.core, tunedeck.tui, tunedeck.themes;"
        "print(tunedeck.core.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    demo = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "tunedeck.core", "demo", str(demo), "--no-open"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "tunedeck.core", "check", str(demo / "demo.toml"), "--json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"format": "messages"' in result.stdout
