"""Chat with a base model and runs' adapters: what the engine process holds and runs.

One copy of the base weights: :class:`ChatState` loads the base model once, loads each
run's adapter onto it by name (``PeftModel.load_adapter``), and any two of {base, run A,
run B, ...} are compared on the same weights in memory. A run trained on another base
model replaces the base (its adapters go with it). The base is held in full precision
(bf16 on a GPU, fp32 on a CPU); a QLoRA run's adapter is applied to it as it is to the
merged model (:mod:`tunedeck.core.merge`), not to 4-bit weights.

Each answer uses the chat template and the system prompt the run trained with: the
template saved with the run's adapter (the trainer writes the one it rendered with), and
``dataset.system_prompt`` of the run's project snapshot. "base" uses those of the run it
is compared with, or the project's when it is compared with nothing trained.

Both panes answer at once (:meth:`ChatState.answer_all`): their prompts go through the
model as one batch whose rows use different adapters (peft's mixed-adapter batches,
``adapter_names=[...]`` with ``"__base__"`` for the base), so the time to both answers is
about that of one. The decode loop is tunedeck's own, with the key/value cache, and keeps
each row's answer what that model gives alone:

- prompts of different lengths (different system prompts or templates) are left-padded,
  with the attention mask and position ids of each row's own tokens;
- each row goes through the logits processors ``generate`` would apply (repetition
  penalty, min_new_tokens, then temperature, top_k, top_p) on its own tokens only, and
  samples with a ``torch.Generator`` of its own seeded from the settings, so a greedy or
  seeded answer is the same as that model alone gives, here, in ``tunedeck chat`` and from
  the merged model;
- each row stops at its own end-of-turn / eos ids or ``max_new_tokens`` and leaves the
  batch (and the cache) then, and each pane's tokens/s counts to its own last token.

Text streams per row: each row's new tokens are decoded as they come and handed, piece by
piece, to a callback with the row's index (the engine sends them to that pane), and the
cancel event is checked after every token, so Esc stops both answers within a token. A
single answer (:meth:`ChatState.answer`) is a batch of one through the same loop, with the
adapter switched on by ``set_adapter`` (or off, for "base").

Two answers cannot share a batch when the two models are on different base models (one
base is held at a time), or when an adapter is DoRA (peft's mixed batches do not take
DoRA): then they are generated one after the other, each alone, the base already loaded
going first.

The CLI (``tunedeck chat``) uses the same :class:`ChatState` in its own process.
Imports torch, transformers and peft only inside its methods: importing this module is
light (the UI reads :class:`GenSettings` and the saved settings from it), but answering
happens in the engine or CLI process only, never the UI.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UserError, first_line
from .runs import ADAPTER, SNAPSHOT

BASE = "base"


# -- generation settings ---------------------------------------------------------------------------


@dataclass
class GenSettings:
    """How answers are sampled. ``greedy`` (or temperature 0) picks the likeliest token each
    time: the exact, repeatable answer for comparisons."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    seed: int = 0
    greedy: bool = False
    min_new_tokens: int = 0

    LIMITS = {
        "temperature": (0.0, 5.0), "top_p": (0.0, 1.0), "top_k": (0, 100_000), "max_new_tokens": (1, 32_768),
        "repetition_penalty": (0.5, 5.0), "seed": (0, 2**32 - 1), "min_new_tokens": (0, 32_768),
    }

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> GenSettings:
        """Settings from plain values; a bad one raises UserError naming it and its range."""
        settings = cls()
        known = {f.name: f for f in fields(cls)}
        for key, value in (values or {}).items():
            if key not in known:
                raise UserError(f"generation setting {key!r}: unknown; use {', '.join(known)}")
            if key == "greedy":
                if isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                settings.greedy = bool(value)
                continue
            kind = int if known[key].type in ("int", int) else float
            try:
                number = kind(value)
            except (TypeError, ValueError):
                raise UserError(f"generation setting {key} = {value!r}: not a number") from None
            low, high = cls.LIMITS[key]
            if not low <= number <= high:
                raise UserError(f"generation setting {key} = {value!r}: must be between {low:g} and {high:g}")
            setattr(settings, key, number)
        return settings

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sampling(self) -> bool:
        return not self.greedy and self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sampling,
                                  "repetition_penalty": self.repetition_penalty}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # no sampling settings: transformers warns about unused ones
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def _settings_key(project_path: str | Path) -> str:
    """A project's key in the user config's ``chat_settings`` table: its file's absolute path."""
    return str(Path(project_path).expanduser().resolve())


