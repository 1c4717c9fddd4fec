"""Starting a run and following it: the side of the run that is not the trainer.

Used by ``tunedeck train``, ``tunedeck attach`` and the app.

- :func:`preflight` is the one set of refusals before a run: the settings against this
  machine, the model's files, the dataset, and the target modules against the model's
  real layers (built on the meta device). ``tunedeck check``, ``tunedeck train`` and the
  Train screen (through the engine process, so the UI stays light) all call it, before
  anything is created.
- :func:`prepare_run` makes the run folder: a new one is set up under a hidden name and
  renamed into place in one step (two runs cannot take the same name, and a folder that
  could not be set up is removed); a resumed one is locked first, so a second trainer on
  the same run is refused. It appends the ``launched`` event that begins a session.
- :func:`start_run` starts the trainer as a program of its own
  (``python -m tunedeck.core.trainer``, through torchrun or accelerate for several
  processes) with plain :mod:`subprocess`, in its own session, its output in the run's
  ``trainer.log``. The trainer inherits the run's lock and holds it while it lives.
- :class:`Follower` follows any run, the one started here (:class:`RunHandle`) or one
  started elsewhere (:func:`attach`) alike: the history from ``events.jsonl``, then live
  events through the trainer's channel (:mod:`tunedeck.core.channel`), whose controls
  (stop, save, abort) are answered once the trainer has taken them. A trainer that is
  gone without a final event is found at once (the channel closes) and, once certain,
  its end is written to the run's events (:func:`tunedeck.core.runs.record_death`).

No torch here: this module is imported by the UI process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .channel import ChannelError, Client, default_address, ensure_key
from .errors import UserError, os_reason
from .events import EVENTS_FILE, LAUNCHED, EventReader, append_event, event
from .kept import kept_answer, stamp
from .sources import data_stamps, relative_sources
from .runs import (
    CONTROLS,
    LOG_FILE,
    PRIVATE_DIR,
    SNAPSHOT,
    Liveness,
    RunLock,
    RunState,
    checkpoint_steps,
    kill_if_alive,
    latest_checkpoint,
    liveness,
    oom_kills,
    process_alive,
    process_start,
    rank_processes,
    read_record,
    record_death,
    write_record,
)

# keys that must not change when a run is resumed (the checkpoint's weights depend on them)
RESUME_FIXED = ("model.source", "model.trust_remote_code", "quantization.mode", "quantization.quant_type",
                "quantization.double_quant", "lora.r", "lora.target_modules", "lora.use_dora",
                "lora.modules_to_save", "lora.bias", "training.method", "model.adapter")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SETUP_PREFIX = ".setup-"  # a run folder being set up, renamed into place when complete
LOCK_WAIT_S = 1.0  # an observer holds a run's lock for a moment (record_death): wait that long
CONNECT_S = 10.0  # how long a control waits for a trainer that is still starting to listen
EXIT_GRACE_S = 60.0  # a trainer that has reported its end but does not exit is killed after this
POLL_S = 0.1  # how often a follower without a live channel reads the file


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


# -- the checks before a run (no heavy imports but the target check's) ---------------------------


def load_project(project_path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Any:
    from .project import Project

    project = Project.load(project_path)
    project.apply_overrides(list(overrides))
    return project


@dataclass
class Preflight:
    """What the checks before a run found: the model's files, the resolved settings, the
    rows, and (after the deep checks) the parameters that will train."""

    ref: Any  # tunedeck.core.models.ModelRef
    resolved: Any  # tunedeck.core.resolve.Resolved
    splits: Any  # tunedeck.core.datafile.Splits
    counts: dict[str, int] | None = None  # trainable_params, total_params, target_layers
    notes: tuple[str, ...] = ()  # what the run should warn about (e.g. ambiguous GPU numbers)


def preflight(project: Any, *, deep: bool = True, inspection: Any = None) -> Preflight:
    """Every refusal a run can know before it starts: `tunedeck check`, `tunedeck train`
    and the Train screen call this, so a project one of them passes none refuses.

    ``deep``: also the checks that need the model's code: ``lora.target_modules`` against
    the model's layers (built on the meta device) and the rows through its tokenizer and
    chat template (a model without one, a set where no row trains). They import torch and
    transformers; the UI asks the engine process to run them, and their answers are kept
    on disk, so an unchanged project is not asked again. ``inspection``: the model's
    Inspection when the caller keeps one. Raises UserError with one line.
    """
    from .datafile import load_splits
    from .hardware import detect
    from .models import resolve_source
    from .resolve import resolve

    hardware = detect()
    if not hardware.gpus and hardware.notes:  # GPUs here, but CUDA_VISIBLE_DEVICES names none of them
        raise UserError(hardware.notes[-1])
    resolved = resolve(project, hardware)
    ref = resolve_source(project["model.source"], project.root, allow_pickle=project["model.allow_pickle"])
    mode = project["quantization.mode"]
    if ref.kind == "gguf" and mode != "none":
        raise UserError(
            f'quantization.mode = "{mode}" cannot be used with a .gguf source ({ref.source}): GGUF weights are '
            "already quantized and load dequantized, not through bitsandbytes; convert the model to a safetensors "
            'folder first, or set quantization.mode = "none"'
        )
    config = project["training.accelerate_config"]
    if config:
        check_accelerate_config(project.resolve_path(config))
    project = adapter_settings(project)  # model.adapter: its own [lora] settings train
    splits = load_splits(project)
    counts = None
    if deep:
        if resolved.device == "cuda":
            check_torch_cuda(hardware)
        counts = target_counts(project, ref, inspection)
        check_rendering(project, ref, splits)
    return Preflight(ref, resolved, splits, counts, hardware.notes)


def adapter_settings(project: Any) -> Any:
    """The project as it trains: with ``model.adapter`` set, a copy whose ``[lora]`` settings
    are that adapter's (the run continues it); else the project itself. UserError (one line)
    when the adapter does not fit (:func:`tunedeck.core.chat.start_adapter`)."""
    from .chat import start_adapter
    from .project import Project

    start = start_adapter(project)
    if start is None:
        return project
    copy = Project.from_text(project.text(), project.path)
    copy.set_many([(f"lora.{k}", v) for k, v in start.lora.items()])
    return copy


def target_counts(project: Any, ref: Any, inspection: Any = None) -> dict[str, int]:
    """What ``[lora]`` trains on the project's model, or its refusal (UserError): peft's
    matching on the model built on the meta device (:func:`tunedeck.core.inspect.project_counts`)."""
    from .inspect import project_counts

    if inspection is not None:  # the engine keeps the model's inspection: nothing to save
        return project_counts(project, inspection)
    lora = ("target_modules", "r", "use_dora", "bias", "modules_to_save")
    key = {"model": stamp(ref.path if ref.path.is_file() else ref.path / "config.json"),
           "trust": project["model.trust_remote_code"], "lora": {k: project[f"lora.{k}"] for k in lora}}
    return kept_answer("targets", key, lambda: project_counts(project), code=("inspect.py",),
                       keep_refusal=_about_the_settings)


def check_rendering(project: Any, ref: Any, splits: Any) -> None:
    """The rows through the model's tokenizer and chat template, as the trainer renders
    them (:func:`tunedeck.core.render.render_splits`, stopping at the first row that trains):
    refuses a model without a chat template for chat rows, and a set where no row trains."""

    def render() -> dict[str, bool]:
        from .models import load_tokenizer
        from .render import render_splits

        tokenizer = load_tokenizer(ref, trust_remote_code=project["model.trust_remote_code"])
        render_splits(project, tokenizer, splits, model_label=f"model {ref.display}", until_one_trains=True)
        return {"ok": True}

    model = stamp(ref.path)  # a folder: its files but the weights
    data = [data_stamps(project)]
    if isinstance(project["dataset.eval_split"], str):
        data.append(stamp(project.resolve_path(project["dataset.eval_split"])))
    key = {"model": model, "data": data, "trust": project["model.trust_remote_code"],
           "template": project["model.chat_template"], "dataset": project.values["dataset"],
           "seed": project["training.seed"], "method": project["training.method"]}
    kept_answer("rendering", key, render, code=("render.py", "datafile.py", "conversation.py", "sources.py",
                                                "preference.py"), keep_refusal=_about_the_settings)


def _about_the_settings(exc: UserError) -> bool:
    """A refusal about the project's settings is kept; one about a file that could not be
    read just now is asked again."""
    return re.search(r"\b(lora|dataset|model|training|preference)\.[a-z_]+", exc.message) is not None


def check_accelerate_config(path: Path) -> None:
    """An accelerate config tunedeck can train with: readable, and not sharding the model
    (FSDP, DeepSpeed ZeRO-3), which the LoRA / QLoRA set-up does not support: adapters kept in
    fp32 on a bf16 base (FSDP wants one dtype per flat parameter) and QLoRA's 4-bit weights
    placed per GPU at load time. Raises UserError with one line."""
    import json as _json

    import yaml

    key = "training.accelerate_config"
    if not path.is_file():
        raise UserError(f"{key}: {path} is not a file; write one with `accelerate config --config_file FILE`, or "
                        "leave it empty for plain data parallel")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{key}: {path} is not a readable accelerate config ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{key}: {path} is not an accelerate config (a YAML mapping, as `accelerate config` writes)")
    kind = str(data.get("distributed_type") or "").upper()
    stage = None
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") if isinstance(data.get("deepspeed_config"), dict) else {}
        stage = ds.get("zero_stage")
        file = ds.get("deepspeed_config_file")
        if stage is None and isinstance(file, str):
            try:
                stage = _json.loads((path.parent / file).read_text(encoding="utf-8"))["zero_optimization"]["stage"]
            except (OSError, ValueError, KeyError, TypeError):
                stage = None
    if kind == "FSDP" or stage == 3:
        what = "FSDP" if kind == "FSDP" else "DeepSpeed ZeRO-3"
        raise UserError(f"{key}: {path} uses {what}, which shards the model over the GPUs; tunedeck's LoRA and "
                        "QLoRA set-up does not support that yet (fp32 adapters on a bf16 base, 4-bit weights placed "
                        "per GPU); use DeepSpeed ZeRO-1 or ZeRO-2, or plain data parallel (leave it empty)")


def check_torch_cuda(hardware: Any) -> None:
    """NVML sees a GPU: can torch use it? (a CPU build of torch, or a driver too old for its CUDA)"""
    import torch

    if torch.cuda.is_available():
        return
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build, without CUDA"
    gpu = hardware.gpus[0]
    raise UserError(f"{gpu.label} ({gpu.name}) is here, but torch {torch.__version__} ({built}) cannot use it; install "
                    "the CUDA build of torch that matches the driver (`nvidia-smi` shows the driver's CUDA version; "
                    "e.g. pip install torch --index-url https://download.pytorch.org/whl/cu128), or train on the CPU "
                    "with TUNEDECK_DEVICE=cpu")


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
            raise UserError(f"{run_dir}: cannot write to the run folder ({_why(exc)})") from None
        return Prepared(spec_for(run_dir), lock)
    run_dir, lock = _new_run_folder(runs_dir, project, run_name, resolved.processes)
    return Prepared(spec_for(run_dir), lock)


def _why(exc: BaseException) -> str:
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
        raise UserError(f"{runs_dir}: cannot create the run folder ({_why(exc)})") from None
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
            raise UserError(f"{runs_dir}: cannot set up the run folder ({_why(exc)})") from None
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


# -- starting the trainer ---------------------------------------------------------------------------


def trainer_command(spec: RunSpec, python: str = sys.executable) -> list[str]:
    """The command line of a run's trainer: one process, or several through torchrun
    (data parallel) or accelerate (an accelerate config: FSDP, DeepSpeed)."""
    program = ["-m", "tunedeck.core.trainer", "--run-dir", spec.run_dir, "--launch", json.dumps(spec.as_dict())]
    if spec.accelerate_config:
        return [python, "-m", "accelerate.commands.launch", "--config_file", spec.accelerate_config,
                "--num_processes", str(spec.processes), "--num_machines", "1", *program]
    if spec.processes > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec.processes),
                "--local-addr", "127.0.0.1", *program]
    return [python, *program]


def trainer_env(spec: RunSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if spec.gpus is not None:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers the GPUs as NVML does
        env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.gpus)
    return env


def start_run(
    project_path: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    run_name: str | None = None,
    resume: bool = False,
    *,
    deep: bool = True,
) -> RunHandle:
    """Check the project, make the run folder and start its trainer process.

    Raises UserError (one line) when the project cannot train, before anything is created;
    problems the trainer finds later arrive as a ``failed`` event with ``user_error``.
    """
    prepared = prepare_run(project_path, overrides, run_name, resume, deep=deep)
    spec = prepared.spec
    run_dir = Path(spec.run_dir)
    try:
        with open(run_dir / LOG_FILE, "ab") as log:
            process = subprocess.Popen(
                trainer_command(spec), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, pass_fds=(prepared.lock.fileno(),),
                env=trainer_env(spec), cwd=run_dir,
            )
    except OSError as exc:
        _abandon(prepared, f"cannot start the trainer process ({_why(exc)})")
        prepared.release()
        raise UserError(f"{spec.name}: cannot start the trainer process ({_why(exc)})") from None
    try:  # the run's record at once (the trainer writes its own as soon as it runs)
        write_record(run_dir, process.pid, leader=process.pid, leader_start=process_start(process.pid),
                     world_size=spec.processes, address=default_address(run_dir), oom_kills=oom_kills())
    except (OSError, UserError):
        pass
    finally:
        prepared.release()  # the trainer holds the run's lock now (it inherited it)
    return RunHandle(spec, process)


def _abandon(prepared: Prepared, reason: str) -> None:
    """A session that never got a trainer: a new run's folder goes, a resumed one is ended."""
    run_dir = Path(prepared.spec.run_dir)
    if not prepared.spec.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    try:
        append_event(run_dir / EVENTS_FILE, event("failed", reason=reason, failure="crash", traceback=None,
                                                  user_error=False))
    except OSError:
        pass


