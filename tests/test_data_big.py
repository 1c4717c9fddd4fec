"""Big dataset files: the first row reads only the start of the file, the whole-set stats
and the held-out split stream (partials, cancel) with memory that does not grow with the
file, and the held-out positions agree with the trainer's split row for row."""

from __future__ import annotations

import builtins
import io
import json
import random
import threading
import tracemalloc
from pathlib import Path

import pytest

from tunedeck.core import datafile, preview
from tunedeck.core.datafile import load_splits
from tunedeck.core.project import Project

BIG_MB = 40


def conversation(i: int, rng: random.Random) -> dict:
    words = ["model", "token", "gradient", "layer", "adapter", "batch", "loss", "epoch", "rank", "alpha"]
    turns = []
    for t in range(1 + i % 3):
        turns.append({"role": "user", "content": f"Question {i}.{t}: " + " ".join(rng.choices(words, k=30))})
        turns.append({"role": "assistant", "content": f"Answer {i}.{t}: " + " ".join(rng.choices(words, k=45))})
    return {"messages": turns}


def write_rows(path: Path, target_bytes: int | None = None, count: int | None = None, *, bad_every: int = 0,
               seed: int = 0) -> int:
    """Rows of chat to ``path`` up to a size or a count; every ``bad_every``-th line broken. Returns rows written."""
    rng = random.Random(seed)
    written = n = 0
    with open(path, "w", encoding="utf-8") as fh:
        while (target_bytes is None or written < target_bytes) and (count is None or n < count):
            if bad_every and n % bad_every == bad_every - 1:
                line = '{"messages": [' if n % 2 else json.dumps({"prompt_only": n})
            else:
                line = json.dumps(conversation(n, rng))
            fh.write(line + "\n")
            written += len(line) + 1
            n += 1
            if bad_every and n % (3 * bad_every) == 0:
                fh.write("\n")  # a blank line is not a row
    return n


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    rows = write_rows(path, BIG_MB << 20)
    return path, rows


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def make_project(tmp_path: Path, model_dir: Path, data: object, **settings: object) -> Project:
    (tmp_path / "p.toml").write_text(
        f'schema = 1\nname = "p"\n[model]\nsource = "{model_dir}"\n[quantization]\nmode = "none"\n'
        '[dataset]\npath = "x.jsonl"\neval_split = 0.1\n', encoding="utf-8")
    project = Project.load(tmp_path / "p.toml")
    project.set("dataset.path", data if not isinstance(data, Path) else str(data))
    for key, value in settings.items():
        project.set(key.replace("__", "."), value)
    return project


class ReadCounter:
    """Counts the bytes the dataset reader takes from files opened for binary reading."""

    def __init__(self) -> None:
        self.bytes = 0

    def open(self, path, mode="r", *args, **kwargs):
        if mode != "rb":
            return builtins.open(path, mode, *args, **kwargs)
        counter = self

        class Counted(io.FileIO):
            def readinto(self, buffer):
                n = super().readinto(buffer)
                counter.bytes += n or 0
                return n

        return io.BufferedReader(Counted(path, "r"))


@pytest.fixture
def reads(monkeypatch) -> ReadCounter:
    counter = ReadCounter()
    monkeypatch.setattr(datafile, "open", counter.open, raising=False)
    return counter


@pytest.fixture
def fresh_held(monkeypatch, tmp_path):
    """No held-out split known yet: in this process or on disk."""
    preview._read_held.cache_clear()
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(tmp_path / "cache"))


# -- one row ------------------------------------------------------------------------------------


def test_the_first_row_reads_only_the_start_of_a_big_file(tmp_path, default_model_dir, tok, big_file, reads):
    path, _ = big_file
    project = make_project(tmp_path, default_model_dir, path)
    row = preview.preview_row(project, tokenizer=tok)
    assert row["row"] == 1 and row["index"] == 0 and not row["last"] and not row["error"]
    assert row["messages"] == conversation(0, random.Random(0))["messages"] and row["tokens"]
    assert 0 < reads.bytes < 1 << 20  # the format is told from the first 200 rows; nothing more is read
    assert path.stat().st_size > 30 * reads.bytes


