"""The scripted trainer (fake_trainer.py) held to the real one, so the UI tests that follow
it test what a real run does: the event types and fields it writes of its own are ones the
real trainer writes (tunedeck.core.events and the code that emits them), its exit codes
are the real ones (tunedeck.core.runs), and its calls into tunedeck.core (RunLock,
EventLog, Emitter, Controls, Server...) fit their real signatures. It is also run: ended by
its script, by a crash, and by controls sent through the real channel."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tunedeck.core import events, runs
from tunedeck.core.channel import ChannelError, Client

FAKE = Path(__file__).parent / "fake_trainer.py"
CORE = Path(events.__file__).parent
EMITTERS = ("emit", "event", "self")  # Emitter.__call__, events.event, and the Emitter calling itself
BASE = {"type", "time", "step"}


def emit_calls(path: Path) -> list[tuple[str, set[str], bool, dict[str, Any], int]]:
    """Each event written in ``path`` whose type is known there: (type, its field names,
    whether it also takes fields from a ``**`` splat, its literal field values, line)."""
    constants = {name: value for name, value in vars(events).items() if isinstance(value, str) and value in events.TYPES}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            kind = first.value
        elif isinstance(first, ast.Name) and first.id in constants:
            kind = constants[first.id]
        else:
            continue
        if name not in EMITTERS or (name == "self" and kind not in events.TYPES):
            continue
        keys = {k.arg for k in node.keywords if k.arg is not None}
        values = {k.arg: k.value.value for k in node.keywords if k.arg and isinstance(k.value, ast.Constant)}
        found.append((kind, keys, any(k.arg is None for k in node.keywords), values, node.lineno))
    return found


@functools.cache
def real_events() -> list[tuple[str, set[str], bool, dict[str, Any], int]]:
    return [call for path in sorted(CORE.rglob("*.py")) for call in emit_calls(path)]


def real_fields() -> dict[str, set[str] | None]:
    """Each type the real code writes: the fields it writes it with (None: open, from a splat)."""
    out: dict[str, set[str] | None] = {}
    for kind, keys, splat, _, _ in real_events():
        known = out.get(kind, set())
        out[kind] = None if splat or known is None else known | keys
    return out


def test_the_fake_writes_real_event_types_with_real_fields():
    real = real_events()
    fields = real_fields()
    assert {"launched", "run_started", "step", "finished", "failed", "control"} <= set(fields)  # the scan sees them
    fake = emit_calls(FAKE)
    for kind, keys, splat, values, line in fake:
        where = f"fake_trainer.py:{line}: {kind}"
        assert kind in events.TYPES, f"{where} is not an event type"
        assert kind in fields, f"{where}: the real trainer never writes it"
        assert not splat, f"{where}: its fields come from a splat; name them"
        if fields[kind] is not None:
            assert keys <= fields[kind], f"{where}: {sorted(keys - fields[kind])} are not fields the real one writes"
        if "failure" in values:  # the same kind of failure, written with the same fields by the real code
            same = [k for t, k, _, v, _ in real if t == kind and v.get("failure") == values["failure"]]
            assert same, f"{where}: the real code never writes failure={values['failure']!r}"
            assert any(keys <= k for k in same), f"{where}: not the fields of the real {values['failure']} failure"
    assert {kind for kind, *_ in fake} == {"launched", "checkpoint", "finished", "failed"}  # the scan sees them


def handled(func: ast.AST) -> dict[str, str]:
    """Each exception a function's handlers name -> the exit code name the handler returns."""
    out = {}
    for node in ast.walk(func):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            codes = [r.value.id for r in ast.walk(node) if isinstance(r, ast.Return) and isinstance(r.value, ast.Name)]
            out.update({ast.unparse(name): codes[-1] for name in caught if codes})
    return out


