"""The Hugging Face Hub, when asked: search models, plan a download, pull a model or a dataset.

tunedeck is offline unless the user asks: these three functions are the only ones that
reach the network (the Models screen's search and download, ``tunedeck models --search``
and ``tunedeck pull``). Training, inspecting, previewing and chatting read local files
only; a pulled repo is then a local model or dataset like any other (``model.source =
"org/name"`` and ``dataset.path = "org/name"`` resolve from the Hugging Face cache).

- :func:`search_models`: text-generation models matching a text, most downloaded first,
  with their downloads, likes, gated state, license and weights' size where the Hub says.
- :func:`plan_pull`: what a download would fetch (for a model: safetensors weights,
  config, tokenizer files, chat template, generation config; never ``.bin`` / ``.pt``
  pickle weights unless allowed, and only when a repo has no safetensors), its size, what
  is already in the cache, and the free space on the cache's disk. Refuses, in one line,
  before a byte of weights: a repo that does not exist, a gated or private repo without
  access, no network, pickle-only weights, an architecture transformers does not know
  (the config is read first), not enough space.
- :func:`pull`: the planned files into the Hugging Face cache (huggingface_hub's own
  layout, so every tool finds them), file by file with progress, cancellable; an
  interrupted file resumes where it stopped (huggingface_hub keeps the partial file). A
  disk that fills mid-download keeps the partial file and says how much space is needed.

The endpoint is huggingface_hub's (``HF_ENDPOINT``), the token ``HF_TOKEN`` or the one
``hf auth login`` saved. Imports huggingface_hub: engine or CLI process only.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError, first_line
from .units import format_bytes

MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
               "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "*.tiktoken")
PICKLE_FILES = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")
DATASET_FILES = ("*.jsonl", "*.json", "*.csv", "*.parquet", "*.arrow", "*.jsonl.gz", "*.md")
SEARCH_LIMIT = 20


class _Cancelled(Exception):
    """The user cancelled a download (raised inside huggingface_hub's progress callback)."""


def _hub() -> Any:
    import huggingface_hub

    return huggingface_hub


@contextlib.contextmanager
def online() -> Iterator[None]:
    """The Hub reachable for one asked-for search or download: every tunedeck process is
    offline by default (HF_HUB_OFFLINE, set in :mod:`tunedeck.core`), and only that default
    is lifted here, for the duration; a user's own HF_HUB_OFFLINE=1 is kept, and said."""
    from huggingface_hub import constants

    from . import HUB_OFFLINE_FROM_USER

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if HUB_OFFLINE_FROM_USER and flag.upper() in ("1", "ON", "YES", "TRUE"):
        raise UserError("the Hub is off: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set in your environment; unset "
                        "it to search or download")
    import logging

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)  # its retry notices are not ours to print: a failure is one line
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        log.setLevel(level)