def test_a_row_by_position_or_number_reads_up_to_it(tmp_path, default_model_dir, tok, big_file, reads):
    path, _ = big_file
    project = make_project(tmp_path, default_model_dir, path)
    by_index = preview.preview_row(project, index=1000, tokenizer=tok)
    by_number = preview.preview_row(project, row=1001, tokenizer=tok)
    assert by_index["row"] == by_number["row"] == 1001 and by_index["index"] == by_number["index"] == 1000
    assert by_index["text"] == by_number["text"] and not by_index["last"] and not by_number["last"]
    assert reads.bytes < path.stat().st_size // 10


def test_the_first_rows_show_when_the_file_is_damaged_after_its_first_megabyte(tmp_path, default_model_dir, tok,
                                                                               big_file):
    path, _ = big_file
    damaged = tmp_path / "damaged.jsonl"
    with open(path, "rb") as src, open(damaged, "wb") as out:
        out.write(src.read(1 << 20))
        out.write(random.Random(1).randbytes(8 << 20))  # not UTF-8, not JSON: a disk that went bad
    project = make_project(tmp_path, default_model_dir, damaged)
    for index in (0, 5):
        row = preview.preview_row(project, index=index, tokenizer=tok)
        assert row["row"] == index + 1 and not row["error"] and row["tokens"] and not row["last"]


def test_search_streams_to_the_first_hit(tmp_path, default_model_dir, big_file, reads):
    path, _ = big_file
    project = make_project(tmp_path, default_model_dir, path)
    assert preview.preview_search(project, "Question 42.0:") == {"index": 42, "row": 43}
    assert reads.bytes < 1 << 20


# -- the whole set ---------------------------------------------------------------------------------


def test_stats_stream_partials_then_one_final_answer(tmp_path, default_model_dir, tok, monkeypatch):
    write_rows(tmp_path / "small.jsonl", count=120, bad_every=17)
    project = make_project(tmp_path, default_model_dir, tmp_path / "small.jsonl")
    monkeypatch.setattr(preview, "PROGRESS_EVERY_S", 0.0)
    partials: list[dict] = []
    final = preview.preview_stats(project, tokenizer=tok, progress=partials.append)
    assert final["done"] and final["rows"] == 120
    assert partials and all(not p["done"] for p in partials)
    counts = [p["rows"] for p in partials]
    assert counts == sorted(counts) and counts[-1] <= final["rows"]
    assert all(p["refusal"] is None for p in partials)  # a partial never refuses for rows it has not read
    assert final == preview.preview_stats(project, tokenizer=tok)  # the same answer without partials


def test_stats_of_a_big_file_read_it_as_they_go_and_stop_on_cancel(tmp_path, default_model_dir, tok, big_file,
                                                                 reads, monkeypatch):
    path, _ = big_file
    project = make_project(tmp_path, default_model_dir, path)
    monkeypatch.setattr(preview, "PROGRESS_EVERY_S", 0.0)
    cancel = threading.Event()
    read_at: list[int] = []

    def progress(partial):
        read_at.append(reads.bytes)
        if len(read_at) == 5:
            cancel.set()

    result = preview.preview_stats(project, tokenizer=tok, progress=progress, cancel=cancel)
    assert not result["done"] and 0 < result["rows"] < 50 and len(read_at) == 5
    assert reads.bytes < 1 << 20  # streamed: no whole-file read before or during the pass


# -- the rows held out for evaluation -------------------------------------------------------------


def held_rows(project: Project, positions: list[int]) -> list[tuple[int, list]]:
    """(row number, conversation) of the rows at ``positions``, read as the preview reads them."""
    data = preview._Data(project)
    wanted = set(positions)
    return [(number, list(data.messages(k, entry))) for i, k, number, entry in data.entries() if i in wanted]


