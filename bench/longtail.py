"""A data set with a long tail of lengths, made from the demo rows (a helper module, not a
benchmark: `make bench` runs bench_*.py).

Real chat data is mostly short exchanges with a few long conversations. The demo data
(sample_data/python_qa.jsonl) is the opposite: every row is 100 to 400 tokens. This module
cuts the demo rows into their (user, assistant) pairs and chains pairs into multi-turn
conversations: the number of turns is drawn from a lognormal (median 1, a tail to a dozen),
and turns are added only while the conversation, rendered with the model's chat template,
stays within ``budget`` tokens. So most rows are one or two turns (~100 to ~300 tokens) and a
few run to ~1000. Fixed seed, no network: the same file every time for the same tokenizer.

    python bench/longtail.py OUT.jsonl   # writes the file and prints its length statistics
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "sample_data" / "python_qa.jsonl"

ROWS = 600          # conversations written
SEED = 1234
TURNS_SIGMA = 0.9   # lognormal(0, sigma) turn counts: median 1, P(>= 4 turns) ~ 8%
MAX_TURNS = 12
BUDGET = 1000       # tokens, rendered with the chat template (max_length 1024 leaves room)


def demo_pairs(path: Path = DEMO) -> list[list[dict[str, str]]]:
    """Every (user, assistant) pair of the demo rows, system messages left out."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        msgs = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
        for user, assistant in itertools.pairwise(msgs):
            if user["role"] == "user" and assistant["role"] == "assistant":
                pairs.append([{"role": "user", "content": user["content"]},
                              {"role": "assistant", "content": assistant["content"]}])
    return pairs


def make_rows(tokenizer: Any, rows: int = ROWS, budget: int = BUDGET, seed: int = SEED) -> list[dict[str, Any]]:
    """``rows`` conversations ({"messages": [...]}), each at most ``budget`` tokens long."""
    rng = random.Random(seed)
    pairs = demo_pairs()

    def length(messages: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))

    out = []
    for _ in range(rows):
        turns = min(MAX_TURNS, max(1, round(rng.lognormvariate(0.0, TURNS_SIGMA))))
        messages: list[dict[str, str]] = []
        for _ in range(turns):
            for _ in range(8):  # a pair that still fits, if one comes up
                candidate = messages + rng.choice(pairs)
                if length(candidate) <= budget:
                    messages = candidate
                    break
            else:
                break
        if not messages:  # a single pair over the budget: never with the demo data, but stay in it
            continue
        out.append({"messages": messages})
    return out


def write(path: Path, tokenizer: Any, **kw: Any) -> dict[str, Any]:
    """Writes the conversations as JSONL; returns their length statistics (tokens)."""
    rows = make_rows(tokenizer, **kw)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return stats(rows, tokenizer)


def stats(rows: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    lengths = sorted(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
                     for r in rows)
    turns = [len(r["messages"]) // 2 for r in rows]

    def pct(p: float) -> int:
        return lengths[min(len(lengths) - 1, math.floor(p * len(lengths)))]

    return {"rows": len(rows), "tokens": sum(lengths), "min": lengths[0], "p50": pct(0.5), "p90": pct(0.9),
            "p99": pct(0.99), "max": lengths[-1], "mean": round(statistics.fmean(lengths), 1),
            "turns": {str(k): turns.count(k) for k in sorted(set(turns))}}


if __name__ == "__main__":
    from transformers import AutoTokenizer
    from tunedeck.core.models import ensure_default_model

    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/longtail.py OUT.jsonl")
    print(json.dumps(write(Path(sys.argv[1]), AutoTokenizer.from_pretrained(str(ensure_default_model())))))