def saved_settings(project_path: str | Path | None) -> GenSettings:
    """The generation settings last applied on this project's Chat screen; the defaults for
    a project never tuned (or without a file yet). A stored value that no longer fits is
    left at its default: the user config holds preferences, never a reason to fail."""
    from .paths import user_config

    if project_path is None:
        return GenSettings()
    stored = user_config().chat_settings.get(_settings_key(project_path), {})
    settings = GenSettings()
    for key, value in stored.items():
        try:
            setattr(settings, key, getattr(GenSettings.from_dict({key: value}), key))
        except UserError:
            continue
    return settings


def save_settings(project_path: str | Path, settings: GenSettings) -> None:
    """Keep ``settings`` for this project (the user config, atomically written)."""
    from .paths import update_user_config, user_config

    table = user_config().chat_settings
    table[_settings_key(project_path)] = settings.as_dict()
    update_user_config(chat_settings=table)


# -- what a pane talks to ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A model a pane talks to: the base, or a run's adapter on it, with the template and the
    system prompt to use."""

    label: str  # "base" or the run's name
    base_path: str  # the base model's folder (resolved), the key of the loaded base
    trust_remote_code: bool
    allow_pickle: bool
    adapter: str | None  # the run's adapter folder; None for the base
    template_name: str  # model.chat_template of the run / project
    template_file: str | None  # the template the run trained with (saved with its adapter)
    system_prompt: str
    source: str  # model.source as written (for messages)


def run_folder(value: str | Path, runs_dir: Path | None = None) -> Path:
    """A run folder from a path, or from a run's name in ``runs_dir``; one line if neither."""
    path = Path(value).expanduser()
    if path.is_dir() and ((path / SNAPSHOT).is_file() or (path / ADAPTER).is_dir()):
        return path
    if runs_dir is not None and "/" not in str(value):
        candidate = runs_dir / str(value)
        if candidate.is_dir():
            return candidate
        names = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
        known = f"; runs there: {', '.join(names[:8])}" if names else ""
        raise UserError(f"run {value!r}: no such run folder in {runs_dir}{known} (see `tunedeck runs`)")
    raise UserError(f"run {value!r}: no such run folder; give a run folder (runs/NAME) or a run name "
                    "(see `tunedeck runs`)")


def check_adapter(run_dir: Path) -> Path:
    """The run's adapter folder, checked; one clear line when it is missing or broken."""
    adapter = Path(run_dir) / ADAPTER
    name = Path(run_dir).name
    if not adapter.is_dir():
        raise UserError(f"run {name}: no adapter folder ({adapter}); the run has not finished — train it to the "
                        "end, or stop it (a stopped run saves its adapter)")
    config = adapter / "adapter_config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"run {name}: {config} is missing; the adapter folder is incomplete — train the run "
                        "again or copy the adapter back") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"run {name}: {config} is unreadable ({exc.__class__.__name__}); the adapter folder is "
                        "broken — train the run again") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise UserError(f"run {name}: {config} is not a PEFT adapter config (no peft_type)")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"run {name}: {adapter} has no adapter_model.safetensors; the adapter folder is "
                        "incomplete — train the run again")
    return adapter


@dataclass(frozen=True)
class StartAdapter:
    """``model.adapter``: the finished run's adapter a run starts from, and its LoRA settings."""

    adapter: Path  # the adapter folder (standard PEFT layout)
    run_dir: Path | None  # the run it came from (None: a bare adapter folder)
    lora: dict[str, Any]  # its settings as [lora] values