# -- following a run ---------------------------------------------------------------------------


class Follower:
    """A run followed from outside its trainer: its events, status and controls.

    The history comes from ``events.jsonl``; while the trainer lives, later events come
    live through its channel (the file is read up to the position the trainer names when
    the connection opens, then every event carries its own position, so none is missed or
    taken twice). Without a channel (the trainer is starting, or on another host) the file
    is read every :data:`POLL_S`. A trainer gone without a final event is reported as died
    (and recorded so in the file, once that is certain).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.name = self.run_dir.name
        self.state = RunState()
        self._reader = EventReader(self.run_dir / EVENTS_FILE)
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._live: Liveness | None = None
        self._next_connect = 0.0
        self._detached = False
        self._pending: list[dict[str, Any]] = []
        self._connect()
        self._pending = self._take(self._reader.read_new(self._client.offset if self._client else None))
        if self._client is None:
            self._pending.extend(self._check_liveness())

    # -- what callers use -----------------------------------------------------------------------

    @property
    def status(self) -> str:
        """starting | running | stopping | finished | stopped | aborted | failed | died | unknown."""
        return self.state.status(self._live)

    @property
    def final(self) -> dict[str, Any] | None:
        """The session's final event (``finished`` or ``failed``) once it has ended."""
        return self.state.final

    @property
    def ended(self) -> bool:
        return self.state.ended

    @property
    def pid(self) -> int | None:
        live = self._live or liveness(self.run_dir)
        return live.pid if live.alive else None

    @property
    def project_path(self) -> str | None:
        """The project file the run was started from (its run_started event says)."""
        return self.state.project

    def events(self, timeout: float = 0.2) -> list[dict[str, Any]]:
        """History on the first call, then what came since, waiting at most ``timeout`` seconds."""
        with self._lock:
            if self._pending:
                out, self._pending = self._pending, []
                return out
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._detached:
            out = self._poll(max(0.0, min(POLL_S, deadline - time.monotonic())))
            if out or self.ended or time.monotonic() >= deadline:
                return out
        return []

    def wait(self, timeout: float | None = None) -> str:
        """Follow the run until it has ended (or ``timeout``); returns its status. The
        events read meanwhile stay for :meth:`events`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended and (deadline is None or time.monotonic() < deadline):
            new = self._poll(POLL_S)
            with self._lock:
                self._pending.extend(new)
        return self.status

    def stop(self) -> str:
        """Save a checkpoint at the end of the current step, then end (with the adapter)."""
        return self.control("stop")

    def save_now(self) -> str:
        """Save a checkpoint at the end of the current step and keep training."""
        return self.control("save")

    def abort(self) -> str:
        """End at once, saving nothing more."""
        return self.control("abort")

    def control(self, action: str) -> str:
        """Send a control; returns once the trainer has taken it (its answer, one line).
        Raises UserError when the run has ended or its trainer cannot be reached."""
        if self.ended:
            raise UserError(f"{self.name} has ended ({self.status}); nothing to {action}")
        client = self._client
        if client is not None and not client.closed.is_set():
            try:
                return _answer(self.name, action, client.control(action))
            except ChannelError:
                pass
        return send_control(self.run_dir, action)

    def detach(self) -> None:
        """Stop following: the channel closes and nothing more is kept for this follower;
        the run goes on, and :func:`attach` follows it again."""
        self._detached = True
        client, self._client = self._client, None
        if client is not None:
            client.close()
        with self._lock:
            self._pending = []

    def kill(self) -> None:
        """Kill the trainer and every process of the run (SIGKILL)."""
        kill_run(self.run_dir)

    # -- reading -------------------------------------------------------------------------------

    def _take(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for ev in events:
            self.state.take(ev)
        return events

    def _connect(self) -> None:
        try:
            self._client = Client.connect(self.run_dir, timeout=1.0)
        except ChannelError:
            self._client = None
        self._next_connect = time.monotonic() + 0.5

    def _poll(self, timeout: float) -> list[dict[str, Any]]:
        if self._detached:
            return []
        client = self._client
        if client is not None:
            out = []
            for frame in client.events(timeout):
                if isinstance(frame.get("at"), int) and frame["at"] >= self._reader.offset:
                    out.append(frame["event"])
                    self._reader.offset = max(self._reader.offset, int(frame.get("end") or 0))
            self._take(out)
            if client.closed.is_set():  # the trainer ended (or dropped us): the file has the rest
                self._client = None
                out += self._take(self._reader.read_new())
                if not self.ended:
                    out += self._check_liveness()
            return out
        out = self._take(self._reader.read_new())
        if not self.ended:
            out += self._check_liveness()
            if not self.ended and self._live is not None and self._live.alive \
                    and time.monotonic() >= self._next_connect:
                self._connect()
                if self._client is not None:
                    out += self._take(self._reader.read_new(self._client.offset))
        if not out and timeout > 0:
            time.sleep(timeout)
        return out

    def _gone(self) -> bool:
        """Whether the trainer is certainly gone (the run's record says so on this host)."""
        return self._live is not None and self._live.dead

    def _check_liveness(self) -> list[dict[str, Any]]:
        """Look at the trainer; when it is gone, take its end from the file or write it."""
        self._live = liveness(self.run_dir)
        if not self._gone():
            return []
        out = self._take(self._reader.read_new())  # a final event written just before it ended
        if self.ended:
            return out
        written = self._record_death()
        if written is not None:
            self._reader.read_new()  # step over the line just written
            out += self._take([written])
        else:
            out += self._take(self._reader.read_new())  # another observer wrote it
        return out

    def _record_death(self) -> dict[str, Any] | None:
        return record_death(self.run_dir)


class RunHandle(Follower):
    """A run whose trainer this process started: a :class:`Follower` that also reaps the
    trainer process (in a thread, whether or not anyone follows it: no zombie is left) and
    knows its exit code. See :func:`start_run`."""

    def __init__(self, spec: RunSpec, process: subprocess.Popen[bytes]) -> None:
        self.spec = spec
        self._process = process
        self._exited = threading.Event()
        self._ended_at: float | None = None
        threading.Thread(target=self._reap, name=f"tunedeck-reap-{spec.name}", daemon=True).start()
        super().__init__(spec.run_dir)

    def _reap(self) -> None:
        self._process.wait()
        self._exited.set()

    @property
    def exit_code(self) -> int | None:
        return self._process.returncode if self._exited.is_set() else None

    @property
    def ended(self) -> bool:
        """The run has ended and its trainer process is gone."""
        return self.state.ended and self._exited.is_set()

    def wait(self, timeout: float | None = None) -> str:
        status = super().wait(timeout)
        if self.state.ended:
            self._exited.wait(None if timeout is None else max(0.0, timeout))
        return status

    def _gone(self) -> bool:
        return self._exited.is_set() or super()._gone()

    def _record_death(self) -> dict[str, Any] | None:
        if not self._exited.wait(5.0):  # the run's reporter is gone; its launcher tears the rest down
            return None
        return record_death(self.run_dir, self._process.returncode)

    def _poll(self, timeout: float) -> list[dict[str, Any]]:
        out = super()._poll(timeout)
        if self.state.ended and not self._exited.is_set():
            if self._ended_at is None:
                self._ended_at = time.monotonic()
            self._exited.wait(min(timeout, 0.2))
            if not self._exited.is_set() and time.monotonic() - self._ended_at > EXIT_GRACE_S:
                kill_run(self.run_dir)  # it said its last word long ago and hangs on exit
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except OSError:
                    pass
        return out


def _answer(name: str, action: str, ack: dict[str, Any]) -> str:
    message = str(ack.get("message") or "")
    if not ack.get("taken"):
        raise UserError(f"{name}: {message or f'{action} refused'}")
    return message


def send_control(run_dir: str | os.PathLike[str], action: str, timeout: float = CONNECT_S) -> str:
    """Ask a run's trainer to stop, save or abort; returns once it has taken the request
    (its answer). Raises UserError when the run is not going or cannot be reached."""
    run_dir = Path(run_dir)
    if action not in CONTROLS:
        raise UserError(f"{action!r}: the controls are {', '.join(CONTROLS)}")
    deadline = time.monotonic() + timeout
    why = ""
    while True:
        live = liveness(run_dir)
        if live.state == "unknown":
            raise UserError(f"{run_dir.name} trains on {live.host}; send controls from that machine")
        if not live.alive:
            raise UserError(f"{run_dir.name} is not running; nothing to {action}")
        try:
            client = Client.connect(run_dir, timeout=2.0, keep=0)
        except ChannelError as exc:
            why = str(exc)
        else:
            try:
                return _answer(run_dir.name, action, client.control(action))
            except ChannelError as exc:
                why = str(exc)
            finally:
                client.close()
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # a trainer that is still starting: its channel opens in a moment
    if action == "abort" and live.pid is not None:
        try:
            os.kill(live.pid, signal.SIGUSR1)  # the trainer aborts on SIGUSR1, even while it loads the model
            return "abort signalled (the trainer's channel did not answer)"
        except OSError as exc:
            why = exc.strerror or str(exc)
    raise UserError(f"{run_dir.name}: cannot reach its trainer ({why}); see {run_dir / LOG_FILE}")


def kill_run(run_dir: str | os.PathLike[str]) -> None:
    """SIGKILL every live process of a run on this host: its trainer, every rank, and the
    launcher's process group."""
    run_dir = Path(run_dir)
    record = read_record(run_dir) or {}
    if liveness(run_dir).state == "unknown":
        return
    if isinstance(record.get("pid"), int):
        kill_if_alive(record["pid"], record.get("start"))
    for pid, start in rank_processes(run_dir).values():
        kill_if_alive(pid, start)
    leader = record.get("leader")
    if isinstance(leader, int) and process_alive(leader, record.get("leader_start")):
        try:
            os.killpg(leader, signal.SIGKILL)
        except OSError:
            pass


def attach(run: str | os.PathLike[str], runs_dir: str | os.PathLike[str] | None = None) -> Follower:
    """Follow a run given as its folder, or as its name in ``runs_dir``. Raises UserError."""
    path = Path(run)
    if not (path / EVENTS_FILE).is_file() and runs_dir is not None and (Path(runs_dir) / str(run)).is_dir():
        path = Path(runs_dir) / str(run)
    if not path.is_dir():
        where = f" in {runs_dir}" if runs_dir is not None else ""
        raise UserError(f"{run}: no such run folder{where}; give a run folder (runs/NAME) or see `tunedeck runs`")
    if not (path / EVENTS_FILE).is_file():
        raise UserError(f"{path}: not a run folder (it has no {EVENTS_FILE})")
    return Follower(path)

