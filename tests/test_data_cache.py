"""Rendered rows kept on disk: the trainer and the whole-set stats tokenize a dataset once;
a change to the data, the tokenizer or a setting that decides the tokens renders afresh;
the rows read back are exactly a fresh render's; a damaged cache file is rewritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunedeck.core import preview
from tunedeck.core.datafile import load_splits
from tunedeck.core.project import Project
from tunedeck.core.render import render_splits
from tunedeck.core.rendercache import CacheFile, cache_path

CALL = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}


def rows(n: int, tag: str) -> list[dict]:
    out = []
    for i in range(n):
        out.append({"messages": [{"role": "user", "content": f"{tag} question {i}?"},
                                 {"role": "assistant", "content": f"{tag} answer {i}. " * (1 + i % 4)}]})
    # the chat template cannot render tool calls: kept as a refusal, read back as one
    out.append({"messages": [{"role": "user", "content": "call it"},
                             {"role": "assistant", "content": "", "tool_calls": [CALL]},
                             {"role": "tool", "content": "found", "name": "lookup"},
                             {"role": "assistant", "content": "done"}]})
    # a long prompt: nothing trains after truncation to max_length
    out.append({"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]})
    out.append({"text": f"a plain {tag} document to continue."})
    return out


@pytest.fixture
def cache_dir(tmp_path, monkeypatch, default_model_dir):
    """An empty cache folder of the test's own (after the default model is in the real one)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


class Counting:
    """The tokenizer, counting the calls that tokenize or apply the chat template."""

    def __init__(self, tokenizer) -> None:
        self.__dict__["_tok"] = tokenizer
        self.__dict__["calls"] = 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):  # the trainer sets the chat template it trained with
        setattr(self._tok, name, value)

    def __call__(self, *args, **kwargs):
        self.__dict__["calls"] += 1
        return self._tok(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.__dict__["calls"] += 1
        return self._tok.apply_chat_template(*args, **kwargs)


def make_project(tmp_path: Path, model_dir: Path, **settings: object) -> Project:
    for name, tag in (("a.jsonl", "alpha"), ("b.jsonl", "beta")):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows(30, tag)), encoding="utf-8")
    text = (f'schema = 1\nname = "p"\n[model]\nsource = "{model_dir}"\n[quantization]\nmode = "none"\n'
            '[dataset]\npath = [{path = "a.jsonl", weight = 2}, {path = "b.jsonl", weight = 0.5}]\n'
            'eval_split = 0.2\nmax_length = 64\n')
    (tmp_path / "p.toml").write_text(text, encoding="utf-8")
    project = Project.load(tmp_path / "p.toml")
    for key, value in settings.items():
        project.set(key.replace("__", "."), value)
    return project


def train_data(project: Project, tokenizer):
    """The trainer's own data step: (train examples, eval examples, data info, warnings)."""
    from tunedeck.core.finetune import Run

    warnings: list[str] = []
    emit = type("Emit", (), {"warn": lambda self, text: warnings.append(text)})()
    run = Run.__new__(Run)  # only the data path: no run folder, no model
    run.project, run.emit, run.ref = project, emit, type("Ref", (), {"display": "m"})()
    train, eval_ds, info = run._datasets(tokenizer)
    return [dict(x) for x in train], [dict(x) for x in eval_ds], info, warnings


def distinct_rows(project: Project) -> int:
    from tunedeck.core.rendercache import row_digest

    splits = load_splits(project)
    return len({row_digest(m) for _, m in splits.train + splits.eval})


# -- the trainer ------------------------------------------------------------------------------


def test_a_second_run_reads_the_cache_and_tokenizes_nothing(tmp_path, default_model_dir, tok, cache_dir):
    project = make_project(tmp_path, default_model_dir)
    first_tok = Counting(tok)
    train1, eval1, info1, warn1 = train_data(project, first_tok)
    unique = distinct_rows(project)
    assert first_tok.calls > 0
    # each distinct row rendered once, though weight 2 repeats every row of a.jsonl
    assert info1["render_cache"]["rows_rendered"] == unique
    assert info1["render_cache"]["rows_read"] == 0 and info1["render_cache"]["written"]
    assert Path(info1["render_cache"]["file"]) == cache_path(project) and cache_path(project).is_file()
    assert info1["train"]["rows"] > unique - len(eval1)  # the weighted set is longer than its distinct rows

    second_tok = Counting(tok)
    train2, eval2, info2, warn2 = train_data(project, second_tok)
    assert second_tok.calls == 0
    assert info2["render_cache"] == {**info1["render_cache"], "rows_read": unique, "rows_rendered": 0,
                                     "used": True, "written": False}
    assert (train2, eval2) == (train1, eval1)
    assert (info2["train"], info2["eval"]) == (info1["train"], info1["eval"])
    assert warn2 == warn1  # the refused and fully masked rows are reported the same way
    assert any("cannot render" in w for w in warn2) and any("nothing to train" in w for w in warn2)


