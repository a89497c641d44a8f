"""Child of mount_bench.py, run with vLLM's venv: start vLLM's CPU engine on a model directory; print its log.

    .venv-vllm/bin/python bench/vllm_load.py MODEL_DIR STRATEGY

STRATEGY is vLLM's safetensors_load_strategy, or "default" to leave it unset as a user who passes nothing
does. vLLM logs "Loading weights took X seconds" (its DefaultModelLoader's own timer, around reading every
shard and copying the weights into the model); mount_bench.py parses that line. The engine runs inside this
process (no engine-core or worker processes), which changes how failures are reported, not how weights are
read. This file imports nothing from ctfs: vLLM's venv has none.
"""

import os
import sys

# Read when vLLM is imported: the engine core then runs in this process.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main() -> None:
    from vllm import LLM

    model, strategy = sys.argv[1], sys.argv[2]
    options = {} if strategy == "default" else {"safetensors_load_strategy": strategy}
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True, max_model_len=128,
              max_num_seqs=1, seed=0, distributed_executor_backend="uni", **options)
    llm.llm_engine.engine_core.shutdown()


# vLLM may spawn processes that import this file again: the guard keeps them from starting an engine.
if __name__ == "__main__":
    main()
