"""The `tunedeck` command: new, check, models, demo; exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunedeck.core.cli import main
from tunedeck.core.hardware import detect
from tunedeck.core.models import bundled_gguf

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
QA = [{"role": "user", "content": "How do I join paths?"},
      {"role": "assistant", "content": "```python\nfrom pathlib import Path\nPath('a') / 'b'\n```"}]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real command in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "tunedeck.core", *args], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "COLUMNS": "200"}, timeout=120,
    )


@pytest.fixture
def project(tmp_path, write_jsonl) -> Path:
    data = write_jsonl([{"messages": QA}] * 4)
    path = tmp_path / "p.toml"
    assert main(["new", str(path), "--dataset", str(data)]) == 0
    return path


def test_new_writes_a_starter_project_with_relative_paths(project, capsys):
    text = project.read_text()
    assert 'path = "data.jsonl"' in text and 'source = "default"' in text
    assert main(["new", str(project)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_check_prints_resolved_settings(project, capsys):
    assert main(["check", str(project), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["kind"] == "default"
    assert report["dataset"] == {"path": str(project.parent / "data.jsonl"), "format": "messages", "rows": 4,
                                 "usable": 4, "skipped": [], "trailing_question_dropped": [],
                                 "sources": [{"path": "data.jsonl", "key": "dataset.path",
                                              "where": str(project.parent / "data.jsonl"), "format": "messages",
                                              "rows": 4, "usable": 4, "skipped": 0, "weight": 1.0, "train_rows": 4,
                                              "share": 1.0}],
                                 "eval": {"ratio": 0.0, "rows": 0}}
    assert report["resolved"]["precision"] == detect().cpu_precision  # this CPU's measured answer
    assert report["resolved"]["gradient_checkpointing"] is False
    assert report["settings"]["training"]["precision"] == "auto"
    assert report["sources"]["lora.r"] == "project"


@pytest.mark.slow
def test_check_human_output_shows_auto_and_overrides(project):
    result = run_cli("check", str(project), "--set", "lora.r=8", "--set", "training.seed=3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"auto -> {detect().cpu_precision}" in out
    assert f"precision {detect().cpu_precision}: " in out  # and why
    assert "lora.r" in out and "--set" in out
    assert "ok" in out


def test_set_overrides_apply_to_check_but_not_the_file(project, capsys):
    before = project.read_text()
    assert main(["check", str(project), "--json", "--set", 'lora.target_modules=["q_proj","v_proj"]',
                 "--set", "training.gradient_checkpointing=true"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert report["resolved"]["gradient_checkpointing"] is True
    assert project.read_text() == before


def _bad_cases(tmp: Path, good_data: Path) -> list[tuple[list[str], str]]:
    def proj(name: str, text: str) -> str:
        path = tmp / name
        path.write_text(text)
        return str(path)

    ok = f'schema = 1\n[dataset]\npath = "{good_data}"\n'
    rows = tmp / "bad_rows.jsonl"
    rows.write_text("{\n{\n" + json.dumps({"messages": QA}) + "\n")
    nofmt = tmp / "nofmt.jsonl"
    nofmt.write_text('{"q": 1}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "noweights").mkdir()
    (tmp / "noweights" / "config.json").write_text("{}")
    return [
        (["check", proj("a.toml", "[lora\n")], "not valid TOML"),
        (["check", proj("b.toml", ok + "[lora]\nr = -4\n")], "lora.r: -4 is not valid: expected an integer >= 1"),
        (["check", proj("c.toml", ok + "[lora]\nrank = 8\n")], 'did you mean "r"'),
        (["check", proj("d.toml", ok + '[dataset2]\nformat = "x"\n')], "dataset2: unknown key"),
        (["check", proj("e.toml", 'schema = 1\n[dataset]\nformat = "yaml"\n')], 'dataset.format: "yaml" is not valid'),
        (["check", proj("f.toml", ok + '[model]\nsource = "nowhere"\n')], "model.source = 'nowhere': no such folder"),
        (["check", proj("g.toml", ok + f'[model]\nsource = "{tmp / "noweights"}"\n')], "no weights"),
        (["check", proj("h.toml", 'schema = 1\n[dataset]\npath = "missing.jsonl"\n')], "no such file"),
        (["check", proj("i.toml", "schema = 1\n")], "dataset.path is empty"),
        (["check", proj("j.toml", f'schema = 1\n[dataset]\npath = "{rows}"\n')], "2 of 3 rows"),
        (["check", proj("k.toml", f'schema = 1\n[dataset]\npath = "{nofmt}"\n')], "cannot tell the format"),
        (["check", proj("l.toml", f'schema = 1\n[dataset]\npath = "{tmp / "empty.jsonl"}"\n')], "has no rows"),
        (["check", proj("m.toml", ok + '[training]\nprecision = "fp16"\n')], '"fp16" needs a GPU'),
        (["check", proj("n.toml", ok), "--set", "lora.r=zero"], 'lora.r: "zero" is not valid'),
        (["check", proj("o.toml", ok), "--set", "training.lr=1"], 'did you mean "learning_rate"'),
        (["check", proj("p.toml", ok), "--set", "nothing"], "expected key.path=value"),
        (["check", str(tmp / "absent.toml")], "no such project file"),
        (["check", proj("q.toml", f'schema = 1\n[dataset]\npath = "{good_data}"\neval_split = 1.5\n')],
         "dataset.eval_split: 1.5 is not valid"),
        (["check", proj("r.toml", f'schema = 1\n[dataset]\npath = "{good_data}"\neval_split = "gone.jsonl"\n')],
         "gone.jsonl"),
        (["check", proj("s.toml", ok + f'[model]\nsource = "{bundled_gguf()}"\n[quantization]\nmode = "4bit"\n')],
         "cannot be used with a .gguf source"),  # what `train` refuses, `check` refuses
        (["new", str(tmp / "x.txt")], "project files end in .toml"),
        (["new", str(tmp / "y.toml"), "--dataset", str(tmp / "none.jsonl")], "--dataset"),
    ]


def test_at_least_twenty_bad_inputs_each_give_one_line_and_exit_2(tmp_path, write_jsonl, capsys):
    good = write_jsonl([{"messages": QA}] * 3, "good.jsonl")
    cases = _bad_cases(tmp_path, good)
    assert len(cases) >= 20
    for args, message in cases:
        before = {p: p.read_bytes() for p in tmp_path.glob("*.toml")}
        code = main(args)
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert code == 2, (args, captured)
        assert len(err.splitlines()) == 1, err
        assert err.startswith("tunedeck: error: ")
        assert message in err, (args, err)
        assert "Traceback" not in captured.out + captured.err
        assert {p: p.read_bytes() for p in tmp_path.glob("*.toml")} == before


def test_real_process_bad_input_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora]\nr = -4\n")
    result = run_cli("check", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"tunedeck: error: {bad}: lora.r: -4 is not valid: "
                                                   "expected an integer >= 1 and <= 4096"]
    assert result.stdout == ""
    result = run_cli("check")
    assert result.returncode == 2 and "the following arguments are required: project" in result.stderr


@pytest.mark.slow
def test_models_json_lists_the_default_model():
    result = run_cli("models", "--json")
    assert result.returncode == 0, result.stderr
    infos = json.loads(result.stdout)
    default = next(i for i in infos if i["source"] == "default")
    assert default["model_type"] == "llama" and default["layers"] == 30
    assert default["chat_template"] is True
    assert 0 < default["memory"]["qlora"] and 0 < default["memory"]["lora"] < 8 * 2**30
    small = json.loads(run_cli("models", "--json", "--project", str(SAMPLE / "demo.toml")).stdout)
    assert next(i for i in small if i["source"] == "default")["memory"]["lora"] != default["memory"]["lora"]


def test_demo_copies_the_sample_project(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "demo"), "--no-open"]) == 0
    folder = tmp_path / "demo"
    assert (folder / "demo.toml").read_text() == (SAMPLE / "demo.toml").read_text()
    assert (folder / "python_qa.jsonl").stat().st_size == (SAMPLE / "python_qa.jsonl").stat().st_size
    assert main(["check", str(folder / "demo.toml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["dataset"]["format"] == "messages"


@pytest.mark.slow
def test_check_on_the_demo_project():
    result = run_cli("check", str(SAMPLE / "demo.toml"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dataset"]["usable"] >= 150
    assert report["dataset"]["eval"]["ratio"] == 0.05
    assert report["model"]["architecture"] in ("llama", "LlamaForCausalLM")


def test_help_is_fast_and_light():
    code = ("import sys, runpy; sys.argv=['tunedeck','--help']\n"
            "from tunedeck.core.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch','transformers','peft','trl','datasets','bitsandbytes') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert "check" in result.stdout and "models" in result.stdout
