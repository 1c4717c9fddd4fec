"""Preparing a run folder for its trainer: made, or locked to resume, with the project's snapshot.

:func:`prepare_run` checks the project (:func:`tunedeck.core.preflight.preflight`), then
makes the run folder: a new one is set up under a hidden name and renamed into place in one
step (two runs cannot take the same name, and a folder that could not be set up is
removed); a resumed one is locked first, so a second trainer on the same run is refused,
and must have been trained with the same settings (:data:`RESUME_FIXED`). Either way the
project as run is written into it (:func:`write_snapshot`) and the ``launched`` event that
begins a session is appended. What the trainer process needs to know is a :class:`RunSpec`.

No torch here: this module is imported by the UI process.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .channel import ChannelError, ensure_key
from .errors import UserError, os_reason
from .events import EVENTS_FILE, LAUNCHED, append_event, event
from .preflight import adapter_settings, load_project, preflight
from .runs import PRIVATE_DIR, SNAPSHOT, RunLock, checkpoint_steps, latest_checkpoint, read_record
from .sources import relative_sources

# keys that must not change when a run is resumed (the checkpoint's weights depend on them)
RESUME_FIXED = ("model.source", "model.trust_remote_code", "quantization.mode", "quantization.quant_type",
                "quantization.double_quant", "lora.r", "lora.target_modules", "lora.use_dora",
                "lora.modules_to_save", "lora.bias", "training.method", "model.adapter")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SETUP_PREFIX = ".setup-"  # a run folder being set up, renamed into place when complete
LOCK_WAIT_S = 1.0  # an observer holds a run's lock for a moment (record_death): wait that long


@dataclass(frozen=True)
class RunSpec:
    """What the trainer process needs to know; plain values (passed on its command line)."""

    run_dir: str
    name: str
    resume: bool
    project_path: str
    warnings: tuple[str, ...] = ()
    processes: int = 1
    gpus: tuple[str, ...] | None = None  # the trainer's CUDA_VISIBLE_DEVICES (GPU or MIG UUIDs)
    accelerate_config: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        gpus = data.get("gpus")
        return cls(**{**data, "warnings": tuple(data.get("warnings") or ()),
                      "gpus": tuple(gpus) if gpus is not None else None})


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


@dataclass
class Prepared:
    """A run folder ready for its trainer, and the run's lock (held until the trainer has it)."""

    spec: RunSpec
    lock: RunLock

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def prepare_run(
    project_path: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    run_name: str | None = None,
    resume: bool = False,
    *,
    deep: bool = True,
) -> Prepared:
    """Check the project (:func:`preflight`), then make or lock the run folder, write its
    snapshot and begin a session. Raises UserError (one line) and leaves nothing behind.

    ``deep=False`` when the caller has just run the full pre-flight elsewhere (the app,
    through the engine process)."""
    project = load_project(project_path, overrides)
    found = preflight(project, deep=deep)
    runs_dir = project.resolve_path(project["output.runs_dir"])
    if run_name is not None and not _NAME.fullmatch(run_name):
        raise UserError(f"--run-name {run_name!r}: use letters, digits, '.', '_' and '-' (no slashes, spaces or "
                        "line breaks), starting with a letter or digit")
    resolved = found.resolved
    config = project["training.accelerate_config"]

    def spec_for(run_dir: Path) -> RunSpec:
        return RunSpec(run_dir=str(run_dir), name=run_dir.name, resume=resume, project_path=str(project.path),
                       warnings=found.notes, processes=resolved.processes, gpus=resolved.gpus,
                       accelerate_config=str(project.resolve_path(config)) if config else None)

    if resume:
        run_dir = _run_to_resume(runs_dir, project, run_name)
        _check_resume_compatible(run_dir, project)
        at = checkpoint_steps(run_dir)[-1]
        if 0 < project["training.max_steps"] <= at:
            raise UserError(f"--resume: {run_dir.name} is at step {at} already and training.max_steps = "
                            f"{project['training.max_steps']}; resume with more steps, e.g. --set "
                            f"training.max_steps={at * 2}")
        lock = _lock_run(run_dir)
        try:
            for stale in (run_dir / PRIVATE_DIR).glob("rank-*"):  # the ranks of an earlier session
                stale.unlink()
            write_snapshot(project, run_dir)
            ensure_key(run_dir)
            append_event(run_dir / EVENTS_FILE, event(LAUNCHED, resume=True, processes=resolved.processes))
        except (OSError, ChannelError) as exc:
            lock.release()
            raise UserError(f"{run_dir}: cannot write to the run folder ({folder_reason(exc)})") from None
        return Prepared(spec_for(run_dir), lock)
    run_dir, lock = _new_run_folder(runs_dir, project, run_name, resolved.processes)
    return Prepared(spec_for(run_dir), lock)


def folder_reason(exc: BaseException) -> str:
    """Why a run folder could not be written, in a few words (a full disk: where else)."""
    if not isinstance(exc, OSError):
        return str(exc)
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return os_reason(exc) + ("; or set output.runs_dir elsewhere" if full else "")


