"""Inspecting a 70B-size llama config against a 135M one (SmolLM2), in one run.

Both configs are written as a bare config.json to a temporary folder (no weights exist)
and inspected the way `tunedeck inspect` does: config read, model built on the meta
device, layers listed and grouped, "all-linear" expanded by peft. Imports are warmed up
first, so the times are the inspection itself; each is the median of --repeats runs. A
count of trainable parameters for a new choice (what each toggle of the Modules screen
costs) is timed too. The goal: the 70B inspection within a small factor of the 135M one.

    python bench/bench_inspect.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from timing import timed

LLAMA_70B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_hidden_layers": 80,
    "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
}
SMOLLM2_135M = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30,
    "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tunedeck.core.inspect import inspect_model
    from tunedeck.core.targets import count_trainable

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, config in (("135M", SMOLLM2_135M), ("70B", LLAMA_70B)):
            folder = Path(tmp) / name
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(config))
            folders[name] = str(folder)
        inspect_model(folders["135M"])  # warm up: imports of transformers, peft, bitsandbytes
        for name, folder in folders.items():
            seconds, ins = timed(lambda f=folder: inspect_model(f), args.repeats)
            count_s, choice = timed(lambda i=ins: count_trainable(i, ["q_proj", "v_proj", "down_proj"], r=16),
                                    args.repeats)
            results[name] = {"inspect_s": seconds, "count_s": count_s, "params": ins.total_params,
                             "layers": len(ins.layers), "trainable_params": choice.trainable_params}
    ratio = results["70B"]["inspect_s"] / results["135M"]["inspect_s"]
    if args.json:
        print(json.dumps({"results": results, "ratio": ratio}, indent=2))
        return
    for name, r in results.items():
        print(f"{name:>5}: {r['params'] / 1e9:6.2f}B params, {r['layers']:4d} layers: inspect "
              f"{r['inspect_s'] * 1000:7.1f} ms, count a choice {r['count_s'] * 1000:6.1f} ms "
              f"({r['trainable_params']:,} trainable)")
    print(f"ratio 70B / 135M inspect time: {ratio:.2f}x for {results['70B']['params'] / results['135M']['params']:.0f}x "
          "the parameters")


if __name__ == "__main__":
    main()
