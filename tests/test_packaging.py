"""The wheel: everything under tunedeck.*, data files included, usable outside the checkout;
and the library (tunedeck.core) apart from the app (tunedeck.tui) but for one entry point."""

from __future__ import annotations

import ast
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def tui_imports(path: Path, package: str) -> list[tuple[str, int, str]]:
    """Each import of tunedeck.tui in a module of ``package``: (where, line, the function it is in)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, int, str]] = []

    def named(module: str) -> bool:
        return module == "tunedeck.tui" or module.startswith("tunedeck.tui.")

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
            modules: list[str] = []
            if isinstance(child, ast.Import):
                modules = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's package, up level - 1
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                modules = [base] + [f"{base}.{alias.name}" for alias in child.names]
            elif (isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)
                  and getattr(child.func, "attr", getattr(child.func, "id", "")) in ("import_module", "__import__")):
                modules = [child.args[0].value]
            if any(named(module) for module in modules):
                found.append((path.name, child.lineno, scope or "<module>"))
            visit(child, inner)

    visit(tree, "")
    return found


def test_the_library_imports_the_app_in_one_place_only():
    """tunedeck.core works without tunedeck.tui: the one way in is cli.open_app (``tunedeck``,
    ``tunedeck demo`` and ``tunedeck attach`` open the app through it)."""
    core = REPO / "core"
    found = []
    for path in sorted(core.rglob("*.py")):
        package = ".".join(["tunedeck", *path.relative_to(REPO).parent.parts])
        found += [(str(path.relative_to(REPO)), line, scope) for _, line, scope in tui_imports(path, package)]
    assert found, "cli.open_app no longer opens the app: update this test"
    assert [(where, scope) for where, _, scope in found] == [("core/cli.py", "open_app")], found


def test_the_import_check_sees_every_form(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import tunedeck.tui.app\nfrom ..tui import app\nfrom ...tui.app import run_app\n"
                      "from .. import tui\nfrom tunedeck import tui\nfrom ..core import cli\nimport tunedeck.tuition\n"
                      "def f():\n    importlib.import_module('tunedeck.tui.screens')\n")
    lines = [line for _, line, _ in tui_imports(module, "tunedeck.core.commands")]
    assert lines == [1, 3, 5, 9]  # level 2 from tunedeck.core.commands is tunedeck.core: ..tui is not the app
    lines = [line for _, line, _ in tui_imports(module, "tunedeck.core")]
    assert lines == [1, 2, 4, 5, 9]