def test_rows_read_back_are_a_fresh_renders(tmp_path, default_model_dir, tok, cache_dir):
    from tunedeck.core.rendercache import RowCache

    project = make_project(tmp_path, default_model_dir)
    train_data(project, tok)  # writes the cache
    splits = load_splits(project)
    fresh = render_splits(project, tok, splits, model_label="m")
    cache = RowCache(cache_path(project), repeats=True)
    counting = Counting(tok)
    cached = render_splits(project, counting, splits, model_label="m", cache=cache)
    assert counting.calls == 0 and cache.read == distinct_rows(project)
    assert cached.train == fresh.train and cached.eval == fresh.eval
    assert cached.train_stats == fresh.train_stats and cached.eval_stats == fresh.eval_stats
    assert cached.template == fresh.template


@pytest.mark.parametrize("key, value", [
    ("model.chat_template", "chatml"), ("dataset.max_length", 48), ("dataset.loss_on", "all"),
    ("dataset.system_prompt", "Be brief."), ("dataset.reasoning", "drop"), ("dataset.format", "messages"),
    ("dataset.columns", {"messages": "messages"}), ("model.trust_remote_code", True),
])
def test_each_setting_that_decides_the_tokens_names_another_file(tmp_path, default_model_dir, cache_dir, key, value):
    project = make_project(tmp_path, default_model_dir)
    before = cache_path(project)
    project.set(key, value)
    assert cache_path(project) != before


def test_settings_that_do_not_decide_the_tokens_keep_the_file(tmp_path, default_model_dir, cache_dir):
    project = make_project(tmp_path, default_model_dir)
    before = cache_path(project)
    for key, value in (("training.learning_rate", 1e-3), ("dataset.eval_split", 0.3), ("training.seed", 7),
                       ("dataset.packing", True)):
        project.set(key, value)
    assert cache_path(project) == before


def test_a_changed_setting_renders_again_and_matches_a_fresh_render(tmp_path, default_model_dir, tok, cache_dir):
    project = make_project(tmp_path, default_model_dir)
    train_data(project, tok)
    project.set("dataset.max_length", 40)
    counting = Counting(tok)
    train, eval_rows, info, _ = train_data(project, counting)
    assert counting.calls > 0 and info["render_cache"]["rows_read"] == 0
    fresh = render_splits(project, tok, load_splits(project), model_label="m")
    assert train == fresh.train and eval_rows == fresh.eval
    assert max(len(x["input_ids"]) for x in train) <= 40


def test_touching_a_data_file_renders_again(tmp_path, default_model_dir, tok, cache_dir):
    project = make_project(tmp_path, default_model_dir)
    train_data(project, tok)
    before = cache_path(project)
    st = (tmp_path / "b.jsonl").stat()
    os.utime(tmp_path / "b.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_path(project) != before
    counting = Counting(tok)
    _, _, info, _ = train_data(project, counting)
    assert counting.calls > 0 and info["render_cache"]["rows_read"] == 0
    assert info["render_cache"]["rows_rendered"] == distinct_rows(project)


def damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_flip_a_token(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[41] ^= 0x5A  # inside the tokens: the sizes still add up, the digest does not
    path.write_bytes(bytes(data))


def damage_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(3000))


def damage_empty(path: Path) -> None:
    path.write_bytes(b"")


def damage_foreign_footer(path: Path) -> None:
    data = path.read_bytes()
    footer_end = len(data) - 16
    path.write_bytes(data[:footer_end] + (999).to_bytes(8, "little") + data[footer_end + 8:])


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_a_token, damage_garbage, damage_empty,
                                    damage_foreign_footer])
def test_a_damaged_cache_file_is_ignored_and_rewritten(tmp_path, default_model_dir, tok, cache_dir, damage):
    project = make_project(tmp_path, default_model_dir)
    train1, eval1, _, _ = train_data(project, tok)
    path = cache_path(project)
    damage(path)
    assert CacheFile.open(path) is None
    counting = Counting(tok)
    train2, eval2, info, _ = train_data(project, counting)
    assert counting.calls > 0
    assert info["render_cache"]["damaged_file_ignored"] and info["render_cache"]["written"]
    assert (train2, eval2) == (train1, eval1)
    assert CacheFile.open(path) is not None  # rewritten whole
    counting = Counting(tok)
    train3, _, info, _ = train_data(project, counting)
    assert counting.calls == 0 and info["render_cache"]["used"] and train3 == train1