def test_the_fake_returns_the_real_exit_codes():
    """Its exit codes are the names of tunedeck.core.runs, not numbers that could drift, and
    an abort ends it with the code it ends the real trainer with (a crash and a stop are
    run below)."""
    tree = ast.parse(FAKE.read_text(encoding="utf-8"))
    returned = [node.value for node in ast.walk(tree) if isinstance(node, ast.Return) and node.value is not None]
    names = {value.id for value in returned if isinstance(value, ast.Name)}
    others = [ast.unparse(value) for value in returned
              if not isinstance(value, ast.Name) and not (isinstance(value, ast.Call) and ast.unparse(value.func) == "play")]
    assert others == [], "the fake returns something other than an exit code of tunedeck.core.runs"
    assert names == {"EXIT_OK", "EXIT_FAILED", "EXIT_ABORTED"} and all(hasattr(runs, name) for name in names)
    trainer = ast.parse(inspect.getsource(importlib.import_module("tunedeck.core.trainer")))
    [real_run] = [node for node in trainer.body if isinstance(node, ast.FunctionDef) and node.name == "run"]
    [fake_main] = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    real, fake = handled(real_run), handled(fake_main)
    assert (real["Aborted"], real["Exception"]) == ("EXIT_ABORTED", "EXIT_FAILED")
    assert fake == {"Aborted": real["Aborted"]}


def real_objects(tmp_path: Path) -> dict[str, Any]:
    """The fake's names from tunedeck.core (a real instance for each class it makes)."""
    from tunedeck.core.channel import Server
    from tunedeck.core.events import EventLog
    from tunedeck.core.runs import RunLock
    from tunedeck.core.trainer import Controls, Emitter

    log = EventLog(tmp_path / "events.jsonl")
    emit = Emitter(log)
    return {"RunLock": RunLock(tmp_path), "EventLog": log, "Emitter": emit, "Controls": Controls(emit),
            "Server": Server(tmp_path, log, Controls(emit).take)}


def test_the_fake_calls_tunedeck_core_as_it_is(tmp_path):
    """Every call the fake makes to a function or class of tunedeck.core binds to its real
    signature, and every attribute it reads or sets on their objects exists (an attribute
    set that the real code no longer reads, like a renamed ``Emitter.server``, would pass
    unnoticed when it runs)."""
    tree = ast.parse(FAKE.read_text(encoding="utf-8"))
    imported: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunedeck."):
            module = importlib.import_module(node.module)
            for alias in node.names:
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    assert {"RunLock", "EventLog", "Emitter", "Controls", "Server", "trainer"} <= set(imported)
    instances = real_objects(tmp_path)
    try:
        variables: dict[str, Any] = dict(imported)  # a name in the fake -> the real object it stands for
        for node in ast.walk(tree):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Name) and inspect.isclass(imported.get(node.value.func.id))):
                cls = node.value.func.id
                assert cls in instances, f"the fake makes a {cls}: add one to real_objects"
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        variables[target.id] = instances[cls]
            elif isinstance(node, ast.arg) and isinstance(node.annotation, ast.Name) and node.annotation.id in imported:
                variables[node.arg] = instances[node.annotation.id]

        def resolve(expr: ast.expr) -> Any:
            if isinstance(expr, ast.Name):
                return variables.get(expr.id)
            if isinstance(expr, ast.Attribute):
                owner = resolve(expr.value)
                if owner is None:
                    return None
                assert hasattr(owner, expr.attr), f"fake_trainer.py:{expr.lineno}: {ast.unparse(expr)} does not exist"
                return getattr(owner, expr.attr)
            return None

        checked = 0
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                resolve(node)
            elif isinstance(node, ast.Call):
                real = resolve(node.func)
                if real is None or not callable(real):
                    continue
                args = [None] * len(node.args)
                kwargs = {k.arg: None for k in node.keywords if k.arg is not None}
                if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                    continue  # emit(type, step, **fields): the script's fields, checked where it runs
                try:
                    inspect.signature(real).bind(*args, **kwargs)
                except TypeError as exc:
                    pytest.fail(f"fake_trainer.py:{node.lineno}: {ast.unparse(node)}: {exc}")
                checked += 1
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
                for target in node.targets:  # emit.health.observe = lambda ev: []: called as the real one is
                    real = resolve(target)
                    if real is not None:
                        wanted = len(inspect.signature(real).parameters)
                        assert len(node.value.args.args) == wanted, f"fake_trainer.py:{node.lineno}: takes {wanted}"
        assert checked >= 10
        assert isinstance(imported["trainer"]._SESSION, dict)  # the signal handlers read its "emit"
        assert '_SESSION.get("emit")' in inspect.getsource(imported["trainer"])
    finally:
        instances["Server"].close(drain_s=0)
        instances["EventLog"].close()


