"""Child of mount_bench.py: load a transformers model directory and run one forward pass; print the seconds.

    python bench/load_model.py MODEL_DIR WARMUP_DIR

It first loads and runs WARMUP_DIR (a tiny model of the same architecture), so every library module is imported
and every first-call setup done; then it prints "ready" and waits for a line on stdin, which mount_bench.py
sends once it has dropped the page cache. The time printed (one JSON line, {"seconds": ...}) covers
from_pretrained and a forward pass, which touches every weight, so a lazily mapped load cannot hide its reads.
One load per process, so no load finds another's tensors or allocator state.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

# Fixed token ids: no tokenizer is needed.
INPUT_IDS = [[1, 17, 42, 7, 99, 3, 250, 64]]


def load_and_run(path: str) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).logits


def main() -> None:
    model_dir, warmup_dir = sys.argv[1], sys.argv[2]
    load_and_run(warmup_dir)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    logits = load_and_run(model_dir)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "finite": bool(torch.isfinite(logits).all())}), flush=True)


if __name__ == "__main__":
    main()