def test_a_pipe_in_the_cache_files_place_is_not_read(tmp_path, default_model_dir, tok, cache_dir):
    project = make_project(tmp_path, default_model_dir)
    path = cache_path(project)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    _, _, info, _ = train_data(project, tok)  # would hang on reading a pipe
    assert info["render_cache"]["damaged_file_ignored"] and info["render_cache"]["written"]
    assert path.is_file() and CacheFile.open(path) is not None


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path, default_model_dir, tok, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(blocker))  # kept/ cannot be made under a file
    project = make_project(tmp_path, default_model_dir)
    train, eval_rows, info, _ = train_data(project, tok)
    fresh = render_splits(project, tok, load_splits(project), model_label="m")
    assert train == fresh.train and eval_rows == fresh.eval
    assert not info["render_cache"]["written"] and not info["render_cache"]["used"]
    assert list(tmp_path.glob("**/.rendered-*")) == []  # no temp file left behind


def test_old_cache_files_are_removed_beyond_a_few(tmp_path, default_model_dir, tok, cache_dir):
    from tunedeck.core.rendercache import FILES_KEPT

    project = make_project(tmp_path, default_model_dir)
    for length in range(40, 40 + FILES_KEPT + 2):
        project.set("dataset.max_length", length)
        train_data(project, tok)
    kept = sorted((cache_dir / "kept").glob("rendered-*.bin"))
    assert len(kept) == FILES_KEPT and cache_path(project) in kept


# -- the stats pass ----------------------------------------------------------------------------


def test_training_after_the_stats_tokenizes_nothing(tmp_path, default_model_dir, tok, cache_dir, monkeypatch):
    project = make_project(tmp_path, default_model_dir)
    stats_tok = Counting(tok)
    monkeypatch.setattr(preview, "project_tokenizer", lambda p: stats_tok)
    stats = preview.preview_stats(project)  # the project's own tokenizer: the cache is used
    assert stats["done"] and stats_tok.calls > 0 and cache_path(project).is_file()

    counting = Counting(tok)
    train, eval_rows, info, _ = train_data(project, counting)
    assert counting.calls == 0
    assert info["render_cache"]["rows_read"] == distinct_rows(project) and info["render_cache"]["rows_rendered"] == 0
    fresh = render_splits(project, tok, load_splits(project), model_label="m")
    assert train == fresh.train and eval_rows == fresh.eval

    again = Counting(tok)
    monkeypatch.setattr(preview, "project_tokenizer", lambda p: again)
    assert preview.preview_stats(project) == stats and again.calls == 0


def test_the_stats_pass_reads_what_training_wrote(tmp_path, default_model_dir, tok, cache_dir, monkeypatch):
    project = make_project(tmp_path, default_model_dir)
    project.set("dataset.path", [{"path": "a.jsonl", "weight": 2}, "b.jsonl"])  # training uses every row
    uncached = preview.preview_stats(project, tokenizer=tok)  # a tokenizer passed in: no cache
    assert not cache_path(project).exists()
    train_data(project, tok)
    counting = Counting(tok)
    monkeypatch.setattr(preview, "project_tokenizer", lambda p: counting)
    assert preview.preview_stats(project) == uncached and counting.calls == 0


def test_the_stats_pass_renders_only_the_rows_training_left_out(tmp_path, default_model_dir, tok, cache_dir,
                                                               monkeypatch):
    project = make_project(tmp_path, default_model_dir)  # weight 0.5: training renders half of b.jsonl
    uncached = preview.preview_stats(project, tokenizer=tok)
    _, _, info, _ = train_data(project, tok)
    counting = Counting(tok)
    monkeypatch.setattr(preview, "project_tokenizer", lambda p: counting)
    assert preview.preview_stats(project) == uncached and counting.calls > 0
    kept = CacheFile.open(cache_path(project))
    assert len(kept) > info["render_cache"]["rows_rendered"]  # the rows it rendered were added
    again = Counting(tok)
    monkeypatch.setattr(preview, "project_tokenizer", lambda p: again)
    assert preview.preview_stats(project) == uncached and again.calls == 0


def test_a_cancelled_stats_pass_keeps_the_rows_it_rendered(tmp_path, default_model_dir, tok, cache_dir, monkeypatch):
    import threading

    project = make_project(tmp_path, default_model_dir)
    monkeypatch.setattr(preview, "project_tokenizer", lambda p: tok)
    monkeypatch.setattr(preview, "PROGRESS_EVERY_S", 0.0)
    cancel = threading.Event()
    seen: list[int] = []

    def progress(partial):
        seen.append(partial["rows"])
        if partial["rows"] >= 10:
            cancel.set()

    partial = preview.preview_stats(project, progress=progress, cancel=cancel)
    assert not partial["done"] and partial["rows"] < 60
    kept = CacheFile.open(cache_path(project))
    assert kept is not None and 0 < len(kept) < distinct_rows(project)
    counting = Counting(tok)
    _, _, info, _ = train_data(project, counting)  # renders the rest, and keeps the whole set
    assert info["render_cache"]["rows_read"] == len(kept)
    assert info["render_cache"]["rows_read"] + info["render_cache"]["rows_rendered"] == distinct_rows(project)
    assert len(CacheFile.open(cache_path(project))) == distinct_rows(project)
