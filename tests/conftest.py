"""Shared fixtures: an isolated user config, the real default model, tiny random models."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# Randomised tests are reproducible: `make test` (and CI) draws the same examples every
# time, with no example database; `make fuzz` draws many more, fresh each time.
settings.register_profile("ci", derandomize=True, database=None, max_examples=40, deadline=None,
                          print_blob=True)
settings.register_profile("fuzz", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
SAMPLE = REPO / "sample_data"

# the user's own config is never touched, even by work that ends after its test (an app's
# worker writing recent projects): each test gets its own (below), the session one of its own
os.environ["TUNEDECK_CONFIG_DIR"] = tempfile.mkdtemp(prefix="tunedeck-test-config-")

# nothing in the tests reaches a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def cpu_precision_measured() -> None:
    """"auto" precision on a CPU follows a probe kept per machine (tunedeck.core.precision):
    measured once before any test, so "auto" means the same in every test, whichever ran
    first. In a process of its own: a test process that checks for torch has none."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "from tunedeck.core.precision import ensure_probe; ensure_probe()"],
                   check=True, capture_output=True)


@pytest.fixture(autouse=True)
def isolated_user_config(tmp_path_factory, monkeypatch):
    """Each test gets its own user config dir (theme, recent projects, model dirs)."""
    monkeypatch.setenv("TUNEDECK_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct, converted once to the user cache."""
    from tunedeck.core.models import ensure_default_model

    return ensure_default_model()


def build_tiny_model(out: Path, tokenizer_dir: Path, *, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny random causal LM with the default model's tokenizer and chat template, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert arch == "llama"
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer llama (hidden 64) that trains in seconds on the CPU."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


@pytest.fixture
def write_jsonl(tmp_path):
    """Write rows (dicts, or raw strings for bad lines) to a JSONL file in tmp_path."""

    def write(rows, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
        return path

    return write


@pytest.fixture(autouse=True)
def no_trainer_left_behind(tmp_path):
    """A test that fails half-way never leaves a trainer running: after each test, every run
    under its folder with a live trainer is killed (its whole process group)."""
    yield
    from tunedeck.core.launcher import kill_run
    from tunedeck.core.runs import RECORD_FILE, liveness, read_record

    ours = {os.getpid(), os.getppid()}
    for path in tmp_path.rglob(RECORD_FILE):
        record = read_record(path.parent) or {}
        if record.get("pid") in ours or record.get("leader") in ours or record.get("pgid") == os.getpgrp():
            continue  # a record a test wrote for this very process
        if liveness(path.parent).alive:
            kill_run(path.parent)


@pytest.fixture(autouse=True)
def machine_read_afresh():
    """A test that swaps in a stand-in NVML leaves nothing cached for the next one."""
    yield
    from tunedeck.core import hardware

    hardware.NVML.reset()
    hardware.detect.cache_clear()
