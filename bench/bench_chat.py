"""Chat in the engine against a plain model, side by side in one run, with the bundled
SmolLM2-135M-Instruct and an adapter on it (r=16 on every linear layer, in a run folder).

Memory: the model memory of a process holding the base with the adapter loaded (the
engine's :class:`~tunedeck.core.chat.ChatState`, after answering once with the adapter and
once as "base") against a process that loads the plain model once and generates. Each is
measured in a fresh process as the growth of its peak RSS after the imports, so the
libraries' own memory does not hide the model's. Goal: under 1.1x.

Speed: tokens/s of an answer streamed from the engine process (``EngineClient.stream``,
every token decoded and sent through the pipe) against plain ``model.generate`` in this
process, on the same prompt, greedy, the same number of new tokens; the median of
--repeats after a warm-up. Goal: at least 0.9x.

Both panes: the time from sending a prompt to both panes' last token (base in one pane,
the run in the other, each answering --tokens tokens), both at once (the engine's
``chat_panes``: one batch whose rows use different adapters) against one pane after the
other (two ``chat`` requests, as the Chat screen asked before), in the same engine, the
repeats interleaved; the median of each. Goal: at least 1.6x faster. And each pane's
greedy text at once is checked to be the same as that model's answer alone (without
forcing a length, and with a second prompt of another length in one of the panes). Next
to it, this machine's bound: a decode step of the plain model for one row and for two,
and so the most any batch of two can gain here.

    python bench/bench_chat.py [--tokens 64] [--repeats 3] [--json] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]
LONGER = [{"role": "user", "content": "Write a short poem about the sea."},
          {"role": "assistant", "content": "The sea is wide and grey."},
          {"role": "user", "content": "Now one about the mountains, in four lines, with a rhyme."}]


def make_run(root: Path) -> Path:
    """A run folder for the bundled model: its snapshot and a random r=16 all-linear adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunedeck.core.models import ensure_default_model

    folder = ensure_default_model()
    run = root / "runs" / "bench"
    (run / "adapter").mkdir(parents=True)
    (run / "project.toml").write_text('schema = 1\nname = "bench"\n[model]\nsource = "default"\n', encoding="utf-8")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(str(run / "adapter"))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(run / "adapter"))
    return run


def _peak_rss() -> int:
    """This process's peak RSS (VmHWM: unlike getrusage's ru_maxrss, it is not inherited
    across the exec that starts a spawned process)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _imports() -> None:
    """The libraries, imported before the baseline is taken (their memory is not the model's)."""
    import importlib

    for name in ("torch", "transformers", "peft"):
        importlib.import_module(name)


def _engine_memory(run: str, queue: mp.Queue) -> None:
    """In a fresh process: ChatState with the base and the run's adapter, as the engine holds them."""
    from tunedeck.core.chat import BASE, ChatState, GenSettings, target_for

    _imports()
    import torch

    torch.set_num_threads(1)
    before = _peak_rss()
    state = ChatState(device="cpu")
    settings = GenSettings(greedy=True, max_new_tokens=8)
    state.answer(target_for(run), PROMPT, settings)
    state.answer(target_for(BASE, partner=run), PROMPT, settings)
    queue.put(_peak_rss() - before)


def _plain_memory(folder: str, queue: mp.Queue) -> None:
    """In a fresh process: the plain model loaded once, generating."""
    _imports()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    before = _peak_rss()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    inputs = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=8, do_sample=False)
    queue.put(_peak_rss() - before)