def start(run_dir: Path, script: list[dict[str, Any]]) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.script.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in script), encoding="utf-8")
    return subprocess.Popen([sys.executable, str(FAKE), str(run_dir), str(path)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def connect(run_dir: Path, proc: subprocess.Popen) -> Client:
    deadline = time.monotonic() + 30
    while True:
        try:
            return Client.connect(run_dir, keep=0)
        except (ChannelError, OSError):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the fake trainer did not open its channel"
            time.sleep(0.05)


def until(predicate, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def written(run_dir: Path) -> list[dict[str, Any]]:
    return events.read_events(run_dir / events.EVENTS_FILE)


def test_the_fake_runs_as_the_real_one_ends(tmp_path):
    """Ended by its script, by a crash, by save then stop, and by abort (the last two through
    the real channel and Controls): the real exit codes, and only real types and fields."""
    started = {"type": "run_started", "step": 0, "max_steps": 4, "trainable_params": 10}
    step = {"type": "step", "step": 1, "loss": 2.0, "max_steps": 4}
    procs = {
        "done": start(tmp_path / "done", [started, step]),
        "crash": start(tmp_path / "crash", [started, {"crash": "RuntimeError: boom"}]),
        "stopped": start(tmp_path / "stopped", [started, step, {"wait_for_control": True}]),
        "aborted": start(tmp_path / "aborted", [started, {"wait_for_control": True}]),
    }
    try:
        client = connect(tmp_path / "stopped", procs["stopped"])
        try:  # once it waits for a control (before that its script goes on)
            until(lambda: any(ev["type"] == "step" for ev in written(tmp_path / "stopped")), "the step")
            assert client.control("save")["taken"]
            until(lambda: any(ev["type"] == "checkpoint" for ev in written(tmp_path / "stopped")), "the checkpoint")
            assert client.control("stop")["taken"]
        finally:
            client.close()
        client = connect(tmp_path / "aborted", procs["aborted"])
        try:
            until(lambda: any(ev["type"] == "run_started" for ev in written(tmp_path / "aborted")), "the start")
            assert client.control("abort")["taken"]
        finally:
            client.close()
        codes = {name: proc.wait(timeout=30) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert codes == {"done": runs.EXIT_OK, "crash": runs.EXIT_FAILED, "stopped": runs.EXIT_OK,
                     "aborted": runs.EXIT_ABORTED}, {name: proc.stderr.read() for name, proc in procs.items()}
    fields = real_fields()
    seen: dict[str, list[str]] = {}
    for name in procs:
        evs = written(tmp_path / name)
        seen[name] = [ev["type"] for ev in evs]
        for ev in evs:
            assert ev["type"] in events.TYPES and ev["type"] in fields, ev
            if fields[ev["type"]] is not None:
                assert set(ev) - BASE <= fields[ev["type"]], ev
    assert seen == {
        "done": ["launched", "run_started", "step"],
        "crash": ["launched", "run_started", "failed"],
        "stopped": ["launched", "run_started", "step", "control", "checkpoint", "control", "checkpoint", "finished"],
        "aborted": ["launched", "run_started", "control", "failed"],
    }
    crash = written(tmp_path / "crash")[-1]
    assert (crash["failure"], crash["user_error"]) == ("crash", False) and "boom" in crash["traceback"]
    stopped = written(tmp_path / "stopped")[-1]
    assert stopped["stopped"] is True
    aborted = written(tmp_path / "aborted")[-1]
    assert (aborted["failure"], aborted["aborted"]) == ("aborted", True)