def _reach_hub() -> None:
    """One request, no retries, so that no network fails at once (the listing retries
    refused connections for half a minute)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    response = get_session().get(f"{_endpoint()}/api/models", params={"limit": 1}, headers=build_hf_headers(),
                                 timeout=10)
    response.raise_for_status()


def _endpoint() -> str:
    return _hub().constants.ENDPOINT


def _refusal(exc: BaseException, repo: str, kind: str = "model") -> UserError:
    """A huggingface_hub or network error as one line saying what to do."""
    from huggingface_hub import errors

    page = f"{_endpoint()}/{'datasets/' if kind == 'dataset' else ''}{repo}"
    if isinstance(exc, errors.GatedRepoError):
        return UserError(f"{repo} is gated: accept its terms on {page}, then set HF_TOKEN or run `hf auth login` "
                         "with an account that has access")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return UserError(f"{repo}: no such {kind} on the Hub ({_endpoint()}), or it is private: check the name, or "
                         "set HF_TOKEN / run `hf auth login` for a private repo")
    if isinstance(exc, errors.RevisionNotFoundError):
        return UserError(f"{repo}: no such revision; give a branch, tag or commit of {page}")
    if isinstance(exc, errors.EntryNotFoundError):
        return UserError(f"{repo}: a file is missing on the Hub ({first_line(exc, limit=160)})")
    if isinstance(exc, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
        return UserError(f"{repo}: the Hub cannot be reached (offline: HF_HUB_OFFLINE is set, or no network); "
                         "check the connection and try again")
    if isinstance(exc, errors.HfHubHTTPError):
        return UserError(f"{repo}: the Hub answered {first_line(exc, limit=160)}")
    return UserError(f"{repo}: the Hub at {_endpoint()} cannot be reached ({exc.__class__.__name__}: "
                     f"{first_line(exc, limit=160)}); check the network, or HF_ENDPOINT")


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the Hub says no or cannot be reached."""
    import importlib

    from huggingface_hub import errors

    found: list[type[BaseException]] = [errors.HfHubHTTPError, errors.OfflineModeIsEnabled,
                                        errors.LocalEntryNotFoundError, ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx", "requests"):  # the HTTP client huggingface_hub uses (it changed over versions)
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        base = getattr(module, "HTTPError", None) or getattr(getattr(module, "exceptions", None), "RequestException",
                                                             None)
        if isinstance(base, type):
            found.append(base)
    return tuple(found)


def search_models(text: str, limit: int = SEARCH_LIMIT) -> list[dict[str, Any]]:
    """Text-generation models whose name matches ``text``, most downloaded first."""
    with online():
        return _search(text, limit)


def _search(text: str, limit: int) -> list[dict[str, Any]]:
    text = text.strip()
    if not text:
        raise UserError("search: give part of a model's name, e.g. Qwen2.5-0.5B")
    api = _hub().HfApi()
    try:
        _reach_hub()
        found = list(api.list_models(search=text, pipeline_tag="text-generation", sort="downloads", limit=limit,
                                     expand=["downloads", "likes", "gated", "cardData", "safetensors",
                                             "pipeline_tag"]))
    except _network_errors() as exc:
        raise _refusal(exc, f"search {text!r}") from None
    out = []
    for m in found:
        card = getattr(m, "card_data", None) or getattr(m, "cardData", None)
        license_ = getattr(card, "license", None) if card is not None and not isinstance(card, dict) else (
            card or {}).get("license")
        weights = getattr(m, "safetensors", None)
        size = None
        if weights is not None:
            params = getattr(weights, "parameters", None) or {}
            size = sum(int(n) * _dtype_bytes(dtype) for dtype, n in params.items()) or None
        out.append({"id": m.id, "downloads": getattr(m, "downloads", None), "likes": getattr(m, "likes", None),
                    "gated": getattr(m, "gated", False) or False, "license": license_ if isinstance(license_, str)
                    else None, "size": size, "pipeline_tag": getattr(m, "pipeline_tag", None)})
    return out


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}.get(str(dtype).upper(), 2)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, p) for p in patterns)


def cache_dir() -> Path:
    from .sources import hub_cache

    return hub_cache()