def start_adapter(project: Any) -> StartAdapter | None:
    """The adapter ``model.adapter`` names (a run's name in the runs folder, a run folder, or
    an adapter folder), checked: finished, a LoRA adapter, trained on the project's base
    model. None when the key is empty; UserError (one line) for what does not fit."""
    from .models import resolve_source

    value = project["model.adapter"]
    if not value:
        return None
    key = f"model.adapter = {value!r}"
    path = project.resolve_path(value)
    run_dir: Path | None
    if path.is_dir() and (path / "adapter_config.json").is_file():
        adapter = path
        run_dir = path.parent if (path.parent / SNAPSHOT).is_file() and path.name == ADAPTER else None
        if run_dir is not None:
            check_adapter(run_dir)
    else:
        try:
            run_dir = run_folder(path if path.is_dir() else value, project.resolve_path(project["output.runs_dir"]))
            adapter = check_adapter(run_dir)
        except UserError as exc:
            raise UserError(f"{key}: {exc.message}") from None
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{key}: {adapter / 'adapter_config.json'} is unreadable ({exc.__class__.__name__})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UserError(f"{key}: {adapter} is not a LoRA adapter (peft_type {config.get('peft_type')!r}); "
                        "tunedeck trains LoRA adapters")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"{key}: {adapter} has no adapter_model.safetensors (tunedeck loads no pickle files)")
    if run_dir is not None and (run_dir / SNAPSHOT).is_file():
        snap = _load_project(run_dir / SNAPSHOT)
        theirs = resolve_source(snap["model.source"], snap.root, allow_pickle=True)
        ours = resolve_source(project["model.source"], project.root, allow_pickle=project["model.allow_pickle"])
        if _base_key(theirs) != _base_key(ours):
            raise UserError(f"{key}: run {run_dir.name} trained an adapter for {snap['model.source']} "
                            f"({theirs.display}), not for model.source = {project['model.source']!r}; set "
                            "model.source to its base model, or pick a run of this model")
    targets = config.get("target_modules")
    lora = {
        "r": int(config.get("r") or 8), "alpha": float(config.get("lora_alpha") or 8),
        "dropout": float(config.get("lora_dropout") or 0.0),
        "target_modules": sorted(targets) if isinstance(targets, list) else (targets or "all-linear"),
        "bias": config.get("bias") or "none", "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")), "modules_to_save": list(config.get("modules_to_save") or []),
    }
    return StartAdapter(adapter, run_dir, lora)


def _load_project(path: Path, text: str | None = None) -> Any:
    from .project import Project

    if text is not None:
        return Project.from_text(text, path)
    return Project.load(path)


def target_for(model: str, *, project: Any = None, partner: str | None = None,
               runs_dir: Path | None = None) -> Target:
    """The :class:`Target` for a pane's model: ``"base"`` or a run (folder or name).

    "base" takes its settings from ``partner`` when that is a run (the run's base, template
    and system prompt), else from ``project``.
    """
    from .models import resolve_source

    if model == BASE:
        if partner and partner != BASE:
            base_of = _run_target(partner, runs_dir, with_adapter=False)
            return Target(BASE, base_of.base_path, base_of.trust_remote_code, base_of.allow_pickle, None,
                          base_of.template_name, base_of.template_file, base_of.system_prompt, base_of.source)
        if project is None:
            raise UserError("chat with the base model needs a project (its model.source)")
        ref = resolve_source(project["model.source"], project.root, allow_pickle=project["model.allow_pickle"])
        return Target(BASE, _base_key(ref), project["model.trust_remote_code"], project["model.allow_pickle"],
                      None, project["model.chat_template"], None, project["dataset.system_prompt"],
                      project["model.source"])
    return _run_target(model, runs_dir, with_adapter=True)


def _run_target(model: str, runs_dir: Path | None, *, with_adapter: bool) -> Target:
    """A run's target; ``with_adapter=False``: only its base, template and system prompt (the
    adapter is not needed, so a broken one does not stop "base" from answering)."""
    from .models import resolve_source

    run_dir = run_folder(model, runs_dir)
    snapshot_path = run_dir / SNAPSHOT
    if not snapshot_path.is_file():
        raise UserError(f"run {run_dir.name}: {snapshot_path} is missing; it is not a tunedeck run folder")
    snap = _load_project(snapshot_path)
    adapter = check_adapter(run_dir) if with_adapter else run_dir / ADAPTER
    ref = resolve_source(snap["model.source"], snap.root, allow_pickle=snap["model.allow_pickle"])
    template_file = adapter / "chat_template.jinja"
    return Target(run_dir.name, _base_key(ref), snap["model.trust_remote_code"], snap["model.allow_pickle"],
                  str(adapter), snap["model.chat_template"], str(template_file) if template_file.is_file() else None,
                  snap["dataset.system_prompt"], snap["model.source"])


