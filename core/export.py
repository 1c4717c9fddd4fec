"""Export a run for llama.cpp, Ollama and LM Studio: one GGUF file, and a Modelfile.

:func:`export_run` merges the run's adapter into its base (:func:`tunedeck.core.merge.merged_model`,
the same merge as ``tunedeck merge``), then writes, with the ``gguf`` library's writer and
its tensor-name map (the library llama.cpp's own converter writes with):

- ``<run>-<quant>.gguf``: the hyperparameters llama.cpp reads for the architecture, every
  tensor under its GGUF name (llama's query and key weights permuted to llama.cpp's rotary
  layout, as its converter does; Llama 3.1's rope scaling as the ``rope_freqs`` tensor),
  quantized as asked; and the tokenizer: its tokens, their types, the BPE merges, the
  pre-tokenizer named after the tokenizer's own splitting rules, the special token ids,
  and the chat template the run trained with, so a chat in llama.cpp is rendered as the
  training rows were;
- ``Modelfile`` for ``ollama create``: ``FROM`` the GGUF, ``TEMPLATE`` translated from the
  run's chat template for the families Ollama's Go templates can express (ChatML, Llama 3),
  ``PARAMETER stop`` for the end-of-turn markers, ``SYSTEM`` the system prompt the run
  trained with (the template's default one where the run had none);
- with ``lora=True``, ``<run>-lora-f16.gguf``: the adapter alone, for llama.cpp's ``--lora``.

What cannot be exported is refused in one line before any work: an architecture this
writer does not know, a rope scaling it cannot express, a tokenizer that is not byte-level
BPE, a quantization the library cannot write. Quantizations: ``f32``, ``f16``, ``bf16``,
``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` by the ``gguf`` library; the k-quants
(``q4_k_m``, ``q5_k_m``, ``q6_k``) by llama.cpp's quantizer where ``llama-cpp-python`` is
installed. A tensor whose rows do not split into the quantization's blocks is written f16,
as llama.cpp does. Progress comes as stages (merge, convert, quantize, write) with tensors
done of total; ``cancel`` stops between tensors. Everything is written to a temporary
folder next to ``out`` and renamed into place: a failed or cancelled export leaves nothing.

Imports torch and gguf: engine or CLI process only.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

# HF model_type -> (gguf architecture name, query/key permuted to llama.cpp's rotary layout)
ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
}
LIBRARY_QUANTS = ("f16", "bf16", "f32", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LLAMA_CPP_QUANTS = ("q4_k_m", "q5_k_m", "q6_k", "q4_k_s", "q5_k_s", "q3_k_m", "q2_k")
QUANTS = LIBRARY_QUANTS + LLAMA_CPP_QUANTS
# the pre-tokenizers llama.cpp knows, by the tokenizer's splitting rules (tokenizer.json's pre_tokenizer)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _say(progress: Callable[[dict[str, Any]], None] | None, stage: str, message: str, done: int = 0,
         total: int = 0) -> None:
    if progress is not None:
        progress({"stage": stage, "message": message, "done": done, "total": total})


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise UserError("export cancelled; nothing was written")


def llama_cpp_quantizer() -> Any:
    """llama-cpp-python's module when it is installed (its quantizer writes the k-quants), else None."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or a build that does not load
        return None
    return llama_cpp


def check_request(run_dir: Path, out: Path, quant: str) -> dict[str, Any]:
    """Everything that can refuse an export, checked before any work: the folder to write,
    the quantization, the run's adapter, its base model's architecture, rope scaling and
    tokenizer. Returns the base's config.json values. Raises UserError with one line."""
    from .chat import check_adapter
    from .merge import check_out
    from .models import model_folder, resolve_source
    from .project import Project
    from .runs import SNAPSHOT

    check_out(out)
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: not a quantization tunedeck writes; use one of {', '.join(QUANTS)}")
    if quant in LLAMA_CPP_QUANTS and llama_cpp_quantizer() is None:
        raise UserError(f"--quant {quant}: k-quants are written by llama.cpp's quantizer, which is not installed "
                        "(pip install llama-cpp-python); export q8_0 or f16 here, then run llama-quantize "
                        f"MODEL-f16.gguf MODEL-{quant}.gguf {quant.upper()}")
    check_adapter(run_dir)
    snapshot = run_dir / SNAPSHOT
    if not snapshot.is_file():
        raise UserError(f"run {run_dir.name}: {snapshot} is missing; it is not a tunedeck run folder")
    project = Project.load(snapshot)
    ref = resolve_source(project["model.source"], project.root, allow_pickle=project["model.allow_pickle"])
    folder = model_folder(ref)[0]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"run {run_dir.name}: the base model's config.json is unreadable ({exc.__class__.__name__})"
                        ) from None
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    model_type = str(config.get("model_type", "?"))
    if model_type not in ARCHS:
        raise UserError(f"run {run_dir.name}: its base is a {model_type} model, which tunedeck does not write as GGUF "
                        f"(it writes {', '.join(sorted(ARCHS))}); merge it (tunedeck merge) and convert the folder "
                        "with llama.cpp's convert_hf_to_gguf.py")
    _rope_scaling(config, run_dir.name)  # refuses what cannot be expressed
    _tokenizer_kind(folder, run_dir.name)
    return config