def in_fresh_process(target, arg: str) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(arg, queue))
    process.start()
    value = queue.get(timeout=600)
    process.join(60)
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="only the speed and both-panes measures")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunedeck.core.engine import EngineClient
    from tunedeck.core.models import ensure_default_model

    folder = str(ensure_default_model())
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp))
        engine_mem = None if args.skip_memory else in_fresh_process(_engine_memory, str(run))
        plain_mem = None if args.skip_memory else in_fresh_process(_plain_memory, folder)

        # speed: the same greedy answer, the same length, engine (streamed) and plain generate
        n = args.tokens
        settings = {"greedy": True, "max_new_tokens": n, "min_new_tokens": n}
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        inputs = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)

        def plain() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return (out.shape[1] - inputs["input_ids"].shape[1]) / (time.perf_counter() - start)

        with EngineClient(log_path=Path(tmp) / "engine.log") as client:
            def streamed(model_name: str, partner: str | None) -> float:
                pieces: list[dict] = []
                start = time.perf_counter()
                result = client.chat(model_name, PROMPT, partner=partner, settings=settings,
                                     on_text=pieces.append)
                return result["tokens"] / (time.perf_counter() - start)

            streamed("base", str(run))  # warm-up: the engine loads the base and the adapter
            streamed(str(run), None)
            plain()
            base_rates, adapter_rates, plain_rates = [], [], []
            for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
                plain_rates.append(plain())
                base_rates.append(streamed("base", str(run)))
                adapter_rates.append(streamed(str(run), None))
            panes = both_panes(client, str(run), n, args.repeats)
        panes["bound"] = batch_bound(model, inputs["input_ids"].shape[1], n)
    results = {
        "memory": None if engine_mem is None or plain_mem is None else {
            "engine_base_plus_adapter_bytes": engine_mem, "plain_model_bytes": plain_mem,
            "ratio": engine_mem / plain_mem, "goal": "< 1.1"},
        "speed": {"tokens": n, "plain_generate_tokens_per_s": statistics.median(plain_rates),
                  "engine_stream_base_tokens_per_s": statistics.median(base_rates),
                  "engine_stream_adapter_tokens_per_s": statistics.median(adapter_rates),
                  "ratio": statistics.median(base_rates) / statistics.median(plain_rates), "goal": ">= 0.9"},
        "both_panes": panes,
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    m, s, b = results["memory"], results["speed"], results["both_panes"]
    if m is not None:
        print(f"memory: engine base + adapter {m['engine_base_plus_adapter_bytes'] / 2**20:.0f} MiB, plain model "
              f"{m['plain_model_bytes'] / 2**20:.0f} MiB: {m['ratio']:.2f}x (goal < 1.1x)")
    print(f"speed ({n} tokens, greedy): plain generate {s['plain_generate_tokens_per_s']:.1f} tokens/s, engine "
          f"stream base {s['engine_stream_base_tokens_per_s']:.1f}, with the adapter "
          f"{s['engine_stream_adapter_tokens_per_s']:.1f}: {s['ratio']:.2f}x (goal >= 0.9x)")
    same = "the same as alone" if b["greedy_same_as_alone"] else "NOT the same as alone: " + "; ".join(b["differences"])
    print(f"both panes (base | run, {n} tokens each, greedy): to both last tokens, one after the other "
          f"{b['one_after_the_other_s']:.2f} s, at once {b['at_once_s']:.2f} s: {b['ratio']:.2f}x faster "
          f"(goal >= 1.6x); each pane's greedy text at once is {same} ({b['checked']} answers checked)")
    c = b["bound"]
    print(f"this machine's bound: a decode step of the plain model ({c['dtype']}) takes {c['one_row_ms']:.1f} ms "
          f"for one row, {c['two_rows_ms']:.1f} ms for two: two answers in one batch can be at most "
          f"{c['ratio']:.2f}x faster here")
    sys.stdout.flush()


def batch_bound(model, prompt_tokens: int, steps: int) -> dict:
    """What batching two rows can give on this machine at best: the time of a decode step
    (one new token against the key/value cache) of the plain model for one row and for two.
    A CPU whose matrix products are no faster per row for two rows than for one (fp32 on
    some BLAS builds) bounds the panes' speed-up near 1x, however the batch is run."""
    import torch

    def step_ms(rows: int) -> float:
        ids = torch.randint(0, 1000, (rows, prompt_tokens))
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, torch.randint(0, 1000, (rows, 1))
            start = time.perf_counter()
            for _ in range(steps):
                cache = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
            return 1000 * (time.perf_counter() - start) / steps

    step_ms(1), step_ms(2)  # warm-up
    one, two = statistics.median(step_ms(1) for _ in range(3)), statistics.median(step_ms(2) for _ in range(3))
    return {"dtype": str(model.dtype).removeprefix("torch."), "one_row_ms": one, "two_rows_ms": two,
            "ratio": 2 * one / two}


def both_panes(client, run: str, tokens: int, repeats: int) -> dict:
    """Both panes' answers at once against one pane after the other, in one engine; and the
    greedy texts at once against each model alone."""
    forced = {"greedy": True, "max_new_tokens": tokens, "min_new_tokens": tokens}
    panes = [{"model": "base", "messages": PROMPT}, {"model": run, "messages": PROMPT}]

    def at_once() -> float:
        start = time.perf_counter()
        result = client.chat_panes(panes, settings=forced)
        assert result["together"] and all(a["tokens"] == tokens for a in result["answers"]), result
        return time.perf_counter() - start

    def one_after_the_other() -> float:
        start = time.perf_counter()
        for pane, partner in ((panes[0], run), (panes[1], "base")):
            result = client.chat(pane["model"], pane["messages"], partner=partner, settings=forced)
            assert result["tokens"] == tokens
        return time.perf_counter() - start

    at_once()  # warm-up of the batched path
    together, apart = [], []
    for _ in range(repeats):  # interleaved, so drifts of the machine hit both alike
        apart.append(one_after_the_other())
        together.append(at_once())

    # the same text as alone: natural greedy answers (each row ends at its own stop), and rows
    # of different lengths (a longer conversation in one pane)
    greedy = {"greedy": True, "max_new_tokens": tokens}
    differences, checked = [], 0
    for case in ([("base", PROMPT), (run, PROMPT)], [("base", LONGER), (run, PROMPT)], [(run, PROMPT), (run, LONGER)]):
        result = client.chat_panes([{"model": m, "messages": msgs} for m, msgs in case], settings=greedy)
        models = [m for m, _ in case]
        for i, (model, messages) in enumerate(case):
            partner = next((m for j, m in enumerate(models) if j != i and m != "base"), None)
            alone = client.chat(model, messages, partner=partner, settings=greedy)
            checked += 1
            if alone["text"] != result["answers"][i]["text"]:
                differences.append(f"{result['answers'][i]['model']} ({len(messages)} messages)")
    at, one = statistics.median(together), statistics.median(apart)
    return {"tokens_per_pane": tokens, "at_once_s": at, "one_after_the_other_s": one, "ratio": one / at,
            "goal": ">= 1.6", "greedy_same_as_alone": not differences, "differences": differences,
            "checked": checked}


if __name__ == "__main__":
    main()