def _base_key(ref: Any) -> str:
    """A base model's identity: its resolved folder (the default model: its cache folder)."""
    from .models import model_folder

    if ref.kind == "gguf":
        return str(ref.path.resolve())
    return str(model_folder(ref)[0].resolve())


def prompt_messages(target: Target, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation as the run trained on it: its system prompt first (when it has one and
    the conversation does not), as :func:`tunedeck.core.datafile.to_messages` adds it."""
    out = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if not out:
        raise UserError("nothing to answer: the conversation is empty")
    if target.system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": target.system_prompt})
    return out


# -- the engine's chat state -----------------------------------------------------------------------


@dataclass
class Answer:
    model: str
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    cancelled: bool = False

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens else None

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "text": self.text, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "cancelled": self.cancelled}


class ChatState:
    """One base model with runs' adapters loaded by name; answers for any of them."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self.base_path: str | None = None
        self.model: Any = None  # the base, or a PeftModel around it once an adapter is loaded
        self.tokenizer: Any = None
        self.adapters: dict[str, tuple[str, float]] = {}  # adapter folder -> (adapter name, file mtime)
        self._templates: dict[tuple[str, str | None], str] = {}
        self._names = 0
        self.placed = ""  # where the base model went, and why
        self.lock = threading.Lock()

    # -- loading ----------------------------------------------------------------------------------

    def _ensure_base(self, target: Target) -> None:
        if self.base_path == target.base_path and self.model is not None:
            return

        from .models import load_model, load_tokenizer, resolve_source

        self.release()
        path = Path(target.base_path)
        ref = resolve_source(str(path), None, allow_pickle=target.allow_pickle)
        dtype, device_map, max_memory = self._place(ref)
        model = load_model(ref, dtype=dtype, trust_remote_code=target.trust_remote_code,
                           allow_pickle=target.allow_pickle, device_map=device_map,
                           **({"max_memory": max_memory} if max_memory else {}))
        model.eval()
        self.tokenizer = load_tokenizer(ref, trust_remote_code=target.trust_remote_code)
        self.model = model
        self.base_path = target.base_path

    def _place(self, ref: Any) -> tuple[Any, Any, dict[Any, int] | None]:
        """(dtype, device_map, max_memory) for the base model: the GPU with the most free
        memory, or spread over several when it is larger than one, or the CPU; bf16 where
        that GPU has it natively (compute capability 8.0), else fp16, as training decides."""
        import torch

        from .hardware import placement, scan
        from .models import describe

        hw = scan()
        if self.device is not None:  # asked for (tests, --cpu)
            if not self.device.startswith("cuda"):
                return torch.float32, {"": self.device}, None
            index = int(self.device.partition(":")[2] or 0)
            native = index < len(hw.gpus) and hw.gpus[index].bf16
            return (torch.bfloat16 if native else torch.float16), {"": self.device}, None
        half = torch.bfloat16 if hw.gpus and all(g.bf16 for g in hw.gpus) else torch.float16
        params = describe(ref).params
        where = placement(2 * params if params else None, hardware=hw) if torch.cuda.is_available() else None
        if where is None or where.device == "cpu":
            self.placed = where.why if where is not None else "on the CPU"
            return torch.float32, {"": "cpu"}, None
        if where.gpu is not None and where.device_map != "auto":
            half = torch.bfloat16 if where.gpu.bf16 else torch.float16
        self.placed = where.why
        return half, where.device_map, where.max_memory

    def release(self) -> None:
        """Let go of the base model and its adapters, and give their GPU memory back (before
        a run trains on the same GPU, and before a merge)."""
        import gc

        had = self.model is not None
        self.model = self.tokenizer = None
        self.base_path = None
        self.adapters.clear()
        self._templates.clear()
        if had:
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass

    def _ensure_adapter(self, target: Target) -> str:
        """Load the target's adapter (once; again if its file changed); returns its name."""
        from peft import PeftModel

        folder = str(target.adapter)
        weights = Path(folder) / "adapter_model.safetensors"
        try:
            stamp = weights.stat().st_mtime
        except OSError:
            raise UserError(f"run {target.label}: {weights} is missing; the adapter folder is incomplete") from None
        known = self.adapters.get(folder)
        if known is not None and known[1] == stamp:
            return known[0]
        if known is not None:  # retrained since: load it again
            self.model.delete_adapter(known[0])
            del self.adapters[folder]
        self._names += 1
        name = f"run{self._names}"
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(folder, adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False)
        except Exception as exc:  # a bad safetensors file, shapes of another model, a bad config value
            raise UserError(f"run {target.label}: its adapter in {folder} does not load onto "
                            f"{target.source} ({exc.__class__.__name__}: {first_line(exc)})") from None
        self.model.eval()
        self.adapters[folder] = (name, stamp)
        return name

    def template(self, target: Target) -> str:
        """The chat template text for ``target`` (the run's own file, else the named/model's one)."""
        from .render import resolve_chat_template

        key = (target.template_name, target.template_file)
        if key not in self._templates:
            if target.template_file:
                text = Path(target.template_file).read_text(encoding="utf-8")
            else:
                text = resolve_chat_template(self.tokenizer, target.template_name,
                                             model_label=f"model {target.source}")
            self._templates[key] = text
        return self._templates[key]

    def prepare(self, target: Target) -> str | None:
        """Load what ``target`` needs; returns its adapter name (None for the base)."""
        self._ensure_base(target)
        return self._ensure_adapter(target) if target.adapter else None

    # -- answering ----------------------------------------------------------------------------------

    def stop_ids(self, template: str) -> list[int]:
        """eos, and the end-of-turn markers the template uses that are single tokens."""
        from .render import END_MARKERS

        tok = self.tokenizer
        ids: list[int] = []
        eos = tok.eos_token_id
        if isinstance(eos, int):
            ids.append(eos)
        vocab = tok.get_vocab()
        for marker in END_MARKERS:
            if marker in template and marker in vocab and vocab[marker] not in ids:
                ids.append(vocab[marker])
        return ids

    def answer(self, target: Target, messages: Sequence[dict[str, str]], settings: GenSettings, *,
               cancel: threading.Event | None = None, on_text: Callable[[str, Answer], None] | None = None) -> Answer:
        """Generate one answer from ``target`` to the conversation ``messages`` (the last turn
        is the user's), alone. ``on_text(piece, answer)`` gets the text as it is decoded (and
        the answer so far). A problem with the target raises :class:`UserError`."""
        forward = None if on_text is None else (lambda index, piece, answer: on_text(piece, answer))
        result = self.answer_all([(target, messages)], settings, cancel=cancel, on_text=forward, together=False)
        if result.errors[0] is not None:
            raise UserError(result.errors[0])
        return result.answers[0]  # type: ignore[return-value]

    def answer_all(self, asks: Sequence[tuple[Target, Sequence[dict[str, str]]]], settings: GenSettings, *,
                   cancel: threading.Event | None = None,
                   on_text: Callable[[int, str, Answer], None] | None = None, together: bool = True) -> Answers:
        """Answers to several conversations, one per pane: ``asks`` holds each pane's
        (target, messages). Those on the loaded base model are generated at once, as one
        batch (``together=False``: one after the other); see the module's docstring.

        ``on_text(index, piece, answer)`` gets each pane's text as its row produces it. A
        pane whose target cannot answer (its adapter does not load, its template cannot
        render the conversation) gets its one-line error in ``errors``; the others answer.
        """
        cancel = cancel or threading.Event()
        count = len(asks)
        result = Answers([None] * count, [None] * count, together=False)
        with self.lock:
            groups: dict[str, list[int]] = {}
            for index, (target, _) in enumerate(asks):
                groups.setdefault(target.base_path, []).append(index)
            # the base already loaded goes first: one load fewer
            order = sorted(groups, key=lambda path: path != self.base_path)
            for path in order:
                indices = groups[path]
                if cancel.is_set():
                    for index in indices:
                        result.answers[index] = Answer(asks[index][0].label, cancelled=True)
                    continue
                try:
                    self._ensure_base(asks[indices[0]][0])
                except UserError as exc:
                    for index in indices:
                        result.errors[index] = exc.message
                    continue
                rows: list[_Row] = []
                for index in indices:
                    try:
                        rows.append(self._row(index, *asks[index], settings))
                    except UserError as exc:
                        result.errors[index] = exc.message
                if together and len(rows) > 1 and self._mixable(rows):
                    self._decode(rows, settings, cancel, on_text)
                    result.together = True
                else:
                    for row in rows:
                        if cancel.is_set():
                            row.answer.cancelled = True
                            continue
                        self._decode([row], settings, cancel, on_text)
                for row in rows:
                    result.answers[row.index] = row.answer
        return result

    # -- the decode loop ------------------------------------------------------------------------

    def _row(self, index: int, target: Target, messages: Sequence[dict[str, str]], settings: GenSettings) -> _Row:
        """A pane's prompt, rendered and tokenized, its adapter loaded (with the base loaded)."""
        name = self._ensure_adapter(target) if target.adapter else None
        template = self.template(target)
        tok = self.tokenizer
        try:
            text = tok.apply_chat_template(prompt_messages(target, messages), chat_template=template,
                                           tokenize=False, add_generation_prompt=True)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"the chat template cannot render this conversation ({first_line(exc)})") from None
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        if not prompt:
            raise UserError("the chat template rendered this conversation as nothing to answer")
        return _Row(index=index, name=name, prompt=list(prompt), stops=self.stop_ids(template),
                    answer=Answer(target.label))

    def _mixable(self, rows: Sequence[_Row]) -> bool:
        """Whether these rows can share a batch: peft's mixed-adapter batches take no DoRA."""
        configs = getattr(self.model, "peft_config", {})
        return not any(row.name is not None and getattr(configs.get(row.name), "use_dora", False) for row in rows)

    def _decode(self, rows: list[_Row], settings: GenSettings, cancel: threading.Event,
                on_text: Callable[[int, str, Answer], None] | None) -> None:
        """Generate the rows' answers as one batch, token by token with the key/value cache."""
        import inspect

        import torch
        from peft import PeftModel

        model, tok = self.model, self.tokenizer
        device = model.device
        lm = model.get_base_model() if isinstance(model, PeftModel) else model
        params = inspect.signature(lm.forward).parameters
        cache_name = "cache" if "cache" in params else "past_key_values"
        fixed: dict[str, Any] = {"use_cache": True}
        if "logits_to_keep" in params:
            fixed["logits_to_keep"] = 1
        # a batch of one switches its adapter on (or off, for base), as peft runs one model;
        # a batch of several names each row's adapter (peft's mixed-adapter batch): the names
        # reach every adapted layer through a hook put on once for the whole answer, rather
        # than by ``adapter_names=`` to each forward (peft then hooks every layer anew per token)
        context: Any = _nothing()
        names: list[str] | None = None
        if isinstance(model, PeftModel):
            if len(rows) == 1:
                if rows[0].name is None:
                    context = model.disable_adapter()
                else:
                    model.set_adapter(rows[0].name)
            else:
                names = [row.name or "__base__" for row in rows]
                context = _AdapterNames(model, names)

        width = max(len(row.prompt) for row in rows)
        pad = tok.pad_token_id
        if pad is None:
            pad = next((row.stops[0] for row in rows if row.stops), 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt, dtype=torch.long)
            mask[i, width - len(row.prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = bool((mask == 0).any())
        if padded:  # each row counts positions from its own first token
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:  # no padding: no mask, as generate() drops an all-ones one
            positions = torch.arange(width, dtype=torch.long, device=device).unsqueeze(0).expand(len(rows), -1)
        attention: Any = mask if padded else None
        for row in rows:
            row.start(settings, device, tok)
        live = list(rows)  # the rows still generating, in batch order
        if cancel.is_set():
            for row in rows:
                row.answer.cancelled = True
            return
        started = time.perf_counter()
        with torch.inference_mode(), context:
            out = model(input_ids=ids, attention_mask=attention, position_ids=positions, **fixed)
            while True:
                cache = getattr(out, cache_name, None)
                if cache is None:
                    cache = getattr(out, "past_key_values", None)
                logits = out.logits[:, -1, :].to(dtype=torch.float32)
                tokens = [row.pick(logits[i:i + 1]) for i, row in enumerate(live)]
                now = time.perf_counter() - started
                for row, token in zip(live, tokens):
                    row.take(token, now, settings, on_text)
                if cancel.is_set():
                    for row in live:
                        row.finish(on_text)
                    break
                keep = [i for i, row in enumerate(live) if not row.done]
                if not keep:
                    break
                step = torch.tensor([[tokens[i]] for i in keep], dtype=torch.long, device=device)
                if len(keep) < len(live):  # a row ended: it leaves the batch and the cache
                    picked = torch.tensor(keep, dtype=torch.long, device=device)
                    if hasattr(cache, "batch_select_indices"):
                        cache.batch_select_indices(picked)
                        if attention is not None:
                            attention = attention[picked]
                        positions = positions[picked]
                        if names is not None:
                            names[:] = [names[i] for i in keep]
                        live = [live[i] for i in keep]
                    else:  # a cache that cannot drop rows: the ended row runs on, unread
                        step = torch.tensor([[t] for t in tokens], dtype=torch.long, device=device)
                        live = [row if not row.done else row.as_ghost() for row in live]
                positions = positions[:, -1:] + 1
                if attention is not None:
                    attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=-1)
                out = model(input_ids=step, attention_mask=attention, position_ids=positions,
                            **{cache_name: cache}, **fixed)


@dataclass
class Answers:
    """What :meth:`ChatState.answer_all` gives: per pane its answer or its one-line error,
    and whether the answers shared a batch."""

    answers: list[Answer | None]
    errors: list[str | None]
    together: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"answers": [a.as_dict() if a is not None else None for a in self.answers], "errors": self.errors,
                "together": self.together}