@pytest.mark.parametrize("split, seed", [(0.1, 42), (0.25, 7), (0.01, 3), (0.5, 0)])
def test_held_out_positions_agree_with_the_trainers_split_one_source(tmp_path, default_model_dir, fresh_held,
                                                                     split, seed):
    write_rows(tmp_path / "a.jsonl", count=400, bad_every=13)
    project = make_project(tmp_path, default_model_dir, tmp_path / "a.jsonl", dataset__eval_split=split,
                           training__seed=seed)
    answer = preview.held_out_positions(project, start=0)
    expected = [(number, list(conv)) for number, conv in load_splits(project).eval]
    assert answer["done"] and answer["eval_rows"] == len(expected) > 0
    assert held_rows(project, answer["held_in"]) == expected
    flags = preview.held_out_positions(project, range(400))["held"]
    assert [i for i, f in enumerate(flags) if f] == answer["held_in"]


def test_held_out_positions_agree_with_the_trainers_split_several_sources(tmp_path, default_model_dir, fresh_held):
    write_rows(tmp_path / "a.jsonl", count=150, bad_every=11, seed=1)
    write_rows(tmp_path / "b.jsonl", count=90, bad_every=7, seed=2)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}"}) + "\n"
                                              for i in range(60)), encoding="utf-8")
    sources = [{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl", "weight": 0.5}, "c.jsonl"]
    project = make_project(tmp_path, default_model_dir, sources, dataset__eval_split=0.2, training__seed=11)
    answer = preview.held_out_positions(project, start=0)
    expected = [(number, list(conv)) for number, conv in load_splits(project).eval]
    assert answer["eval_rows"] == len(expected) > 0
    assert held_rows(project, answer["held_in"]) == expected
    assert answer["usable"] == sum(s.summary.good for s in load_splits(project).sources)
    window = preview.held_out_positions(project, start=100, stop=200)["held_in"]
    assert window == [p for p in answer["held_in"] if 100 <= p < 200]


def test_a_finished_stats_pass_knows_the_held_out_rows(tmp_path, default_model_dir, tok, fresh_held, reads):
    write_rows(tmp_path / "a.jsonl", count=80, bad_every=9)
    project = make_project(tmp_path, default_model_dir, tmp_path / "a.jsonl", dataset__eval_split=0.2)
    assert preview.held_out_positions(project, [0, 1], compute=False) is None
    preview.preview_stats(project, tokenizer=tok)
    reads.bytes = 0
    known = preview.held_out_positions(project, start=0, compute=False)
    assert known is not None and reads.bytes == 0
    assert held_rows(project, known["held_in"]) == [(n, list(c)) for n, c in load_splits(project).eval]


def test_no_row_is_held_out_with_an_eval_file_or_no_split(tmp_path, default_model_dir, fresh_held, reads):
    write_rows(tmp_path / "a.jsonl", count=50)
    write_rows(tmp_path / "eval.jsonl", count=5)
    for split in (0.0, "eval.jsonl"):
        project = make_project(tmp_path, default_model_dir, tmp_path / "a.jsonl", dataset__eval_split=split)
        reads.bytes = 0
        answer = preview.held_out_positions(project, range(50), start=0)
        assert answer["held"] == [False] * 50 and answer["held_in"] == [] and answer["eval_rows"] == 0
        assert reads.bytes == 0  # known without reading a row
        splits = load_splits(project)
        assert len(splits.train) == 50 and (splits.eval == [] or isinstance(split, str))


@pytest.mark.slow
def test_held_out_positions_of_a_big_file_stream_in_flat_memory_and_are_kept(tmp_path, default_model_dir, big_file,
                                                                            fresh_held, reads, monkeypatch):
    path, rows = big_file
    project = make_project(tmp_path, default_model_dir, path)
    monkeypatch.setattr(preview, "PROGRESS_EVERY_S", 0.0)
    cancel = threading.Event()
    cancelled = preview.held_out_positions(project, [0], cancel=cancel, progress=lambda p: cancel.set())
    assert not cancelled["done"] and reads.bytes < 1 << 20

    monkeypatch.setattr(preview, "PROGRESS_EVERY_S", 0.5)
    reads.bytes = 0
    tracemalloc.start()
    try:
        answer = preview.held_out_positions(project, range(rows), start=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert answer["done"] and answer["rows"] == rows and answer["eval_rows"] == round(rows * 0.1)
    assert reads.bytes >= size
    # the usable positions (8 bytes a row), the shuffle and the answer's flags: not the file
    assert peak < size // 4 and peak < 64 * rows + (8 << 20)

    reads.bytes = 0
    assert preview.held_out_positions(project, [0])["done"] and reads.bytes == 0  # kept in the process
    preview._read_held.cache_clear()
    again = preview.held_out_positions(project, range(rows), start=0, compute=False)  # kept on disk
    assert again == answer and reads.bytes == 0


def test_the_held_out_ops_answer_through_the_engine(tmp_path, default_model_dir, fresh_held, monkeypatch):
    from tunedeck.core.engine.server import handle

    write_rows(tmp_path / "a.jsonl", count=200, bad_every=10)
    project = make_project(tmp_path, default_model_dir, tmp_path / "a.jsonl", dataset__eval_split=0.2)
    args = {"project_text": project.text(), "project_path": str(project.path), "positions": [0, 1, 2], "start": 0}
    expected = preview.held_out_positions(project, [0, 1, 2], start=0)
    preview._read_held.cache_clear()
    reply = handle({"id": 1, "op": "preview_held_out_stream", "args": args}, emit=lambda p: None,
                   cancel=threading.Event())
    assert reply == {"id": 1, "ok": True, "result": expected}
    preview._read_held.cache_clear()
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(tmp_path / "other-cache"))  # nothing known: a pass with partials
    monkeypatch.setattr(preview, "PROGRESS_EVERY_S", 0.0)
    partials: list[dict] = []
    reply = handle({"id": 2, "op": "preview_held_out_stream", "args": args}, emit=partials.append,
                   cancel=threading.Event())
    assert reply == {"id": 2, "ok": True, "result": expected}
    assert partials and all(p == {"done": False, "rows": p["rows"]} for p in partials)
    cancel = threading.Event()
    preview._read_held.cache_clear()
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(tmp_path / "third-cache"))
    reply = handle({"id": 3, "op": "preview_held_out_stream", "args": args}, emit=lambda p: cancel.set(),
                   cancel=cancel)
    assert reply["ok"] and not reply["result"]["done"] and reply["result"]["held"] == [False] * 3


@pytest.mark.slow
def test_the_engine_answers_a_row_while_it_reads_the_whole_set(tmp_path, default_model_dir):
    """A stats pass over a big file runs beside the rows asked for: a row comes back
    before the pass ends (and the pass stops on cancel)."""
    from tunedeck.core.engine import EngineClient

    data = tmp_path / "data.jsonl"
    write_rows(data, count=40_000)
    project = make_project(tmp_path, default_model_dir, "data.jsonl")
    request = {"project_text": project.text(), "project_path": str(project.path)}
    order: list[str] = []
    partials = threading.Event()
    cancel = threading.Event()
    with EngineClient(log_path=tmp_path / "engine.log") as client:
        client.preview_row(**request, index=0, timeout=120)  # the tokenizer is loaded

        def stats() -> None:
            result = client.preview_stats(**request, cancel=cancel, on_progress=lambda p: partials.set(),
                                          timeout=120)
            order.append("stats done" if result["done"] else "stats cancelled")

        thread = threading.Thread(target=stats)
        thread.start()
        assert partials.wait(60)  # the pass is under way
        row = client.preview_row(**request, index=30_000, timeout=60)
        order.append("row")
        cancel.set()
        thread.join(60)
    assert row["index"] == 30_000 and row["tokens"]
    assert order == ["row", "stats cancelled"]