def _new_run_folder(runs_dir: Path, project: Any, run_name: str | None, processes: int) -> tuple[Path, RunLock]:
    """Set a run folder up under a hidden name, then rename it into place: the name is taken
    by a complete folder or not at all, and a folder that could not be set up is removed."""
    setup = runs_dir / f"{SETUP_PREFIX}{secrets.token_hex(8)}"
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        _sweep_setups(runs_dir)
        setup.mkdir()
    except OSError as exc:
        raise UserError(f"{runs_dir}: cannot create the run folder ({folder_reason(exc)})") from None
    lock = RunLock(setup)
    if run_name is not None:
        names = iter([run_name])
    else:
        base = f"{slug(project.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
        names = iter([base, *(f"{base}-{n}" for n in range(2, 10_000))])
    try:
        lock.acquire()
        ensure_key(setup)
        append_event(setup / EVENTS_FILE, event(LAUNCHED, resume=False, processes=processes))
        for name in names:
            target = runs_dir / name
            if target.exists() or target.is_symlink():  # rename() would replace an empty folder
                continue
            write_snapshot(project, setup, target)
            try:
                os.rename(setup, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                continue  # taken meanwhile
            return target, lock
        assert run_name is not None
        raise UserError(f"{runs_dir / run_name}: this run already exists; pick another --run-name, or pass "
                        "--resume to continue it")
    except BaseException as exc:
        lock.release()
        shutil.rmtree(setup, ignore_errors=True)
        if isinstance(exc, (OSError, ChannelError)):
            raise UserError(f"{runs_dir}: cannot set up the run folder ({folder_reason(exc)})") from None
        raise


def _sweep_setups(runs_dir: Path) -> None:
    """Remove the set-up folders of launchers that were killed half-way (unlocked, and older
    than a minute: a live launcher locks its folder the moment it makes it)."""
    for folder in runs_dir.glob(f"{SETUP_PREFIX}*"):
        try:
            if time.time() - folder.stat().st_mtime < 60 or folder.is_symlink():
                continue
        except OSError:
            continue
        lock = RunLock(folder)
        try:
            if lock.acquire():
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass
        finally:
            lock.release()


def _lock_run(run_dir: Path) -> RunLock:
    lock = RunLock(run_dir)
    if lock.acquire(wait=LOCK_WAIT_S):
        return lock
    lock.release()
    record = read_record(run_dir) or {}
    who = f" (pid {record['pid']} on {record.get('host') or 'this host'})" if record.get("pid") else ""
    raise UserError(f"--resume: {run_dir.name} is being trained by another trainer{who}; follow it with "
                    f"`tunedeck attach {run_dir}`, or stop it first")


def _run_to_resume(runs_dir: Path, project: Any, run_name: str | None) -> Path:
    if run_name is not None:
        run_dir = runs_dir / run_name
        if not run_dir.is_dir():
            raise UserError(f"--resume: no run {run_name!r} in {runs_dir}")
        if not checkpoint_steps(run_dir):
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
        return run_dir
    prefix = slug(project.name) + "-"
    candidates = [p for p in (runs_dir.iterdir() if runs_dir.is_dir() else [])
                  if p.is_dir() and p.name.startswith(prefix) and checkpoint_steps(p)]
    if not candidates:
        raise UserError(f"--resume: no run of {project.name!r} with a checkpoint in {runs_dir}; "
                        "name one with --run-name")
    return max(candidates, key=lambda p: latest_checkpoint(p).stat().st_mtime)  # type: ignore[union-attr]


def _check_resume_compatible(run_dir: Path, project: Any) -> None:
    from .models import resolve_source
    from .project import Project

    try:
        saved = Project.load(run_dir / SNAPSHOT)
    except UserError:
        return  # no readable snapshot: the checkpoint itself will tell
    changed = []
    project = adapter_settings(project)  # model.adapter: the snapshot holds that adapter's [lora] settings
    for key in RESUME_FIXED:
        old, new = saved[key], project[key]
        if key == "model.adapter":  # the same adapter folder, however it is named
            old = str(saved.resolve_path(old).resolve()) if old else ""
            new = str(project.resolve_path(new).resolve()) if new else ""
            if new and not Path(new, "adapter_config.json").is_file():
                from .chat import start_adapter

                new = str(start_adapter(project).adapter.resolve())
        if key == "model.source":
            try:
                old = str(resolve_source(old, saved.root).path.resolve())
                new = str(resolve_source(new, project.root).path.resolve())
            except UserError:
                pass
        if old != new:
            changed.append(f"{key} {saved[key]!r} -> {project[key]!r}")
    if changed:
        raise UserError(f"--resume: {run_dir.name} was trained with other settings ({'; '.join(changed)}); "
                        "resume with the same model, quantization, LoRA shape, method and starting adapter, or start "
                        "a new run")


def write_snapshot(project: Any, folder: Path, run_dir: Path | None = None) -> Path:
    """Write the project as run into ``folder``: overrides applied, paths rewritten relative
    to the run folder (``run_dir``, default ``folder``), so ``runs/<name>/project.toml``
    loads and trains as is."""
    from .models import resolve_source
    from .project import Project, atomic_write_text

    from .chat import start_adapter

    run_dir = run_dir or folder
    snap = Project.from_text(project.text(), project.path)
    start = start_adapter(project)
    if start is not None:  # the run continues that adapter: its folder, and its settings as [lora]
        snap.set("model.adapter", os.path.relpath(start.adapter, run_dir))
        snap.set_many([(f"lora.{k}", v) for k, v in start.lora.items()])
    if project["dataset.path"]:
        snap.set("dataset.path", relative_sources(project["dataset.path"], project.root, run_dir))
    for key in ("model.source", "dataset.eval_split", "output.runs_dir", "training.accelerate_config"):
        value = snap[key]
        if not isinstance(value, str) or not value:
            continue
        if key == "model.source":
            ref = resolve_source(value, project.root, allow_pickle=True)
            if ref.kind not in ("dir", "gguf"):
                continue
            target = ref.path
        else:
            target = project.resolve_path(value)
        snap.set(key, os.path.relpath(target, run_dir))
    header = (f"# tunedeck run {run_dir.name}: the project as trained, from {project.path}\n"
              "# (overrides applied; paths relative to this folder)\n")
    path = folder / SNAPSHOT
    atomic_write_text(path, header + snap.text())
    return path