def _rope_scaling(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not isinstance(scaling, dict):
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind in ("default", "llama3", "linear"):
        return scaling if kind != "default" else None
    raise UserError(f"run {name}: its base uses {kind} rope scaling, which this export does not write; merge it "
                    "(tunedeck merge) and convert the folder with llama.cpp's convert_hf_to_gguf.py")


def _tokenizer_kind(folder: Path, name: str) -> dict[str, Any]:
    """The base's tokenizer.json, refused unless it is byte-level BPE (what GGUF calls gpt2)."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"run {name}: the base model has no readable tokenizer.json; GGUF export writes byte-level "
                        "BPE tokenizers from it") from None
    model = data.get("model") or {}
    text = json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
    if model.get("type") != "BPE" or "ByteLevel" not in text or model.get("byte_fallback"):
        raise UserError(f"run {name}: its tokenizer is {model.get('type', '?')}"
                        f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}, not "
                        "byte-level BPE, which this export does not write; merge the run (tunedeck merge) and convert "
                        "it with llama.cpp's convert_hf_to_gguf.py")
    return data


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer (its splitting rules), or None
    for rules it has no name for here (llama.cpp then uses its default, with a warning)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


# -- the model -----------------------------------------------------------------------------------


def export_run(run_dir: Path, out: Path, *, quant: str = "f16", lora: bool = False, cpu: bool = False,
               progress: Callable[[dict[str, Any]], None] | None = None,
               cancel: threading.Event | None = None) -> dict[str, Any]:
    """Merge, convert and write a run as GGUF with its Modelfile (see the module docstring).
    Returns {"out", "gguf", "modelfile", "lora", "quant", "arch", "size", "commands",
    "pre_tokenizer"}. Raises UserError with one line."""
    from .merge import merged_model, written_in_place

    run_dir, out = Path(run_dir), Path(out).expanduser()
    config = check_request(run_dir, out, quant)
    if lora:
        _check_lora_export(run_dir)
    _check_cancel(cancel)
    _say(progress, "merge", f"merging the adapter of {run_dir.name} into its base")
    merged = merged_model(run_dir, cpu=cpu, progress=lambda m: _say(progress, "merge", m))
    _check_cancel(cancel)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_dir.name)
    with written_in_place(out, "the export") as tmp:
        first = "f16" if quant in LLAMA_CPP_QUANTS else quant
        gguf_path = tmp / f"{name}-{first}.gguf"
        info = write_gguf(merged, config, gguf_path, first, name=name, progress=progress, cancel=cancel)
        if quant in LLAMA_CPP_QUANTS:
            final = tmp / f"{name}-{quant}.gguf"
            _say(progress, "quantize", f"quantizing to {quant} with llama.cpp")
            _llama_cpp_quantize(gguf_path, final, quant)
            gguf_path.unlink()
            gguf_path = final
        lora_path = None
        if lora:
            lora_path = tmp / f"{name}-lora-f16.gguf"
            write_lora_gguf(run_dir, merged, config, lora_path, name=name, progress=progress, cancel=cancel)
        _say(progress, "write", "writing the Modelfile")
        modelfile = write_modelfile(tmp / "Modelfile", gguf_path.name, merged)
    gguf_file = out / gguf_path.name
    commands = [f"ollama create {name.lower()} -f {out / 'Modelfile'}",
                f"llama-cli -m {gguf_file} --jinja -cnv",
                f"lms import {gguf_file}"]
    if lora_path is not None:
        commands.append(f"llama-cli -m BASE.gguf --lora {out / lora_path.name} --jinja -cnv")
    _say(progress, "done", f"exported {run_dir.name} to {gguf_file}")
    return {"out": str(out), "gguf": str(gguf_file), "modelfile": str(out / "Modelfile"),
            "lora": str(out / lora_path.name) if lora_path is not None else None, "quant": quant,
            "arch": info["arch"], "size": gguf_file.stat().st_size, "commands": commands,
            "pre_tokenizer": info["pre_tokenizer"], "template": modelfile["template"]}


def _qtype(quant: str) -> Any:
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
            "q5_0": gguf.GGMLQuantizationType.Q5_0, "q5_1": gguf.GGMLQuantizationType.Q5_1}[quant]


def _file_type(quant: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
            "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}[quant]


def permute(weights: Any, n_head: int, n_head_kv: int | None) -> Any:
    """A query or key weight from the Hugging Face rotary layout (halves) to llama.cpp's
    (interleaved pairs), as llama.cpp's converter does for the llama architecture."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def encode_tensor(data: Any, quant: str, *, name: str) -> tuple[Any, Any]:
    """A tensor as written: 1-D tensors (norms, biases) in f32, the rest in ``quant``, or f16
    where the rows do not split into the quantization's blocks. Returns (array, ggml type)."""
    import gguf
    import numpy as np

    if data.ndim <= 1 or quant == "f32" or name.endswith(("_norm.weight", "norm.weight")):
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = _qtype(quant)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def write_gguf(merged: Any, config: dict[str, Any], path: Path, quant: str, *, name: str,
               progress: Callable[[dict[str, Any]], None] | None = None,
               cancel: threading.Event | None = None) -> dict[str, Any]:
    """Write the merged model as one GGUF file at ``path``. Returns {"arch", "pre_tokenizer", "tensors"}."""
    import gguf
    import torch

    arch, permuted = ARCHS[str(config["model_type"])]
    model = merged.model
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_finetune(name)
    writer.add_context_length(int(config.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get(
        "rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    scaling = _rope_scaling(config, name)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    pre = _write_tokenizer(writer, merged, config)

    state = {k: v for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings") or model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp uses the token embeddings as the output layer
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    plan: list[tuple[str, str]] = []
    for key in state:
        if key.endswith("rotary_emb.inv_freq"):
            continue
        mapped = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UserError(f"tensor {key} of this model has no GGUF name for the {arch} architecture; merge the run "
                            "(tunedeck merge) and convert it with llama.cpp's convert_hf_to_gguf.py")
        plan.append((key, mapped))
    total = len(plan) + (1 if scaling and (scaling.get("rope_type") or scaling.get("type")) == "llama3" else 0)
    for done, (key, mapped) in enumerate(plan, 1):
        _check_cancel(cancel)
        tensor = state[key].detach().to(torch.float32).cpu()
        if permuted and key.endswith("q_proj.weight"):
            tensor = permute(tensor, n_head, n_head)
        elif permuted and key.endswith("k_proj.weight"):
            tensor = permute(tensor, n_head, n_kv)
        data, qtype = encode_tensor(tensor.numpy(), quant, name=mapped)
        writer.add_tensor(mapped, data, raw_dtype=qtype)
        _say(progress, "convert", f"converting {mapped} ({qtype.name})", done, total)
    if total > len(plan):
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          llama3_rope_factors(scaling, head_dim, config))
    _check_cancel(cancel)
    _say(progress, "write", f"writing {path.name}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": arch, "pre_tokenizer": pre, "tensors": total}


def llama3_rope_factors(scaling: dict[str, Any], head_dim: int, config: dict[str, Any]) -> Any:
    """Llama 3.1's rope scaling as llama.cpp reads it: a factor per rotary frequency."""
    import numpy as np

    base = float(config.get("rope_theta") or 10000.0)
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _write_tokenizer(writer: Any, merged: Any, config: dict[str, Any]) -> str | None:
    """The tokenizer as GGUF metadata (byte-level BPE: GGUF's "gpt2" model); returns the
    pre-tokenizer name written (None: not named)."""
    import gguf

    from .models import model_folder

    tok = merged.tokenizer
    data = _tokenizer_kind(model_folder(merged.ref)[0], merged.project.name)
    vocab_size = int(config.get("vocab_size") or len(tok))
    by_id: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in data.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    pre = pre_tokenizer_name(data)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in ((writer.add_bos_token_id, tok.bos_token_id), (writer.add_eos_token_id, tok.eos_token_id),
                             (writer.add_unk_token_id, tok.unk_token_id), (writer.add_pad_token_id, tok.pad_token_id)):
        if isinstance(token_id, int):
            setter(token_id)
    probe = tok("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id)
    writer.add_add_eos_token(False)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if template:
        writer.add_chat_template(template)
        end = end_of_turn(tok, template)
        if end is not None and end != tok.eos_token_id:
            writer.add_eot_token_id(end)
    return pre


def end_of_turn(tok: Any, template: str) -> int | None:
    """The id of the end-of-turn marker the chat template closes answers with, if it is a token."""
    from .render import END_MARKERS

    vocab = tok.get_vocab()
    for marker in END_MARKERS:
        if marker in template and marker in vocab:
            return int(vocab[marker])
    return None


def _llama_cpp_quantize(src: Path, dst: Path, quant: str) -> None:
    llama_cpp = llama_cpp_quantizer()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise UserError(f"--quant {quant}: this llama.cpp build does not know it")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise UserError(f"--quant {quant}: llama.cpp's quantizer failed on {src.name}")


# -- the adapter alone -----------------------------------------------------------------------------


def _check_lora_export(run_dir: Path) -> None:
    from .runs import ADAPTER

    config = json.loads((run_dir / ADAPTER / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_dora"):
        raise UserError(f"--lora: run {run_dir.name} trained a DoRA adapter, which llama.cpp's --lora does not take; "
                        "export the merged model alone")
    if config.get("modules_to_save"):
        raise UserError(f"--lora: run {run_dir.name} trains {', '.join(config['modules_to_save'])} in full, which a "
                        "GGUF LoRA cannot hold; export the merged model alone")


def write_lora_gguf(run_dir: Path, merged: Any, config: dict[str, Any], path: Path, *, name: str,
                    progress: Callable[[dict[str, Any]], None] | None = None,
                    cancel: threading.Event | None = None) -> None:
    """The run's adapter alone as a GGUF LoRA (llama.cpp's ``--lora``): each adapted layer's
    A and B matrices under the base tensor's GGUF name, ``.lora_a`` / ``.lora_b``, in f16."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from .runs import ADAPTER

    arch, permuted = ARCHS[str(config["model_type"])]
    adapter = run_dir / ADAPTER
    settings = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    r = int(settings.get("r") or 8)
    alpha = float(settings.get("lora_alpha") or r)
    if settings.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # llama.cpp scales by alpha / r; rsLoRA's scale is alpha / sqrt(r)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{name} (LoRA)")
    pairs = sorted(k for k in weights if ".lora_A." in k)
    for done, key in enumerate(pairs, 1):
        _check_cancel(cancel)
        base = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
        mapped = names.get_name(base, try_suffixes=(".weight",))
        if mapped is None:
            raise UserError(f"--lora: the adapted layer {base} has no GGUF name for the {arch} architecture")
        a = weights[key].astype(np.float32)
        b = weights[key.replace(".lora_A.", ".lora_B.")].astype(np.float32)
        if permuted and base.endswith("q_proj.weight"):
            b = permute(b, n_head, n_head)
        elif permuted and base.endswith("k_proj.weight"):
            b = permute(b, n_head, n_kv)
        writer.add_tensor(f"{mapped}.lora_a", a.astype(np.float16))
        writer.add_tensor(f"{mapped}.lora_b", b.astype(np.float16))
        _say(progress, "convert", f"converting the adapter: {mapped}", done, len(pairs))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -- Ollama --------------------------------------------------------------------------------------------


CHATML_GO = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n{{ end }}"
    "{{- end }}"
)
LLAMA3_GO = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ if and $last (ne .Role \"assistant\") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}"
    "{{- end }}"
)


def template_family(template: str) -> str | None:
    """The chat-template family Ollama's Go template is written for: "chatml", "llama-3", or None."""
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template and "<|eot_id|>" in template:
        return "llama-3"
    return None


def default_system(tok: Any, template: str) -> str:
    """The system prompt the chat template puts in when a conversation has none (SmolLM2's does), or ""."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "zqprobe"}], chat_template=template,
                                       tokenize=False, add_generation_prompt=False)
        with_system = tok.apply_chat_template([{"role": "system", "content": "zqsystem"},
                                               {"role": "user", "content": "zqprobe"}], chat_template=template,
                                              tokenize=False, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe: no default to find
        return ""
    head, _, tail = with_system.partition("zqsystem")
    between = tail.split("zqprobe")[0]  # from the end of the system text to the user's text
    if not between or not text.startswith(head):
        return ""
    stop = text.find(between, len(head))
    return text[len(head):stop].strip() if stop > len(head) else ""


def write_modelfile(path: Path, gguf_name: str, merged: Any) -> dict[str, Any]:
    """The Ollama Modelfile for the exported GGUF; returns {"template": family or None}."""
    tok = merged.tokenizer
    project = merged.project
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    family = template_family(template) if template else None
    lines = [f"# Ollama: ollama create NAME -f {path.name}", f"FROM ./{gguf_name}", ""]
    if family == "chatml":
        lines += [f'TEMPLATE """{CHATML_GO}"""', 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    elif family == "llama-3":
        lines += [f'TEMPLATE """{LLAMA3_GO}"""', 'PARAMETER stop "<|eot_id|>"',
                  'PARAMETER stop "<|start_header_id|>"']
    else:
        lines += ["# TEMPLATE: Ollama reads the chat template stored in the GGUF (tokenizer.chat_template)"]
        if tok.eos_token:
            lines.append(f"PARAMETER stop {json.dumps(tok.eos_token)}")
    system = project["dataset.system_prompt"] or (default_system(tok, template) if template else "")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"template": family}