@dataclass
class _Row:
    """One pane's answer in a batch: its prompt, adapter, stop ids, sampling and decoding state."""

    index: int
    name: str | None  # the adapter's name; None for the base
    prompt: list[int]
    stops: list[int]
    answer: Answer
    done: bool = False
    ghost: bool = False  # ended, but still in a batch that cannot drop it
    _seq: Any = None  # the row's own tokens (prompt and answer), for the logits processors
    _processors: Any = None
    _generator: Any = None
    _sampling: bool = False
    _ids: list[int] | None = None
    _sent: int = 0
    _tok: Any = None

    def start(self, settings: GenSettings, device: Any, tok: Any) -> None:
        """The logits processors ``generate`` applies for these settings, in its order, and a
        generator seeded from the settings (the row samples from it alone)."""
        import torch
        from transformers import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self._tok = tok
        self._ids = []
        self._seq = torch.tensor([self.prompt], dtype=torch.long, device=device)
        processors = LogitsProcessorList()
        if settings.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if settings.min_new_tokens > 0 and self.stops:
            processors.append(MinNewTokensLengthLogitsProcessor(len(self.prompt), settings.min_new_tokens,
                                                                self.stops, device=device))
        self._sampling = settings.sampling
        if self._sampling:
            if settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k != 0:
                processors.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=1))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=settings.top_p, min_tokens_to_keep=1))
            self._generator = torch.Generator(device=device).manual_seed(settings.seed)
        self._processors = processors

    def pick(self, logits: Any) -> int:
        """The row's next token from its logits (1 x vocab)."""
        import torch

        if self.ghost:
            return self._ids[-1] if self._ids else self.prompt[-1]  # type: ignore[index]
        seq = self._seq.to(logits.device)
        scores = self._processors(seq, logits) if self._processors else logits
        if self._sampling:
            generator = self._generator
            if generator.device != scores.device:  # a model spread over GPUs: logits on the last one
                generator = self._generator = torch.Generator(device=scores.device).manual_seed(generator.initial_seed())
            probs = torch.nn.functional.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, num_samples=1, generator=generator)[0, 0])
        return int(torch.argmax(scores, dim=-1)[0])

    def take(self, token: int, seconds: float, settings: GenSettings,
             on_text: Callable[[int, str, Answer], None] | None) -> None:
        """Add the row's new token; stream the text it completes; end at a stop id or the limit."""
        import torch

        if self.ghost or self.done:
            return
        ids = self._ids
        assert ids is not None
        ids.append(token)
        self._seq = torch.cat([self._seq, self._seq.new_tensor([[token]])], dim=-1)
        answer = self.answer
        answer.tokens = len(ids)
        answer.seconds = seconds
        self.done = token in self.stops or len(ids) >= settings.max_new_tokens
        decoded = self._tok.decode(ids, skip_special_tokens=True)
        if not self.done and decoded.endswith("\ufffd"):
            return  # a character cut in two tokens: wait for the rest
        piece = decoded[self._sent:]
        self._sent = len(decoded)
        answer.text = decoded
        if piece and on_text is not None:
            on_text(self.index, piece, answer)

    def finish(self, on_text: Callable[[int, str, Answer], None] | None) -> None:
        """Stopped (cancelled): the text so far, to its last token."""
        if self.ghost or self.done:
            return
        self.done = True
        self.answer.cancelled = True
        decoded = self._tok.decode(self._ids or [], skip_special_tokens=True)
        piece = decoded[self._sent:]
        self._sent = len(decoded)
        self.answer.text = decoded
        if piece and on_text is not None:
            on_text(self.index, piece, self.answer)

    def as_ghost(self) -> _Row:
        self.ghost = True
        return self