def _free_bytes(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


def _cached_size(repo: str, kind: str, revision: str, name: str) -> int:
    """Bytes of ``name`` already complete in the cache for that commit (0 when not there)."""
    folder = cache_dir() / f"{'datasets' if kind == 'dataset' else 'models'}--{repo.replace('/', '--')}"
    path = folder / "snapshots" / revision / name
    try:
        return path.stat().st_size if path.exists() else 0
    except OSError:
        return 0


def plan_pull(repo: str, revision: str | None = None, *, dataset: bool = False,
              allow_pickle: bool = False) -> dict[str, Any]:
    """What pulling ``repo`` would fetch (see the module docstring); UserError (one line) when it cannot."""
    with online():
        return _plan(repo, revision, dataset, allow_pickle)


def _plan(repo: str, revision: str | None, dataset: bool, allow_pickle: bool) -> dict[str, Any]:
    kind = "dataset" if dataset else "model"
    repo = repo.strip().strip("/")
    if dataset and revision not in (None, "main"):
        raise UserError(f"--revision {revision}: a dataset is pulled at its main branch (dataset.path names a cached "
                        "dataset by its repo id, which is its main branch); pull it without --revision")
    if not repo or repo.count("/") > 1 or " " in repo:
        raise UserError(f"{repo or '(empty)'}: not a Hub repo id; give it as org/name, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    api = _hub().HfApi()
    try:
        info = (api.dataset_info(repo, revision=revision, files_metadata=True) if dataset
                else api.model_info(repo, revision=revision, files_metadata=True))
    except _network_errors() as exc:
        raise _refusal(exc, repo, kind) from None
    siblings = [(s.rfilename, int(s.size or 0)) for s in (info.siblings or [])]
    if dataset:
        chosen = [(n, s) for n, s in siblings if _matches(n, DATASET_FILES)]
        skipped: list[str] = [n for n, s in siblings if (n, s) not in chosen]
        if not any(not n.endswith(".md") for n, _ in chosen):
            raise UserError(f"{repo}: the dataset has no data files tunedeck reads (JSONL, JSON, CSV, Parquet, Arrow)")
    else:
        chosen = [(n, s) for n, s in siblings if _matches(n, MODEL_FILES)]
        weights = [n for n, _ in chosen if n.endswith(".safetensors")]
        pickles = [(n, s) for n, s in siblings if _matches(n, PICKLE_FILES)]
        skipped = [n for n, _ in pickles]
        if not weights:
            if not pickles:
                raise UserError(f"{repo}: the repo has no model weights (no .safetensors, no .bin)")
            if not allow_pickle:
                raise UserError(f"{repo} has only pickle weights ({pickles[0][0]}), which can run code when loaded; "
                                "tunedeck loads safetensors only: pull it with --allow-pickle (and set "
                                "model.allow_pickle = true) only if you trust it")
            chosen += pickles
            skipped = []
        if not any(n == "config.json" for n, _ in chosen):
            raise UserError(f"{repo}: the repo has no config.json; it is not a Hugging Face transformers model")
        _check_architecture(repo, revision or "main")
    chosen.sort(key=lambda f: (f[0].endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")), f[0]))  # weights last
    sha = info.sha or revision or "main"
    cached = sum(_cached_size(repo, kind, sha, n) for n, _ in chosen)
    total = sum(s for _, s in chosen)
    free = _free_bytes(cache_dir())
    return {"repo": repo, "kind": kind, "revision": sha, "files": [{"name": n, "size": s} for n, s in chosen],
            "total": total, "cached": cached, "free": free, "skipped": skipped,
            "source": repo if (revision or "main") == "main" else str(
                cache_dir() / f"models--{repo.replace('/', '--')}" / "snapshots" / sha),
            "gated": getattr(info, "gated", False) or False}


def _check_architecture(repo: str, revision: str | None) -> None:
    """The model's config.json (fetched alone, small) names an architecture transformers knows."""
    hub = _hub()
    try:
        path = hub.hf_hub_download(repo, "config.json", revision=revision)
    except _network_errors() as exc:
        raise _refusal(exc, repo) from None
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{repo}: its config.json is not valid JSON") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UserError(f"{repo}: its architecture ({model_type or 'no model_type'}) is not one this transformers "
                        "knows; upgrade transformers, or pick another model (models that need trust_remote_code "
                        "are not pulled)")


class _Progress:
    """huggingface_hub's progress bar for one file, reporting to ``pull``'s callback and
    stopping the download when it is cancelled."""

    def __init__(self, report: Callable[[int, int | None], None], cancel: threading.Event | None,
                 **kwargs: Any) -> None:
        self.report, self.cancel = report, cancel
        self.n = int(kwargs.get("initial") or 0)
        self.total = kwargs.get("total")
        self.report(self.n, self.total)

    def update(self, n: int = 1) -> None:
        # huggingface_hub counts a chunk before writing it: a cancel seen here stops before the
        # next one, so every byte counted so far is in the partial file
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled()
        self.n += n
        self.report(self.n, self.total)

    def close(self) -> None:
        pass

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def pull(repo: str, revision: str | None = None, *, dataset: bool = False, allow_pickle: bool = False,
         progress: Callable[[dict[str, Any]], None] | None = None,
         cancel: threading.Event | None = None) -> dict[str, Any]:
    """Download the planned files of ``repo`` into the Hugging Face cache (see the module docstring)."""
    with online():
        return _pull(repo, revision, dataset, allow_pickle, progress, cancel)


def _pull(repo: str, revision: str | None, dataset: bool, allow_pickle: bool,
          progress: Callable[[dict[str, Any]], None] | None, cancel: threading.Event | None) -> dict[str, Any]:
    plan = _plan(repo, revision, dataset, allow_pickle)
    repo, kind, sha = plan["repo"], plan["kind"], plan["revision"]
    needed = plan["total"] - plan["cached"]
    if needed > plan["free"]:
        raise UserError(f"{repo}: {_gib(needed)} to download but {_gib(plan['free'])} free in {cache_dir()}; free "
                        "some space (or set HF_HUB_CACHE to a bigger disk)")
    files = plan["files"]
    done_before = 0
    path: Path | None = None
    for index, entry in enumerate(files):
        name, size = entry["name"], entry["size"]

        def report(n: int, total: int | None, name: str = name, size: int = size, base: int = done_before,
                   index: int = index) -> None:
            if progress is not None:
                progress({"file": name, "file_done": n, "file_total": total or size, "done": base + n,
                          "total": plan["total"], "files_done": index, "files_total": len(files)})

        bar = type("Bar", (_Progress,), {"__init__": lambda self, report=report, **kw: _Progress.__init__(
            self, report, cancel, **kw)})
        if cancel is not None and cancel.is_set():
            raise UserError(f"{repo}: download cancelled; pull again to resume where it stopped")
        try:
            local = _download(repo, name, kind, revision or "main", bar)
        except _Cancelled:
            raise UserError(f"{repo}: download cancelled at {name}; pull again to resume where it stopped") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UserError(f"{repo}: the disk filled while downloading {name} ({_gib(size)}; "
                                f"{_gib(needed)} needed in all, in {cache_dir()}); the partial file is kept: free "
                                "some space and pull again to resume") from None
            if isinstance(exc, _network_errors()):
                raise _refusal(exc, repo, kind) from None
            raise UserError(f"{repo}: cannot write {name} to {cache_dir()} ({exc.strerror or exc})") from None
        except _network_errors() as exc:
            raise _refusal(exc, repo, kind) from None
        report(size, size)
        done_before += size
        path = Path(local)
    snapshot = _snapshot_folder(path)
    if progress is not None:
        progress({"file": None, "file_done": 0, "file_total": 0, "done": plan["total"], "total": plan["total"],
                  "files_done": len(files), "files_total": len(files)})
    # the repo id names its main branch's snapshot offline; another revision is named by its folder
    source = repo if (revision or "main") == "main" else str(snapshot)
    return {"repo": repo, "kind": kind, "revision": sha, "path": str(snapshot), "files": [f["name"] for f in files],
            "bytes": plan["total"], "source": source}


def _download(repo: str, name: str, kind: str, revision: str, bar: type) -> Path:
    """One file into the Hugging Face cache (its blobs, the snapshot's link, the revision's
    ref: huggingface_hub's layout), resumable across calls: the bytes received go to
    ``blobs/<etag>.partial``, kept when the download stops (cancelled, the network gone, the
    disk full), and the next pull asks only for the rest (an HTTP range)."""
    from urllib.parse import urlparse

    from huggingface_hub import file_download as fd
    from huggingface_hub.utils import build_hf_headers

    url = fd.hf_hub_url(repo, name, repo_type=kind, revision=revision)
    headers = build_hf_headers()
    meta = fd.get_hf_file_metadata(url, headers=dict(headers))
    if not meta.etag or not meta.commit_hash:
        raise UserError(f"{repo}: the Hub gave no version for {name}; try again later")
    etag = meta.etag.strip('"')
    storage = cache_dir() / fd.repo_folder_name(repo_id=repo, repo_type=kind)
    blob = storage / "blobs" / etag
    pointer = storage / "snapshots" / meta.commit_hash / name
    if not blob.exists():
        blob.parent.mkdir(parents=True, exist_ok=True)
        partial = blob.with_name(etag + ".partial")
        if urlparse(meta.location).netloc != urlparse(url).netloc:  # a CDN: the token is not sent there
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        with open(partial, "ab") as fh:
            have = fh.tell()
            if meta.size is None or have < meta.size:
                fd.http_get(meta.location, fh, resume_size=have, headers=headers, expected_size=meta.size,
                            displayed_filename=name, tqdm_class=bar)
        os.replace(partial, blob)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if not pointer.exists():
        fd._create_symlink(str(blob), str(pointer), new_blob=True)
    fd._cache_commit_hash_for_specific_revision(str(storage), revision, meta.commit_hash)
    return pointer


def _snapshot_folder(path: Path | None) -> Path:
    """The cache's snapshot folder a downloaded file lies in."""
    if path is None:
        return cache_dir()
    for parent in path.parents:
        if parent.parent.name == "snapshots":
            return parent
    return path.parent


def _gib(n: int) -> str:
    """Disk space in a refusal: MiB below 1 GiB ("512.0 MiB"), then as a memory figure ("6.57 GiB")."""
    return format_bytes(n, smallest="MiB", spec=",.1f", memory_gib=True)
