"""A local stand-in for the Hugging Face Hub, for the tests of tunedeck's search and pull.

An HTTP server (the standard library's, in a thread) on 127.0.0.1 that huggingface_hub
accepts as ``HF_ENDPOINT``, answering with the shapes the real Hub sends (as
huggingface_hub 2.x parses them: hf_api.ModelInfo / DatasetInfo, file_download's HEAD
metadata, utils/_http.hf_raise_for_status's ``X-Error-Code`` headers):

- ``GET /api/models?search=&pipeline_tag=&filter=&sort=&limit=&expand=``: the listing;
  with ``expand`` only ``_id``, ``id`` and the asked-for properties (an unknown property
  is a 400, as on the Hub).
- ``GET /api/models/ORG/NAME[/revision/REV][?blobs=true]`` and ``/api/datasets/...``:
  the repo's info, its siblings with ``size``, ``blobId`` and ``lfs`` when ``blobs``.
- ``HEAD``/``GET /ORG/NAME/resolve/REV/FILE`` and ``/datasets/ORG/NAME/resolve/...``:
  a small ("git") file is served in place with ``ETag`` (its git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; a large ("LFS") file answers 302 to a
  "CDN" on another origin (``localhost`` instead of ``127.0.0.1``: huggingface_hub then
  drops the auth header, as for the real CDN) with ``X-Linked-Etag`` (its sha256),
  ``X-Linked-Size`` and ``X-Repo-Commit``. Both honour ``Range`` (206, ``Content-Range``).
- Errors as the Hub gives them: a repo that does not exist (or private) is 401 without a
  token, 404 with one, ``X-Error-Code: RepoNotFound``; a gated repo's files are 401
  (no token) or 403 (a token without access) with ``GatedRepo`` while its info is
  public; a bad token is 401 "Invalid credentials in Authorization header"; an unknown
  revision ``RevisionNotFound``; a missing file ``EntryNotFound`` (404).

Knobs for the tests: :meth:`HubStandIn.fail_after` (a file's GET closes the connection
after N bytes, once or more), :attr:`HubStandIn.connections` and
:attr:`HubStandIn.requests` (every connection and request made), :meth:`bytes_served`
(the bytes of a file's content sent), ``delay`` (seconds to wait before each file chunk).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

GOOD_TOKEN = "good-token"  # a user with access to every gated repo
NO_ACCESS_TOKEN = "no-access-token"  # a valid user who has not accepted any gated repo's terms
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".arrow", ".gguf", ".h5", ".msgpack")
LFS_MIN_SIZE = 10 * 1024 * 1024  # any file this big is LFS too, as .gitattributes would have it
CHUNK = 64 * 1024
EXPAND_MODEL = {"author", "baseModels", "cardData", "childrenModelCount", "config", "createdAt", "disabled",
                "downloads", "downloadsAllTime", "gated", "gguf", "inference", "inferenceProviderMapping",
                "lastModified", "library_name", "likes", "mask_token", "model-index", "pipeline_tag", "private",
                "resourceGroup", "safetensors", "sha", "siblings", "spaces", "tags", "transformersInfo",
                "trendingScore", "usedStorage", "widgetData", "xetEnabled"}
EXPAND_DATASET = {"author", "cardData", "citation", "createdAt", "disabled", "description", "downloads",
                  "downloadsAllTime", "gated", "lastModified", "likes", "paperswithcode_id", "private", "siblings",
                  "sha", "tags", "trendingScore", "usedStorage", "resourceGroup", "xetEnabled"}
DATE = "2024-05-01T12:00:00.000Z"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


def safetensors_parameters(data: bytes) -> dict[str, int]:
    """{dtype: parameter count} from a safetensors file's header (what the Hub reports)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError):
        return {}
    out: dict[str, int] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry["shape"]:
            count *= dim
        out[entry["dtype"]] = out.get(entry["dtype"], 0) + count
    return out


