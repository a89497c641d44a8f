"""Child script, run with .venv-vllm's python: vLLM loads model directories and greedily continues fixed prompts.

Usage: vllm_generate.py [--in-process] [--keep-going] OUT_DIR RUNS_JSON
RUNS_JSON is a list of runs, each {"label", "model", "load_format", "strategy"}; load_format is vLLM's
("auto", or "dummy" for random weights), strategy its safetensors_load_strategy, or "default" to leave it
unset as a user who passes nothing does. Each run gets its own LLM(): the strategy is a load option, fixed
when the engine starts.

Into OUT_DIR go LABEL.log, everything vLLM and its engine processes printed during that run (what a user's
terminal shows), and results.json, rewritten after every run: {LABEL: {"tokens": [...], "logprobs": [...]}}
with tokens per prompt and, per prompt per generated step, {token id: logprob} (floats survive JSON
exactly); with --keep-going a failed run is recorded as {LABEL: {"error": "Type: message"}} and the next
run starts, otherwise the failure ends the script with a non-zero status.

By default vLLM lays out its processes as `vllm serve` does: an engine-core process and a worker process,
each spawned and each importing vLLM again (about 30 s per LLM() on 2 cores). `--in-process` keeps both in
this process, which makes an LLM() take seconds. The weights are read by the same loader code either way;
only how a failure in the worker is reported differs, so runs that must fail use the default layout.
This file imports nothing from ctfs or the tests: it runs in vLLM's venv, which has neither.
"""

import argparse
import gc
import json
import os
import sys
import traceback
from pathlib import Path

# Fixed token ids, so no tokenizer is needed (none is downloaded or made) and the run reproduces.
PROMPTS = [[1, 17, 42, 7, 99, 3, 250, 64], [5, 200, 31, 31, 8]]
MAX_TOKENS = 12
# Top-k logprobs per step: several alternatives besides the chosen token, so the comparison sees more of
# each output distribution than the argmax.
LOGPROBS = 5


def forget_cached_pages(model_dir: str) -> None:
    """Drop the page cache of the model's weight files, so every run's reads reach the file system (on a
    mount, the daemon) in that run's own way, instead of finding pages an earlier run left."""
    for path in Path(model_dir).glob("*.safetensors"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # a file the mount refuses to open has no pages to drop; the run will report it
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def generate(run: dict, in_process: bool) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    options = {} if run["strategy"] == "default" else {"safetensors_load_strategy": run["strategy"]}
    if in_process:
        options["distributed_executor_backend"] = "uni"  # the worker runs inside the engine core
    llm = LLM(
        model=run["model"], load_format=run["load_format"], skip_tokenizer_init=True, dtype="float32",
        enforce_eager=True, max_model_len=128, max_num_seqs=len(PROMPTS), seed=0, **options,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in PROMPTS], params, use_tqdm=False)
        result = {"tokens": [], "logprobs": []}
        for output in outputs:
            completion = output.outputs[0]
            result["tokens"].append(list(completion.token_ids))
            result["logprobs"].append([{str(tok): lp.logprob for tok, lp in step.items()}
                                       for step in completion.logprobs])
        return result
    finally:
        # Stop this run's engine before the next run starts its own.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def output_to(log_path: Path) -> None:
    """Point this process's stdout and stderr at `log_path`; engine processes spawned from now on inherit it."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--keep-going", action="store_true")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("runs", type=json.loads)
    args = parser.parse_args()
    if args.in_process:
        # Read when vLLM is imported: the engine core then runs inside this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    results = {}
    for run in args.runs:
        output_to(args.out_dir / f"{run['label']}.log")
        forget_cached_pages(run["model"])
        try:
            results[run["label"]] = generate(run, args.in_process)
        except Exception as exc:
            if not args.keep_going:
                raise
            traceback.print_exc()  # into this run's log, as an uncaught error would be printed
            results[run["label"]] = {"error": f"{type(exc).__name__}: {exc}"}
        (args.out_dir / "results.json").write_text(json.dumps(results))


# vLLM starts its engine core in a spawned process, which re-imports this file: the guard keeps the
# spawned process from running the runs again.
if __name__ == "__main__":
    main()