class _AdapterNames:
    """While it is entered, every adapted layer of ``model`` (peft's LoRA layers and the
    modules it saves whole) runs a mixed-adapter batch: row i with adapter ``names[i]``
    ("__base__": none). ``names`` is read at each forward, so rows can leave the batch."""

    def __init__(self, model: Any, names: list[str]) -> None:
        self.model = model
        self.names = names
        self.handles: list[Any] = []

    def __enter__(self) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        def inject(module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            kwargs["adapter_names"] = self.names
            return args, kwargs

        for module in self.model.modules():
            if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                self.handles.append(module.register_forward_pre_hook(inject, with_kwargs=True))

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- eval prompts ----------------------------------------------------------------------------------


def eval_items(project: Any, prompts_file: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Prompts to compare on, each ``{"messages": [...], "reference": str | None}``: the eval
    split's rows (the conversation up to its last answer, and that answer as the reference;
    for preference pairs the prompt, the chosen answer as the reference and the rejected one
    as ``rejected``), or a prompts file (a dataset file in any format tunedeck reads, or a .txt with one
    prompt per line)."""
    from .datafile import load_messages, load_splits

    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_absolute() and project is not None:
            path = project.root / path
        if not path.is_file():
            raise UserError(f"prompts file {prompts_file}: no such file")
        if path.suffix.lower() == ".txt":
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"prompts file {path}: unreadable ({exc.__class__.__name__})") from None
            items = [{"messages": [{"role": "user", "content": line.strip()}], "reference": None}
                     for line in lines if line.strip()]
        else:
            try:
                rows, _ = load_messages(path)
            except UserError as exc:  # pairs: their prompts, the chosen answer as the reference
                if "preference data" not in exc.message:
                    raise
                rows, _ = load_messages(path, method="dpo")
            items = [_split_row(m) for _, m in rows]
    else:
        splits = load_splits(project)
        if not splits.eval:
            raise UserError("the project has no eval split (dataset.eval_split = 0); set one, or give a prompts file")
        items = [_split_row(m) for _, m in splits.eval]
    items = [i for i in items if i["messages"]]
    if not items:
        raise UserError("no prompts to compare on")
    return items[:limit] if limit else items


def _split_row(messages: Any) -> dict[str, Any]:
    from .preference import Pair

    if isinstance(messages, Pair):  # the prompt; the chosen answer is the reference, the rejected one shown too
        return {"messages": list(messages.prompt), "reference": _answer_text(messages.chosen),
                "rejected": _answer_text(messages.rejected)}
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return {"messages": list(messages), "reference": None}
    return {"messages": list(messages[:last]), "reference": messages[last]["content"]}


def _answer_text(turns: list[dict[str, Any]]) -> str:
    return "\n\n".join(m["content"] for m in turns if m["role"] == "assistant" and m["content"])