@dataclass
class Repo:
    """One repo: its files (name -> bytes) at one commit, and what the Hub says about it."""

    id: str
    files: dict[str, bytes]
    kind: str = "model"  # "model" | "dataset"
    gated: bool | str = False  # False | "auto" | "manual"
    private: bool = False
    downloads: int = 0
    likes: int = 0
    pipeline_tag: str | None = "text-generation"
    license: str | None = "apache-2.0"
    tags: list[str] = field(default_factory=list)
    library_name: str | None = "transformers"
    branches: dict[str, str] = field(default_factory=dict)  # extra refs: name -> commit (same files)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.id.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(self.files[name]).digest())
        self.sha = digest.hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.lower().endswith(LFS_SUFFIXES) or len(self.files[name]) >= LFS_MIN_SIZE

    def commit_for(self, revision: str) -> str | None:
        if revision in ("main", self.sha) or (len(revision) >= 7 and self.sha.startswith(revision)):
            return self.sha
        return self.branches.get(revision)

    def siblings(self, blobs: bool) -> list[dict[str, Any]]:
        out = []
        for name in sorted(self.files):
            data = self.files[name]
            entry: dict[str, Any] = {"rfilename": name}
            if blobs:
                if self.is_lfs(name):
                    pointer = lfs_pointer(data)
                    entry.update(blobId=git_blob_id(pointer), size=len(data),
                                 lfs={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                      "pointerSize": len(pointer)})
                else:
                    entry.update(blobId=git_blob_id(data), size=len(data))
            out.append(entry)
        return out

    def safetensors(self) -> dict[str, Any] | None:
        params: dict[str, int] = {}
        for name, data in self.files.items():
            if name.endswith(".safetensors"):
                for dtype, n in safetensors_parameters(data).items():
                    params[dtype] = params.get(dtype, 0) + n
        return {"parameters": params, "total": sum(params.values())} if params else None

    def config(self) -> dict[str, Any] | None:
        try:
            config = json.loads(self.files["config.json"])
        except (KeyError, ValueError):
            return None
        return {k: config[k] for k in ("architectures", "model_type") if k in config}

    def card(self) -> dict[str, Any]:
        return {"license": self.license} if self.license else {}

    def info(self, blobs: bool) -> dict[str, Any]:
        """What ``GET /api/{models,datasets}/ID`` answers."""
        common = {"_id": hashlib.md5(self.id.encode()).hexdigest()[:24], "id": self.id,
                  "author": self.id.split("/")[0], "sha": self.sha, "lastModified": DATE, "createdAt": DATE,
                  "private": self.private, "gated": self.gated, "disabled": False, "downloads": self.downloads,
                  "likes": self.likes, "tags": list(self.tags), "cardData": self.card(),
                  "siblings": self.siblings(blobs), "usedStorage": sum(len(d) for d in self.files.values())}
        if self.kind == "dataset":
            return common
        info = {**common, "modelId": self.id, "library_name": self.library_name, "pipeline_tag": self.pipeline_tag,
                "spaces": [], "safetensors": self.safetensors()}
        config = self.config()
        if config is not None:
            info["config"] = config
        return {k: v for k, v in info.items() if v is not None}

    def listing(self, expand: list[str] | None) -> dict[str, Any]:
        """One entry of ``GET /api/models``: the default fields, or _id, id and the expanded ones."""
        info = self.info(blobs=False)
        if expand:
            return {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        keep = ("_id", "id", "likes", "private", "downloads", "tags", "pipeline_tag", "library_name", "createdAt",
                "modelId")
        return {k: info[k] for k in keep if k in info}


class HubStandIn:
    """The server: add repos, ``start()``, point ``HF_ENDPOINT`` at :attr:`endpoint`."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[dict[str, Any]] = []  # {"method", "path", "range", "auth", "status", "sent"}
        self.connections = 0
        self.delay = 0.0
        self._fail: dict[tuple[str, str], list[int]] = {}  # (repo id, file) -> [after_bytes, times left]
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- repos -------------------------------------------------------------------------

    def add(self, repo: Repo) -> Repo:
        self.repos[(repo.kind, repo.id)] = repo
        return repo

    def add_model(self, repo_id: str, files: dict[str, bytes] | Path, **meta: Any) -> Repo:
        return self.add(Repo(repo_id, _read_files(files), kind="model", **meta))

    def add_dataset(self, repo_id: str, files: dict[str, bytes] | Path, **meta: Any) -> Repo:
        meta.setdefault("pipeline_tag", None)
        meta.setdefault("library_name", None)
        return self.add(Repo(repo_id, _read_files(files), kind="dataset", **meta))

    # -- knobs -------------------------------------------------------------------------

    def fail_after(self, repo_id: str, filename: str, nbytes: int, times: int = 1) -> None:
        """The next ``times`` GETs of that file's content send ``nbytes`` bytes, then close the connection."""
        self._fail[(repo_id, filename)] = [nbytes, times]

    def bytes_served(self, filename: str | None = None) -> int:
        """Bytes of file content sent (of one file, by its name in the repo, or of all)."""
        with self._lock:
            return sum(r["sent"] for r in self.requests if r.get("file") and (filename is None
                                                                              or r["file"] == filename))

    def file_gets(self, filename: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["method"] == "GET" and r.get("file") == filename]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.connections = 0

    # -- life ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        """Another origin (same socket): huggingface_hub treats it as a CDN, as the real one."""
        return f"http://localhost:{self.port}"

    def start(self) -> HubStandIn:
        hub = self

        class Handler(_Handler):
            stand_in = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_files(files: dict[str, bytes] | Path) -> dict[str, bytes]:
    if isinstance(files, dict):
        return dict(files)
    root = Path(files)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A port nothing listens on (bound then closed): an endpoint that cannot be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RESOLVE = re.compile(r"^/(?:(?P<datasets>datasets)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
API_REPO = re.compile(r"^/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
TREE = re.compile(r"^/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
CDN = re.compile(r"^/_cdn/(?P<kind>model|dataset)/(?P<repo>[^/]+/[^/]+)/(?P<sha>[0-9a-f]{40})/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    stand_in: HubStandIn
    protocol_version = "HTTP/1.1"
    server_version = "hub-stand-in/1"

    def setup(self) -> None:
        super().setup()
        with self.stand_in._lock:
            self.stand_in.connections += 1

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------

    def _record(self, **extra: Any) -> dict[str, Any]:
        entry = {"method": self.command, "path": self.path, "range": self.headers.get("Range"),
                 "auth": self.headers.get("Authorization"), "status": None, "sent": 0, **extra}
        with self.stand_in._lock:
            self.stand_in.requests.append(entry)
        return entry

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.entry["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        h = {"X-Error-Message": message, **(headers or {})}
        if code:
            h["X-Error-Code"] = code
        self._json({"error": message}, status, h)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _bad_token(self) -> bool:
        token = self._token()
        if token is not None and token not in (GOOD_TOKEN, NO_ACCESS_TOKEN):
            self._error(401, None, "Invalid credentials in Authorization header")
            return True
        return False

    def _find(self, kind: str, repo_id: str) -> Repo | None:
        """The repo if it exists and this caller may see it; else answers as the Hub does and returns None."""
        repo = self.stand_in.repos.get((kind, repo_id))
        if repo is None or (repo.private and self._token() != GOOD_TOKEN):
            status = 404 if self._token() else 401
            self._error(status, "RepoNotFound", "Repository not found")
            return None
        return repo

    # -- methods -------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self.entry = self._record()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._error(404, None, "Not Found (the stand-in answers GET and HEAD only)")

    def _route(self) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.entry = self._record()
        if self._bad_token():
            return
        if path == "/api/agent-harnesses":  # huggingface_hub's user agent fetches this once a day
            return self._json({"standardEnvVars": ["AI_AGENT", "AGENT"], "harnesses": {}})
        if path in ("/api/models", "/api/datasets"):
            return self._list(path.rsplit("/", 1)[-1][:-1], query)
        m = API_REPO.match(path)
        if m:
            return self._info(m["kind"][:-1], m["repo"], m["rev"], query)
        m = TREE.match(path)
        if m:
            return self._tree(m["kind"][:-1], m["repo"], m["rev"], (m["path"] or "").strip("/"), query)
        m = RESOLVE.match(path)
        if m:
            return self._resolve("dataset" if m["datasets"] else "model", m["repo"], m["rev"], m["file"])
        m = CDN.match(path)
        if m:
            repo = self.stand_in.repos.get((m["kind"], m["repo"]))
            if repo is None or m["sha"] != repo.sha or m["file"] not in repo.files:
                return self._error(404, None, "NoSuchKey")
            return self._content(repo, m["file"], {"ETag": f'"{hashlib.sha256(repo.files[m["file"]]).hexdigest()}"'})
        self._error(404, None, "Not Found")

    def _list(self, kind: str, query: dict[str, list[str]]) -> None:
        expand = query.get("expand", []) + query.get("expand[]", [])
        allowed = EXPAND_MODEL if kind == "model" else EXPAND_DATASET
        unknown = [e for e in expand if e not in allowed]
        if unknown:
            return self._error(400, None, f'"expand" must be one of {sorted(allowed)}; got {unknown[0]!r}')
        found = [r for r in self.stand_in.repos.values() if r.kind == kind and not r.private]
        text = (query.get("search") or [""])[0].lower()
        if text:
            found = [r for r in found if text in r.id.lower()]
        for tag in query.get("pipeline_tag", []):
            found = [r for r in found if r.pipeline_tag == tag]
        for f in query.get("filter", []):
            found = [r for r in found if f in r.tags or f == r.pipeline_tag or f == r.library_name]
        for author in query.get("author", []):
            found = [r for r in found if r.id.split("/")[0] == author]
        sort = (query.get("sort") or [None])[0]
        if sort in ("downloads", "likes"):
            found.sort(key=lambda r: getattr(r, sort), reverse=True)
        elif sort is not None and sort not in ("lastModified", "createdAt", "trendingScore", "id"):
            return self._error(400, None, f"Invalid sort: {sort}")
        limit = query.get("limit")
        if limit:
            found = found[:int(limit[0])]
        self._json([r.listing(expand or None) for r in found])

    def _info(self, kind: str, repo_id: str, revision: str | None, query: dict[str, list[str]]) -> None:
        repo = self._find(kind, repo_id)
        if repo is None:
            return
        if revision is not None and repo.commit_for(revision) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
        info = repo.info(blobs)
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        self._json(info)

    def _tree(self, kind: str, repo_id: str, revision: str, folder: str, query: dict[str, list[str]]) -> None:
        """``GET /api/models/ID/tree/REV[/PATH][?recursive=true]`` (what snapshot_download lists)."""
        repo = self._find(kind, repo_id)
        if repo is None:
            return
        if repo.commit_for(revision) is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
        prefix = f"{folder}/" if folder else ""
        if folder and not any(n.startswith(prefix) for n in repo.files):
            return self._error(404, "EntryNotFound", f"{folder} does not exist on \"{revision}\"")
        entries: dict[str, dict[str, Any]] = {}
        for name, data in sorted(repo.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                if depth > 1 and not recursive:
                    break
                sub = prefix + "/".join(rest[:depth])
                entries.setdefault(sub, {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest(),
                                         "size": 0, "path": sub})
            if len(rest) > 1 and not recursive:
                continue
            entry: dict[str, Any] = {"type": "file", "size": len(data), "path": name}
            if repo.is_lfs(name):
                pointer = lfs_pointer(data)
                entry.update(oid=git_blob_id(pointer), lfs={"oid": hashlib.sha256(data).hexdigest(),
                                                             "size": len(data), "pointerSize": len(pointer)})
            else:
                entry["oid"] = git_blob_id(data)
            entries[name] = entry
        self._json(list(entries.values()))

    def _resolve(self, kind: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self._find(kind, repo_id)
        if repo is None:
            return
        commit = repo.commit_for(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if repo.gated and self._token() != GOOD_TOKEN:
            where = "model" if kind == "model" else "dataset"
            if self._token() is None:
                return self._error(401, "GatedRepo", f"Access to {where} {repo_id} is restricted. You must have "
                                   "access to it and be authenticated to access it. Please log in.")
            return self._error(403, "GatedRepo", f"Access to {where} {repo_id} is restricted and you are not in "
                               "the authorized list. Visit https://huggingface.co/" + repo_id + " to ask for access.")
        if filename not in repo.files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"",
                               {"X-Repo-Commit": commit})
        data = repo.files[filename]
        common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if repo.is_lfs(filename):
            location = f"{self.stand_in.cdn}/_cdn/{kind}/{repo.id}/{commit}/{quote(filename)}"
            pointer = lfs_pointer(data)
            self.entry["status"] = 302
            self.send_response(302)
            for k, v in {**common, "Location": location, "ETag": f'"{git_blob_id(pointer)}"',
                         "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data)),
                         "Content-Length": "0"}.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self._content(repo, filename, {**common, "ETag": f'"{git_blob_id(data)}"'})

    def _content(self, repo: Repo, filename: str, headers: dict[str, str]) -> None:
        data = repo.files[filename]
        self.entry["file"] = filename
        total = len(data)
        start, end, status = 0, total - 1, 200
        wanted = self.headers.get("Range")
        if wanted:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            if not m or (not m[1] and not m[2]):
                return self._error(416, None, "Invalid range", {"Content-Range": f"bytes */{total}"})
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else total - 1, total - 1)
            else:  # the last N bytes
                start, end = max(total - int(m[2]), 0), total - 1
            if start >= total or start > end:
                return self._error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{total}"})
            status = 206
        body = data[start:end + 1]
        self.entry["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = None
        with self.stand_in._lock:
            fail = self.stand_in._fail.get((repo.id, filename))
            if fail and fail[1] > 0:
                fail[1] -= 1
                cut = fail[0]
        limit = len(body) if cut is None else min(cut, len(body))
        sent = 0
        try:
            while sent < limit:
                if self.stand_in.delay:
                    time.sleep(self.stand_in.delay)
                piece = body[sent:min(sent + CHUNK, limit)]
                self.wfile.write(piece)
                sent += len(piece)
                with self.stand_in._lock:
                    self.entry["sent"] = sent
            self.wfile.flush()
        except OSError:  # the client went away (a cancelled download)
            self.close_connection = True
            return
        if cut is not None and cut < len(body):
            # the connection drops mid-file, as a flaky network does
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
