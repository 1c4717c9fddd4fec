"""Chat with a base model and runs' adapters: what the engine process holds and runs.

One copy of the base weights: :class:`ChatState` loads the base model once, loads each
run's adapter onto it by name (``PeftModel.load_adapter``) and switches between them with
``set_adapter``; "base" answers with the adapters disabled (peft's ``disable_adapter``).
So any two of {base, run A, run B, ...} are compared on the same weights in memory. A run
trained on another base model replaces the base (its adapters go with it). The base is
held in full precision (bf16 on a GPU, fp32 on a CPU); a QLoRA run's adapter is applied to
it as it is to the merged model (:mod:`tunedeck.core.merge`), not to 4-bit weights.

Each answer uses the chat template and the system prompt the run trained with: the
template saved with the run's adapter (the trainer writes the one it rendered with), and
``dataset.system_prompt`` of the run's project snapshot. "base" uses those of the run it
is compared with, or the project's when it is compared with nothing trained.

Generation streams: a streamer decodes the new tokens as they come and hands each piece
of text to a callback (the engine sends it to the UI), and a stopping criterion checks a
cancel event after every token, so Esc stops an answer within a token. Answers of the two
panes are generated one after the other, each as that model alone would give it: a seeded
or greedy answer is the same here, in ``tunedeck chat`` and from the merged model, and
each pane's tokens/s is its own. (A mixed-adapter batch would answer both at once, but
padding and a shared sampling stream make its answers differ from a model's own.)

The CLI (``tunedeck chat``) uses the same :class:`ChatState` in its own process.
Imports torch, transformers and peft: engine or CLI process only, never the UI.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UserError
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
                            f"{target.source} ({exc.__class__.__name__}: {_first_line(exc)})") from None
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
        is the user's). ``on_text(piece, answer)`` gets the text as it is decoded (and the answer so far)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        cancel = cancel or threading.Event()
        with self.lock:
            name = self.prepare(target)
            template = self.template(target)
            tok = self.tokenizer
            try:
                text = tok.apply_chat_template(prompt_messages(target, messages), chat_template=template,
                                               tokenize=False, add_generation_prompt=True)
            except Exception as exc:
                raise UserError(f"the chat template cannot render this conversation ({_first_line(exc)})") from None
            inputs = tok(text, add_special_tokens=False, return_tensors="pt").to(self.model.device)
            answer = Answer(target.label)
            started = time.perf_counter()

            class Stream(BaseStreamer):
                """Decodes new tokens into text as they come (holding back half a character)."""

                def __init__(self) -> None:
                    self.ids: list[int] = []
                    self.sent = 0
                    self.prompt_seen = False

                def put(self, value: Any) -> None:
                    if not self.prompt_seen:  # generate() hands over the prompt first
                        self.prompt_seen = True
                        return
                    self.ids.extend(int(t) for t in value.reshape(-1).tolist())
                    answer.tokens = len(self.ids)
                    self.flush(final=False)

                def end(self) -> None:
                    self.flush(final=True)

                def flush(self, final: bool) -> None:
                    decoded = tok.decode(self.ids, skip_special_tokens=True)
                    if not final and decoded.endswith("\ufffd"):
                        return  # a character cut in two tokens: wait for the rest
                    piece = decoded[self.sent:]
                    if piece or final:
                        self.sent = len(decoded)
                        answer.text = decoded
                        answer.seconds = time.perf_counter() - started
                        if on_text is not None and piece:
                            on_text(piece, answer)

            class Cancelled(StoppingCriteria):
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                    return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool,
                                      device=input_ids.device)

            kwargs = settings.generate_kwargs()
            stops = self.stop_ids(template)
            pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else None)
            if settings.sampling:
                torch.manual_seed(settings.seed)
            if cancel.is_set():
                answer.cancelled = True
                return answer
            context = self.model.disable_adapter() if name is None and self.adapters else _nothing()
            if name is not None:
                self.model.set_adapter(name)
            with torch.inference_mode(), context:
                self.model.generate(**inputs, **kwargs, eos_token_id=stops or None, pad_token_id=pad,
                                    streamer=Stream(), stopping_criteria=StoppingCriteriaList([Cancelled()]))
            answer.seconds = time.perf_counter() - started
            answer.cancelled = cancel.is_set()
            return answer


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else exc.__class__.__name__


# -- eval prompts ----------------------------------------------------------------------------------


def eval_items(project: Any, prompts_file: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Prompts to compare on, each ``{"messages": [...], "reference": str | None}``: the eval
    split's rows (the conversation up to its last answer, and that answer as the reference),
    or a prompts file (a dataset file in any format tunedeck reads, or a .txt with one
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
            rows, _ = load_messages(path)
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


def _split_row(messages: list[dict[str, str]]) -> dict[str, Any]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return {"messages": list(messages), "reference": None}
    return {"messages": list(messages[:last]), "reference": messages[last]["content"]}
