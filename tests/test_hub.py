"""The Hugging Face Hub, on request only: search, plan and pull (tunedeck.core.hub), the
`tunedeck pull` / `tunedeck models --search` commands, and commands that must not connect.

Against a local stand-in for the Hub (tests/hub_stand_in.py) that huggingface_hub accepts
as HF_ENDPOINT; every test has its own HF_HOME / HF_HUB_CACHE in a tmp dir, no token
unless it sets one, and the real Hub is never reached.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and the token path once, at its
import: in this process they are set on ``huggingface_hub.constants`` too (see
:func:`point_hub_at`); a subprocess takes them from its environment, as a user's does.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tunedeck.core.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_stand_in import GOOD_TOKEN, NO_ACCESS_TOKEN, HubStandIn, Repo, free_port

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
CHAT_ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(6)]
MODEL_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja"}
PROGRESS_KEYS = {"file", "file_done", "file_total", "done", "total", "files_done", "files_total"}


# -- the repos the stand-in serves (built once) -----------------------------------------------


def _safetensors(n_floats: int) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"w": np.zeros(n_floats, dtype=np.float32)})


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture(scope="session")
def hub_repos(tiny_model_dir) -> list[Repo]:
    model = {p.name: p.read_bytes() for p in sorted(Path(tiny_model_dir).iterdir()) if p.is_file()}
    assert set(model) >= MODEL_FILES, sorted(model)
    config = json.loads(model["config.json"])
    attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
    pickle = b"\x80\x02}q\x00." + b"\x00" * 4096  # a "pytorch_model.bin": never loaded, only counted
    small_config = json.dumps({**config, "vocab_size": 32}).encode()
    return [
        Repo("tiny/llama", {**model, "pytorch_model.bin": pickle, "README.md": b"# tiny llama\n",
                            ".gitattributes": attrs}, downloads=5000, likes=42, license="apache-2.0"),
        Repo("tiny/llama-gated", dict(model), gated="manual", downloads=800, likes=7, license="llama3.2"),
        Repo("tiny/private", dict(model), private=True, downloads=900),
        Repo("tiny/pickle-only", {"config.json": model["config.json"], "tokenizer.json": model["tokenizer.json"],
                                  "tokenizer_config.json": model["tokenizer_config.json"],
                                  "pytorch_model.bin": pickle}, downloads=30, license=None),
        Repo("tiny/nonsense", {"config.json": json.dumps({"model_type": "nonsense-arch",
                                                          "architectures": ["NonsenseForCausalLM"]}).encode(),
                               "model.safetensors": _safetensors(256)}, downloads=20),
        Repo("tiny/big-weights", {"config.json": small_config, "model.safetensors": _safetensors(640 * 1024)},
             downloads=1),  # 2.5 MiB of weights: for the small-disk tests
        Repo("tiny/bert-ish", {"config.json": b'{"model_type": "bert"}', "model.safetensors": _safetensors(8)},
             downloads=10**6, pipeline_tag="fill-mask"),
        Repo("tiny/chat", {"data/train-00000-of-00001.parquet": _parquet(CHAT_ROWS), "README.md": b"# chat\n",
                           ".gitattributes": attrs}, kind="dataset", pipeline_tag=None, library_name=None),
    ]


# -- pointing huggingface_hub (and tunedeck) at the stand-in ----------------------------------


def point_hub_at(monkeypatch, endpoint: str, home: Path) -> None:
    """Set what huggingface_hub read from the environment at its import, in this process."""
    from huggingface_hub import constants

    cache = home / "hub"
    for name, value in (("HF_ENDPOINT", endpoint), ("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    patches = {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HUGGINGFACE_HUB_CACHE": str(cache),
               "HF_ASSETS_CACHE": str(home / "assets"), "HF_TOKEN_PATH": str(home / "token"),
               "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
               "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
               "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done")}
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)


def close_hub_session() -> None:
    from huggingface_hub.utils import _http

    _http.close_session()


@pytest.fixture
def hub(hub_repos, tmp_path, monkeypatch):
    """The stand-in, running, with this process's huggingface_hub and tunedeck pointed at it
    (tunedeck's own offline default lifted by search/pull only: the user did not set HF_HUB_OFFLINE)."""
    import tunedeck.core

    stand_in = HubStandIn()
    for repo in hub_repos:
        stand_in.add(repo)
    stand_in.start()
    point_hub_at(monkeypatch, stand_in.endpoint, tmp_path / "hf")
    monkeypatch.setattr(tunedeck.core, "HUB_OFFLINE_FROM_USER", False)
    close_hub_session()  # no connection kept from another test's stand-in
    yield stand_in
    close_hub_session()
    stand_in.stop()


@pytest.fixture
def online(monkeypatch):
    """For calling huggingface_hub directly (tunedeck lifts its offline default itself)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_of(hub: HubStandIn, repo_id: str, kind: str = "model") -> Repo:
    return hub.repos[(kind, repo_id)]


def one_line(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, UserError) else str(exc)
    assert message and "\n" not in message, repr(message)
    assert "Traceback" not in message
    return message


def clean_env(hub: HubStandIn | None, home: Path, **extra: str) -> dict[str, str]:
    """A user's environment for a subprocess: no offline flags, no token, this HF_HOME."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*OFFLINE_VARS, "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                        "HF_ENDPOINT", "HF_HOME")}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), COLUMNS="200")
    if hub is not None:
        env["HF_ENDPOINT"] = hub.endpoint
    env.update(extra)
    return env


def write_project(folder: Path, model: str, data: str = "data.jsonl", rows: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        (folder / data).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = folder / "project.toml"
    path.write_text(f'schema = 1\nname = "p"\n[model]\nsource = "{model}"\n[quantization]\nmode = "none"\n'
                    f'[lora]\nr = 8\n[dataset]\npath = "{data}"\nmax_length = 64\neval_split = 0.0\n',
                    encoding="utf-8")
    return path


# -- the stand-in itself, through huggingface_hub -----------------------------------------------


def test_stand_in_answers_huggingface_hub_as_the_hub_does(hub, online):
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi()
    assert api.endpoint == hub.endpoint
    found = list(api.list_models(search="TINY", pipeline_tag="text-generation", sort="downloads", limit=3,
                                 expand=["downloads", "gated", "cardData", "safetensors"]))
    assert [m.id for m in found] == ["tiny/llama", "tiny/llama-gated", "tiny/pickle-only"]  # not the private one
    assert found[0].safetensors.total > 0 and found[0].card_data.license == "apache-2.0"
    assert found[1].gated == "manual" and found[2].safetensors is None

    llama = repo_of(hub, "tiny/llama")
    info = api.model_info("tiny/llama", files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert info.sha == llama.sha and sizes == {n: len(d) for n, d in llama.files.items()}
    assert {s.rfilename for s in info.siblings if s.lfs} == {"model.safetensors", "pytorch_model.bin"}
    assert api.model_info("tiny/llama", revision=llama.sha).sha == llama.sha
    assert api.dataset_info("tiny/chat", files_metadata=True).siblings[0].size > 0

    path = Path(hf_hub_download("tiny/llama", "config.json"))
    weights = Path(hf_hub_download("tiny/llama", "model.safetensors"))  # through the "CDN" redirect
    assert path.read_bytes() == llama.files["config.json"] and weights.stat().st_size == len(
        llama.files["model.safetensors"])
    folder = cache_dir() / "models--tiny--llama"
    assert (folder / "refs" / "main").read_text() == llama.sha
    assert path == folder / "snapshots" / llama.sha / "config.json"
    assert try_to_load_from_cache("tiny/llama", "config.json") == str(path)

    with pytest.raises(GatedRepoError):
        hf_hub_download("tiny/llama-gated", "config.json")
    assert hf_hub_download("tiny/llama-gated", "config.json", token=GOOD_TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tiny/nope")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tiny/private")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("tiny/llama", revision="no-such-branch")
    assert hub.connections > 0 and any(r["path"].startswith("/_cdn/") for r in hub.requests)


def test_stand_in_resumes_a_dropped_file_with_a_range_request(hub, online):
    from huggingface_hub import hf_hub_download

    size = len(repo_of(hub, "tiny/llama").files["model.safetensors"])
    hub.fail_after("tiny/llama", "model.safetensors", 10 * 2**20 + 1000)  # past huggingface_hub's 10 MiB chunk
    path = hf_hub_download("tiny/llama", "model.safetensors")
    gets = hub.file_gets("model.safetensors")
    assert Path(path).stat().st_size == size
    assert [g["range"] for g in gets] == [None, f"bytes={10 * 2**20}-"]
    assert gets[1]["status"] == 206 and gets[1]["sent"] == size - 10 * 2**20


# -- search ---------------------------------------------------------------------------------------


def test_search_lists_text_generation_models_most_downloaded_first(hub):
    from tunedeck.core.hub import search_models

    found = search_models("tiny")
    assert [m["id"] for m in found] == ["tiny/llama", "tiny/llama-gated", "tiny/pickle-only", "tiny/nonsense",
                                        "tiny/big-weights"]  # not the fill-mask one, not the private one
    for m in found:
        assert set(m) == {"id", "downloads", "likes", "gated", "license", "size", "pipeline_tag"}, m
        assert m["pipeline_tag"] == "text-generation"
    llama, gated, pickle = found[0], found[1], found[2]
    params = repo_of(hub, "tiny/llama").safetensors()["total"]
    assert llama == {"id": "tiny/llama", "downloads": 5000, "likes": 42, "gated": False, "license": "apache-2.0",
                     "size": params * 4, "pipeline_tag": "text-generation"}  # float32 weights
    assert gated["gated"] == "manual" and gated["license"] == "llama3.2"
    assert pickle["size"] is None and pickle["license"] is None  # no safetensors, no license: the Hub does not say
    assert [m["id"] for m in search_models("tiny", limit=2)] == ["tiny/llama", "tiny/llama-gated"]
    assert search_models("no-model-has-this-name") == []
    listings = [r for r in hub.requests if r["path"].startswith("/api/models?") and "search=" in r["path"]]
    assert len(listings) == 3 and all("limit=" in r["path"] for r in listings)
    assert not hub.file_gets("model.safetensors")


def test_search_of_nothing_is_one_line(hub):
    from tunedeck.core.hub import search_models

    with pytest.raises(UserError) as caught:
        search_models("   ")
    one_line(caught.value)


# -- plan -------------------------------------------------------------------------------------------


def test_plan_lists_safetensors_config_and_tokenizer_not_pickle_with_sizes_and_free_space(hub):
    from tunedeck.core.hub import plan_pull

    llama = repo_of(hub, "tiny/llama")
    plan = plan_pull("tiny/llama")
    names = {f["name"] for f in plan["files"]}
    assert names == MODEL_FILES
    assert {f["name"]: f["size"] for f in plan["files"]} == {n: len(llama.files[n]) for n in names}
    assert plan["total"] == sum(len(llama.files[n]) for n in names)
    assert plan["repo"] == "tiny/llama" and plan["kind"] == "model" and plan["revision"] == llama.sha
    # nothing was in the cache; the plan fetched config.json alone (to read the architecture)
    assert plan["cached"] in (0, len(llama.files["config.json"])) and plan["source"] == "tiny/llama"
    assert "pytorch_model.bin" in plan["skipped"] and not names & set(plan["skipped"])
    free = shutil.disk_usage(cache_dir()).free
    assert abs(plan["free"] - free) < 256 * 2**20, (plan["free"], free)
    # planning reads the config (to check the architecture), never the weights
    assert hub.bytes_served("model.safetensors") == 0 and not hub.file_gets("pytorch_model.bin")
    # allowing pickle does not take .bin weights when the repo has safetensors
    again = plan_pull("tiny/llama", allow_pickle=True)
    assert {f["name"] for f in again["files"]} == MODEL_FILES and "pytorch_model.bin" in again["skipped"]
    # a pinned revision plans that commit
    assert plan_pull("tiny/llama", llama.sha)["revision"] == llama.sha


# -- pull a model, then use it offline ----------------------------------------------------------------


def test_pull_a_model_with_progress_then_it_loads_offline_by_its_repo_id(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    from tunedeck.core.cli import main
    from tunedeck.core.hub import plan_pull, pull
    from tunedeck.core.models import resolve_source

    llama = repo_of(hub, "tiny/llama")
    seen: list[dict] = []
    result = pull("tiny/llama", progress=seen.append)
    snapshot = cache_dir() / "models--tiny--llama" / "snapshots" / llama.sha
    assert result["repo"] == "tiny/llama" and result["kind"] == "model" and result["revision"] == llama.sha
    assert Path(result["path"]) == snapshot and result["source"] == "tiny/llama"
    assert set(result["files"]) == MODEL_FILES
    assert result["bytes"] == sum(len(llama.files[n]) for n in MODEL_FILES)
    assert (cache_dir() / "models--tiny--llama" / "refs" / "main").read_text() == llama.sha
    for name in MODEL_FILES:
        assert (snapshot / name).read_bytes() == llama.files[name], name
    assert not (snapshot / "pytorch_model.bin").exists() and not hub.file_gets("pytorch_model.bin")
    assert hub.bytes_served("model.safetensors") == len(llama.files["model.safetensors"])  # once, whole

    # progress: every report has its keys; the total grows to the end; each file reaches its size
    assert seen and all(set(p) == PROGRESS_KEYS for p in seen), seen[:3]
    done = [p["done"] for p in seen]
    assert done == sorted(done) and done[-1] == result["bytes"] == seen[-1]["total"]
    assert seen[-1]["files_done"] == seen[-1]["files_total"] == len(MODEL_FILES)
    for name in MODEL_FILES:
        size = len(llama.files[name])
        assert any(p["file"] == name and p["file_done"] == p["file_total"] == size for p in seen), name
    assert any(p["file"] == "model.safetensors" and 0 < p["file_done"] < p["file_total"] for p in seen)

    assert plan_pull("tiny/llama")["cached"] == result["bytes"]  # all of it in the cache now

    # offline now: the repo id names the snapshot; inspect reads it; nothing connects
    hub.reset_counts()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ref = resolve_source("tiny/llama")
    assert ref.kind == "hub" and Path(ref.path) == snapshot
    project = write_project(tmp_path / "proj", "tiny/llama", rows=CHAT_ROWS)
    assert main(["inspect", str(project), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["model_type"] == "llama" and report["model"]["source"] == "tiny/llama"
    assert hub.requests == [] and hub.connections == 0


def test_a_dropped_connection_resumes_and_fetches_only_the_rest(hub):
    from tunedeck.core.hub import pull

    size = len(repo_of(hub, "tiny/llama").files["model.safetensors"])
    cut = 10 * 2**20 + 4096  # huggingface_hub writes in 10 MiB chunks: the first one lands, then the line drops
    hub.fail_after("tiny/llama", "model.safetensors", cut)
    result = pull("tiny/llama")
    assert (Path(result["path"]) / "model.safetensors").stat().st_size == size
    gets = hub.file_gets("model.safetensors")
    assert len(gets) == 2 and gets[0]["sent"] == cut
    assert gets[1]["range"] == f"bytes={10 * 2**20}-" and gets[1]["sent"] == size - 10 * 2**20


def test_a_cancelled_pull_keeps_the_partial_file_and_the_next_pull_fetches_only_the_rest(hub):
    from tunedeck.core.hub import pull

    size = len(repo_of(hub, "tiny/llama").files["model.safetensors"])
    cancel = threading.Event()

    def progress(p: dict) -> None:
        if p["file"] == "model.safetensors" and p["file_done"] > 0:
            cancel.set()

    with pytest.raises(UserError) as caught:
        pull("tiny/llama", progress=progress, cancel=cancel)
    assert "cancel" in one_line(caught.value)
    first = hub.bytes_served("model.safetensors")
    assert 0 < first <= size
    blobs = cache_dir() / "models--tiny--llama" / "blobs"
    partial = [p for p in blobs.iterdir() if p.name.endswith(".partial")] if blobs.is_dir() else []
    kept = sum(p.stat().st_size for p in partial)
    hub.reset_counts()
    result = pull("tiny/llama")
    assert (Path(result["path"]) / "model.safetensors").stat().st_size == size
    again = hub.bytes_served("model.safetensors")
    # the spec: "cancel ... keeps the partial file for resume"; "an interrupted file resumes"
    assert kept > 0 and again == size - kept, (
        f"the cancelled download kept {kept} bytes ({[p.name for p in partial]}); the next pull fetched "
        f"{again} of {size} bytes of model.safetensors (the whole file again)")


def test_a_pinned_revision_gives_a_source_that_plan_and_pull_agree_on_and_that_loads_offline(
        hub, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from huggingface_hub import constants
    from tunedeck.core.hub import plan_pull, pull
    from tunedeck.core.models import resolve_source

    sha = repo_of(hub, "tiny/llama").sha
    plan, result = plan_pull("tiny/llama", sha), pull("tiny/llama", sha)
    data_sha = repo_of(hub, "tiny/chat", "dataset").sha
    with pytest.raises(UserError, match="pulled at its main branch"):  # dataset.path names a dataset's main branch
        plan_pull("tiny/chat", data_sha, dataset=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert plan["source"] == result["source"]
    assert Path(resolve_source(result["source"]).path) == Path(result["path"])


def test_a_users_own_HF_HUB_OFFLINE_is_kept_and_said(hub, monkeypatch):
    import tunedeck.core
    from tunedeck.core.hub import plan_pull, search_models

    monkeypatch.setattr(tunedeck.core, "HUB_OFFLINE_FROM_USER", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (lambda: search_models("tiny"), lambda: plan_pull("tiny/llama")):
        with pytest.raises(UserError) as caught:
            call()
        assert "HF_HUB_OFFLINE" in one_line(caught.value)
    assert hub.connections == 0


# -- refusals, each in one line --------------------------------------------------------------------------


def test_a_gated_repo_without_a_token_says_how_to_get_access(hub):
    from tunedeck.core.hub import plan_pull, pull

    for call in (lambda: plan_pull("tiny/llama-gated"), lambda: pull("tiny/llama-gated")):
        with pytest.raises(UserError) as caught:
            call()
        message = one_line(caught.value)
        assert "tiny/llama-gated" in message and "HF_TOKEN" in message and "hf auth login" in message, message
        assert "accept" in message.lower(), message
    assert hub.bytes_served("model.safetensors") == 0


def test_a_gated_repo_with_a_token_without_access_is_refused(hub, monkeypatch):
    from tunedeck.core.hub import plan_pull

    monkeypatch.setenv("HF_TOKEN", NO_ACCESS_TOKEN)
    with pytest.raises(UserError) as caught:
        plan_pull("tiny/llama-gated")
    message = one_line(caught.value)
    assert "tiny/llama-gated" in message and "accept" in message.lower(), message


def test_a_gated_repo_with_HF_TOKEN_pulls(hub, monkeypatch):
    from tunedeck.core.hub import pull

    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    gated = repo_of(hub, "tiny/llama-gated")
    result = pull("tiny/llama-gated")
    assert result["source"] == "tiny/llama-gated" and result["revision"] == gated.sha
    assert (Path(result["path"]) / "model.safetensors").stat().st_size == len(gated.files["model.safetensors"])
    resolves = [r for r in hub.requests if "/resolve/" in r["path"]]
    assert resolves and all(r["auth"] == f"Bearer {GOOD_TOKEN}" for r in resolves)


def test_the_token_hf_auth_login_saved_is_used(hub):
    from huggingface_hub import constants
    from tunedeck.core.hub import plan_pull

    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(GOOD_TOKEN)
    assert plan_pull("tiny/llama-gated")["revision"] == repo_of(hub, "tiny/llama-gated").sha
    assert plan_pull("tiny/private")["revision"] == repo_of(hub, "tiny/private").sha


def test_a_missing_repo_or_revision_is_one_line(hub):
    from tunedeck.core.hub import plan_pull, pull

    cases = [(lambda: plan_pull("tiny/does-not-exist"), "tiny/does-not-exist"),
             (lambda: pull("tiny/does-not-exist"), "tiny/does-not-exist"),
             (lambda: plan_pull("tiny/does-not-exist", dataset=True), "tiny/does-not-exist"),
             (lambda: plan_pull("tiny/llama", "no-such-branch"), "tiny/llama"),
             (lambda: plan_pull("tiny/private"), "tiny/private"),
             (lambda: plan_pull("not a repo id"), "not a repo id")]
    for call, name in cases:
        with pytest.raises(UserError) as caught:
            call()
        assert name in one_line(caught.value), caught.value
    with pytest.raises(UserError) as caught:
        plan_pull("tiny/private")
    assert "HF_TOKEN" in caught.value.message  # private: says how to authenticate


@pytest.fixture
def no_network(hub, monkeypatch):
    """huggingface_hub pointed at a port nothing listens on; its retry waits recorded, not slept."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    endpoint = f"http://127.0.0.1:{free_port()}"
    point_hub_at(monkeypatch, endpoint, Path(constants.HF_HOME))
    waits: list[float] = []

    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            waits.append(seconds)

    monkeypatch.setattr(_http, "time", Clock())
    return waits


def test_no_network_is_one_line(no_network, hub):
    from tunedeck.core.hub import plan_pull, pull, search_models

    for call in (lambda: search_models("tiny"), lambda: plan_pull("tiny/llama"), lambda: pull("tiny/llama"),
                 lambda: plan_pull("tiny/chat", dataset=True)):
        with pytest.raises(UserError) as caught:
            call()
        message = one_line(caught.value)
        assert "reach" in message or "network" in message or "connect" in message.lower(), message
    assert hub.connections == 0


def test_no_network_fails_fast_for_search(no_network):
    """huggingface_hub's listing retries a refused connection 5 times (1+2+4+8+8 s): a search
    with the network down would wait 23 s before saying so."""
    from tunedeck.core.hub import search_models

    with pytest.raises(UserError):
        search_models("tiny")
    assert sum(no_network) <= 5, f"search waits {sum(no_network):.0f} s in retries before it says so: {no_network}"


def test_pickle_only_weights_are_refused_unless_allowed(hub):
    from tunedeck.core.hub import plan_pull, pull

    with pytest.raises(UserError) as caught:
        plan_pull("tiny/pickle-only")
    message = one_line(caught.value)
    assert "pickle" in message and "allow-pickle" in message, message
    with pytest.raises(UserError):
        pull("tiny/pickle-only")
    assert not hub.file_gets("pytorch_model.bin")

    plan = plan_pull("tiny/pickle-only", allow_pickle=True)
    assert "pytorch_model.bin" in {f["name"] for f in plan["files"]} and plan["skipped"] == []
    result = pull("tiny/pickle-only", allow_pickle=True)
    assert (Path(result["path"]) / "pytorch_model.bin").read_bytes() == \
        repo_of(hub, "tiny/pickle-only").files["pytorch_model.bin"]


def test_an_architecture_transformers_does_not_know_is_refused_before_the_weights(hub):
    from tunedeck.core.hub import plan_pull, pull

    for call in (lambda: plan_pull("tiny/nonsense"), lambda: pull("tiny/nonsense")):
        with pytest.raises(UserError) as caught:
            call()
        assert "nonsense-arch" in one_line(caught.value), caught.value
    assert hub.bytes_served("model.safetensors") == 0


# -- datasets -------------------------------------------------------------------------------------------------


def test_pull_a_dataset_then_a_project_previews_it_offline_by_its_repo_id(hub, tmp_path, tiny_model_dir,
                                                                          monkeypatch, capsys):
    from huggingface_hub import constants
    from tunedeck.core.cli import main
    from tunedeck.core.hub import plan_pull, pull

    chat = repo_of(hub, "tiny/chat", "dataset")
    plan = plan_pull("tiny/chat", dataset=True)
    assert plan["kind"] == "dataset" and plan["source"] == "tiny/chat" and plan["revision"] == chat.sha
    assert "data/train-00000-of-00001.parquet" in {f["name"] for f in plan["files"]}
    assert ".gitattributes" not in {f["name"] for f in plan["files"]}
    result = pull("tiny/chat", dataset=True)
    snapshot = cache_dir() / "datasets--tiny--chat" / "snapshots" / chat.sha
    assert Path(result["path"]) == snapshot and result["source"] == "tiny/chat" and result["kind"] == "dataset"
    assert (snapshot / "data" / "train-00000-of-00001.parquet").is_file()
    assert (cache_dir() / "datasets--tiny--chat" / "refs" / "main").read_text() == chat.sha

    hub.reset_counts()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name in ("tiny/chat", "hf:tiny/chat"):  # the repo id, or hf: for the cache alone (never a local path)
        project = write_project(tmp_path / name.replace(":", "-").replace("/", "-"), str(tiny_model_dir), data=name)
        assert main(["preview", str(project), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["stats"]["rows"] == len(CHAT_ROWS)
        assert report["row"]["fields"]["messages"][0]["content"] == CHAT_ROWS[0]["messages"][0]["content"]
    assert hub.requests == [] and hub.connections == 0


# -- the commands -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_pull_json_in_a_real_process_takes_the_endpoint_from_the_environment(hub, tmp_path):
    home = tmp_path / "user-hf"
    result = subprocess.run([sys.executable, "-m", "tunedeck.core", "pull", "tiny/llama", "--json"],
                            check=False, capture_output=True, text=True, env=clean_env(hub, home), timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    llama = repo_of(hub, "tiny/llama")
    assert out["repo"] == "tiny/llama" and out["revision"] == llama.sha and out["source"] == "tiny/llama"
    assert set(out["files"]) == MODEL_FILES and out["kind"] == "model"
    assert Path(out["path"]) == home / "hub" / "models--tiny--llama" / "snapshots" / llama.sha
    assert (Path(out["path"]) / "model.safetensors").is_file()
    assert "Traceback" not in result.stderr


def test_cli_pull_exit_codes_and_one_line_errors(hub, capsys):
    from tunedeck.core.cli import main

    for args in (["pull", "tiny/does-not-exist"], ["pull", "tiny/pickle-only"], ["pull", "tiny/nonsense"],
                 ["pull", "tiny/llama-gated"], ["pull", "--dataset", "tiny/nope"]):
        assert main(args) == 2, args
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tunedeck: error: "), (args, captured.err)
        assert captured.out == "", args

    assert main(["pull", "tiny/pickle-only", "--allow-pickle", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "pytorch_model.bin" in out["files"]

    assert main(["pull", "--dataset", "tiny/chat"]) == 0
    captured = capsys.readouterr()
    assert 'dataset.path = "tiny/chat"' in captured.out, captured.out
    assert "parquet" in captured.err  # the plan and the progress, on stderr


def test_cli_models_search(hub, capsys):
    from tunedeck.core.cli import main

    assert main(["models", "--search", "tiny", "--limit", "3", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in found] == ["tiny/llama", "tiny/llama-gated", "tiny/pickle-only"]
    assert main(["models", "--search", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "tiny/llama-gated" in out and "tunedeck pull" in out


@pytest.mark.parametrize("started_by", ["the app", "a clean shell"])
def test_engine_ops_search_plan_and_a_streamed_pull(hub, tmp_path, monkeypatch, started_by):
    """The engine process (the app's way in) takes the endpoint from its environment. Started
    by the app, it inherits the app's HF_HUB_OFFLINE=1, which is tunedeck's default (the user
    set none): a search or pull the user asks for lifts it there too."""
    from tunedeck.core.engine import EngineClient, EngineError

    for name in OFFLINE_VARS:  # the user's environment: tunedeck's own offline default applies
        monkeypatch.delenv(name, raising=False)
    if started_by == "the app":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("TUNEDECK_HUB_OFFLINE", "default")
    else:
        monkeypatch.delenv("TUNEDECK_HUB_OFFLINE", raising=False)
    with EngineClient(log_path=tmp_path / "engine.log") as client:
        found = client.hub_search("tiny", limit=2, timeout=60)["models"]
        assert [m["id"] for m in found] == ["tiny/llama", "tiny/llama-gated"]
        plan = client.hub_plan("tiny/chat", dataset=True, timeout=60)
        assert plan["kind"] == "dataset" and plan["source"] == "tiny/chat"
        partials: list[dict] = []
        result = client.hub_pull("tiny/chat", dataset=True, on_progress=partials.append, timeout=60)
        assert result["source"] == "tiny/chat" and Path(result["path"]).is_dir()
        assert partials and all(set(p) == PROGRESS_KEYS for p in partials), partials[:2]
        assert partials[-1]["done"] == partials[-1]["total"] == result["bytes"]
        with pytest.raises(EngineError) as caught:
            client.hub_plan("tiny/does-not-exist", timeout=60)
        assert "tiny/does-not-exist" in one_line(caught.value)


# -- nothing else connects ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("user_offline", [None, "0"], ids=["tunedeck-default", "user-HF_HUB_OFFLINE=0"])
def test_check_inspect_and_preview_of_a_local_project_open_no_connection(hub, tmp_path, tiny_model_dir,
                                                                         user_offline):
    """With HF_ENDPOINT pointing at the stand-in (and no offline flag from the user, or even
    HF_HUB_OFFLINE=0), the commands that read a local model and dataset never connect."""
    project = write_project(tmp_path / "proj", str(tiny_model_dir), rows=CHAT_ROWS)
    extra = {} if user_offline is None else {"HF_HUB_OFFLINE": user_offline}
    env = clean_env(hub, tmp_path / "user-hf", **extra)
    hub.reset_counts()
    procs = {cmd: subprocess.Popen([sys.executable, "-m", "tunedeck.core", cmd, str(project), "--json"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for cmd in ("check", "inspect", "preview")}
    for cmd, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (cmd, err)
        json.loads(out)
    assert hub.connections == 0 and hub.requests == [], hub.requests


# -- disks -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs folder of that many MiB; skipped when this machine cannot mount one."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)],
                              check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {(done.stderr or done.stdout).strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def test_not_enough_space_is_refused_before_downloading_and_says_how_much(hub, small_disk, monkeypatch):
    from huggingface_hub import constants
    from tunedeck.core.hub import plan_pull, pull

    disk = small_disk(2)
    point_hub_at(monkeypatch, hub.endpoint, disk / "hf")
    weights = len(repo_of(hub, "tiny/big-weights").files["model.safetensors"])
    plan = plan_pull("tiny/big-weights")
    assert plan["free"] <= 2 * 2**20 < plan["total"] and Path(constants.HF_HUB_CACHE).is_relative_to(disk)
    with pytest.raises(UserError) as caught:
        pull("tiny/big-weights")
    message = one_line(caught.value)
    assert "2.5 MiB" in message or str(weights) in message, message  # how much is needed
    assert hub.bytes_served("model.safetensors") == 0


def test_a_disk_that_fills_mid_download_keeps_the_partial_file_and_says_how_much(hub, small_disk, monkeypatch):
    from tunedeck.core.hub import pull

    disk = small_disk(4)
    point_hub_at(monkeypatch, hub.endpoint, disk / "hf")
    filled = []

    def fill(p: dict) -> None:  # another program takes the space once the download has started
        if p["file"] == "model.safetensors" and not filled:
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * max(free - 2**20, 0))
            filled.append(free)

    with pytest.raises(UserError) as caught:
        pull("tiny/big-weights", progress=fill)
    message = one_line(caught.value)
    assert filled and ("full" in message or "filled" in message or "space" in message), message
    assert "MiB" in message, message  # says how much space is needed
    blobs = cache_dir() / "models--tiny--big-weights" / "blobs"
    partial = [p for p in blobs.iterdir() if p.name.endswith(".partial")] if blobs.is_dir() else []
    assert partial and sum(p.stat().st_size for p in partial) > 0, (
        f"the partial file is not kept: {sorted(p.name for p in blobs.iterdir()) if blobs.is_dir() else []}")
