"""Merge a run's adapter into its base model: a standalone Hugging Face model folder.

:func:`merge_run` loads the run's base model unquantized (fp32, so the merge itself loses
nothing; a QLoRA run is merged into the full-precision base, not the 4-bit one it trained
on), puts the adapter on it, folds the LoRA weights in with peft's ``merge_and_unload``
and writes, to a folder that must be new or empty:

- ``model.safetensors`` (sharded when large) and ``config.json``, in the base model's own
  dtype (bf16 stays bf16);
- the tokenizer with the chat template the run trained with (``chat_template.jinja``);
- ``generation_config.json`` whose eos includes the template's end-of-turn token, so
  ``generate`` stops where the chat stops.

The folder loads with plain ``AutoModelForCausalLM.from_pretrained``: no peft, no tunedeck.
It is written to a temporary folder next to ``out`` and renamed into place, so a failed
merge leaves nothing half-written. Imports torch: engine or CLI process only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, first_line
from .runs import SNAPSHOT

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def check_out(out: Path) -> None:
    """``out`` must not exist, or be an empty folder; one line otherwise."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder is not empty; give a new or empty folder (nothing is "
                        "overwritten)")


@contextlib.contextmanager
def written_in_place(out: Path, what: str) -> Iterator[Path]:
    """A temporary folder next to ``out`` to write ``what`` into, renamed to ``out`` (new or
    empty: :func:`check_out`) when the block ends well and removed otherwise, so a failed or
    cancelled write leaves nothing half-written; a write that fails is one line (UserError)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked before)
        os.rename(tmp, out)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write {what} ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def merge_run(run_dir: Path, out: Path, *, cpu: bool = False,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Merge ``run_dir``'s adapter into its base and write the model to ``out``. Returns
    ``{"out", "run", "base", "dtype", "files", "params"}``. Raises UserError with one line."""
    say = progress or (lambda message: None)
    run_dir, out = Path(run_dir), Path(out).expanduser()
    check_out(out)
    m = merged_model(run_dir, cpu=cpu, progress=say)
    merged, ref, stored, device_map = m.model, m.ref, m.dtype, m.device_map
    tokenizer = m.tokenizer
    say(f"writing {out}")
    with written_in_place(out, "the merged model") as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _generation_config(merged, tokenizer).save_pretrained(str(tmp))
    files = sorted(p.name for p in out.iterdir())
    params = sum(p.numel() for p in merged.parameters())
    del merged, m
    _free_gpu_memory()
    say(f"merged {run_dir.name} into {out}")
    return {"out": str(out), "run": run_dir.name, "base": ref.display, "dtype": stored, "files": files,
            "params": params, "device": "cpu" if device_map == {"": "cpu"} else "cuda"}


@dataclass
class Merged:
    """A run's adapter merged into its base, in memory."""

    model: Any  # the merged transformers model, in the base's stored dtype
    tokenizer: Any  # with the chat template the run trained with
    project: Any  # the run's snapshot (tunedeck.core.project.Project)
    ref: Any  # the base model's files (tunedeck.core.models.ModelRef)
    dtype: str  # the base's stored dtype: "float32" | "float16" | "bfloat16"
    device_map: Any


def merged_model(run_dir: Path, *, cpu: bool = False, progress: Callable[[str], None] | None = None) -> Merged:
    """Load ``run_dir``'s base unquantized and merge its adapter in (on one GPU when there is
    room, else the CPU). Raises UserError with one line."""
    from .chat import check_adapter
    from .project import Project

    say = progress or (lambda message: None)
    run_dir = Path(run_dir)
    adapter = check_adapter(run_dir)
    snapshot = run_dir / SNAPSHOT
    if not snapshot.is_file():
        raise UserError(f"run {run_dir.name}: {snapshot} is missing; it is not a tunedeck run folder")
    project = Project.load(snapshot)

    import torch

    from .models import model_folder, resolve_source

    ref = resolve_source(project["model.source"], project.root, allow_pickle=project["model.allow_pickle"])
    trust = project["model.trust_remote_code"]
    stored = _stored_dtype(model_folder(ref)[0])
    device_map: Any = {"": "cpu"}
    if not cpu and torch.cuda.is_available():
        from .hardware import placement
        from .models import describe

        params = describe(ref).params
        where = placement(4 * params if params else None, spread=False)  # the base in fp32, on one GPU
        device_map = where.device_map
        say(f"merging {where.why}")
    try:
        merged = _merge(ref, adapter, run_dir, device_map, trust, project["model.allow_pickle"], stored, say)
    except torch.OutOfMemoryError:
        _free_gpu_memory()
        say("out of GPU memory while merging: merging on the CPU instead")
        device_map = {"": "cpu"}
        merged = _merge(ref, adapter, run_dir, device_map, trust, project["model.allow_pickle"], stored, say)
    tokenizer = _tokenizer(adapter, ref, trust, project["model.chat_template"])
    return Merged(merged, tokenizer, project, ref, stored, device_map)


def _merge(ref: Any, adapter: Path, run_dir: Path, device_map: Any, trust: bool, allow_pickle: bool, stored: str,
           say: Callable[[str], None]) -> Any:
    """The base in fp32 with the adapter merged in, cast to the base's stored dtype."""
    import torch
    from peft import PeftModel

    from .models import load_model

    where = "the CPU" if device_map == {"": "cpu"} else f"GPU {device_map['']}"
    say(f"loading {ref.display} unquantized (fp32) on {where}")
    base = load_model(ref, dtype=torch.float32, trust_remote_code=trust, allow_pickle=allow_pickle,
                      device_map=device_map)
    say(f"merging the adapter of {run_dir.name}")
    try:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise UserError(f"run {run_dir.name}: its adapter does not load onto {ref.display} "
                        f"({exc.__class__.__name__}: {first_line(exc)})") from None
    merged = model.merge_and_unload()
    merged = merged.to(getattr(torch, stored))
    merged.config.use_cache = True
    return merged


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stored_dtype(folder: Path) -> str:
    """The dtype the base model's weights are stored in (config.json), float32 when unknown."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(value).replace("torch.", ""), "float32")


def _tokenizer(adapter: Path, ref: Any, trust: bool, template_name: str) -> Any:
    """The tokenizer saved with the adapter (it has the chat template the run trained with),
    else the base's with the run's template set."""
    from transformers import AutoTokenizer

    from .models import load_tokenizer
    from .render import resolve_chat_template

    if (adapter / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=trust)
        except (OSError, ValueError):
            pass
    tok = load_tokenizer(ref, trust_remote_code=trust)
    try:
        tok.chat_template = resolve_chat_template(tok, template_name, model_label=f"model {ref.display}")
    except UserError:
        pass  # a text-only run: no template to write
    return tok


def _generation_config(model: Any, tokenizer: Any) -> Any:
    """The model's generation config, stopping at eos and at the template's end-of-turn token."""
    from .render import END_MARKERS

    config = model.generation_config
    eos = config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    for marker in END_MARKERS:
        if template and marker in template and marker in vocab and vocab[marker] not in ids:
            ids.append(vocab[marker])
    if ids:
        config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    return config
