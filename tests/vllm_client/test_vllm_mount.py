"""vLLM's CPU build through a ctfs mount: the plain files' exact output, and a tampered shard reported by name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import flip_file_bit, split_file
from mounting import ctfs, mounted, requires_fuse

from demo.tiny_llama import make_tiny_llama

pytestmark = requires_fuse

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "vllm-venv.sh"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
GENERATE = Path(__file__).with_name("vllm_generate.py")
# A fresh install measured 4–5 minutes here; a reused venv returns at once.
INSTALL_TIMEOUT = 1800
# One child runs up to ten LLM()s; measured at 1–3 minutes here, but 2 shared cores can be far busier.
VLLM_TIMEOUT = 600

STRATEGIES = ("default", "eager", "prefetch")  # "default": safetensors_load_strategy unset (lazy mmap)
SHARDS = 3
TAMPERED_SHARD = "model-00001-of-00003.safetensors"
# Small chunks, as in the demo, so even this tiny model's tensors span several of them.
CHUNK_SIZE = 16 * 1024


def install_vllm() -> Path:
    """vLLM's CPU build in .venv-vllm/, installed by the script on first use; a failed install fails the test."""
    try:
        done = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"VLLM NOT INSTALLED: {INSTALL_SCRIPT} ran past {INSTALL_TIMEOUT} s")
    if done.returncode != 0:
        pytest.fail(f"VLLM NOT INSTALLED: {INSTALL_SCRIPT} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return VLLM_PYTHON


@dataclass
class VllmRuns:
    """What one child reported: per run label, its results (or {"error": ...}) and everything it printed."""

    returncode: int
    output: str  # what the child printed outside any run
    results: dict[str, dict]
    logs: dict[str, str]

    def log(self, label: str) -> str:
        return self.logs.get(label, "")

    def detail(self, label: str) -> str:
        return f"{label}: {self.results.get(label)}\n--- its log, last lines:\n{self.log(label)[-5000:]}"


def run_vllm(workdir: Path, runs: list[dict], *, in_process: bool) -> VllmRuns:
    """tests/vllm_client/vllm_generate.py in .venv-vllm, failed runs recorded rather than fatal. The child
    gets a session of its own, so the engine processes it spawns are killed with it whatever happens:
    none may outlive the test holding files open on a mount."""
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",  # nothing is downloaded: the model is made here
        VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",  # and nothing is reported anywhere
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default takes a share of the RAM other tests need
        PYTHONUNBUFFERED="1",  # each run's log holds all it printed, in order
    )
    command = [str(VLLM_PYTHON), str(GENERATE), "--keep-going", *(["--in-process"] if in_process else []),
               str(workdir), json.dumps(runs)]
    child = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=VLLM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        pytest.fail(f"vLLM ran past {VLLM_TIMEOUT} s:\n{output[-3000:]}")
    finally:
        with suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # engine processes left behind by a failed start
    results_file = workdir / "results.json"
    logs = {run["label"]: (workdir / f"{run['label']}.log").read_text(errors="replace")
            for run in runs if (workdir / f"{run['label']}.log").exists()}
    done = VllmRuns(child.returncode, output, json.loads(results_file.read_text()) if results_file.exists() else {},
                    logs)
    # Failed runs are recorded and the child goes on; anything else that ends it early fails every test here.
    unfinished = [run["label"] for run in runs if run["label"] not in done.results]
    if child.returncode != 0 or unfinished:
        last = unfinished[0] if unfinished else runs[-1]["label"]
        pytest.fail(f"the vLLM child exited {child.returncode} with runs {unfinished} unfinished:\n"
                    f"{output[-3000:]}\n{done.detail(last)}")
    return done


def make_model(directory: Path) -> None:
    """The demo's tiny sharded Llama, re-headed for vLLM: its CPU attention needs a head size of at least
    32, and the demo's 4 query heads and 2 KV heads of 16 become 2 and 1 of 32. The projection weights keep
    their shapes, so only config.json changes."""
    make_tiny_llama(directory, seed=0, shards=SHARDS)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    assert config["hidden_size"] == 64 and config["num_attention_heads"] * config["head_dim"] == 64
    config.update(num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def flip_a_ciphertext_byte(shard: Path) -> None:
    """Flip one bit (so one byte changes) in the middle of the largest tensor's ciphertext: a chunk's tag no
    longer matches."""
    header, data = split_file(shard)
    start, end = max((e["data_offsets"] for name, e in header.items() if name != "__metadata__"),
                     key=lambda offsets: offsets[1] - offsets[0])
    flip_file_bit(shard, shard.stat().st_size - len(data) + (start + end) // 2)


def run(label: str, model: Path, strategy: str, load_format: str = "auto") -> dict:
    return {"label": label, "model": str(model), "load_format": load_format, "strategy": strategy}


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """vLLM installed; a plain model, its encryption by the ctfs CLI, and a copy with one shard tampered;
    served by four mounts for the whole module: the good copy with default options and with `--verify full`,
    and the tampered copy with `--verify full` and with the default `--verify open`."""
    vllm_python = install_vllm()
    assert vllm_python.exists()
    root = tmp_path_factory.mktemp("vllm")
    plain, encrypted, tampered = root / "plain", root / "encrypted", root / "tampered"
    make_model(plain)
    keys = root / "keys.jwk"
    for args in (("keygen", str(keys)),
                 ("encrypt", str(plain), str(encrypted), "--keys", str(keys), "--chunk-size", str(CHUNK_SIZE))):
        done = ctfs(*args)
        assert done.returncode == 0, done.stderr
    assert len(list(encrypted.glob("*.safetensors"))) == SHARDS
    shutil.copytree(encrypted, tampered)
    flip_a_ciphertext_byte(tampered / TAMPERED_SHARD)
    assert ctfs("verify", str(encrypted), "--keys", str(keys)).returncode == 0
    refused = ctfs("verify", str(tampered), "--keys", str(keys))
    assert refused.returncode != 0 and "authentication tag mismatch" in refused.stderr, refused.stderr
    with ExitStack() as stack:
        good = stack.enter_context(mounted(encrypted, root / "mnt", "--keys", str(keys)))
        good_full = stack.enter_context(mounted(encrypted, root / "mnt-good-full", "--keys", str(keys),
                                                "--verify", "full"))
        full = stack.enter_context(mounted(tampered, root / "mnt-full", "--keys", str(keys), "--verify", "full"))
        open_ = stack.enter_context(mounted(tampered, root / "mnt-open", "--keys", str(keys)))
        images = stack.enter_context(mounted(encrypted, root / "mnt-images", "--keys", str(keys),
                                             "--memory-budget", "1G"))
        yield {"root": root, "plain": plain, "good": good, "good-full": good_full, "full": full, "open": open_,
               "images": images}


@pytest.fixture(scope="module")
def in_process(mounts) -> VllmRuns:
    """Every run that can share one process (an LLM() each): each strategy on the plain directory and on the
    good mount, the random-weights control, the good mount as docs/server.md recommends serving it
    (`--verify full`, prefetch), the good files served from memory images, and each strategy on the tampered
    mount with `--verify full`."""
    runs = [run("dummy", mounts["plain"], "default", load_format="dummy")]
    for strategy in STRATEGIES:
        runs += [run(f"plain-{strategy}", mounts["plain"], strategy),
                 run(f"good-{strategy}", mounts["good"].mountpoint, strategy),
                 run(f"full-{strategy}", mounts["full"].mountpoint, strategy)]
    runs.append(run("good-full-prefetch", mounts["good-full"].mountpoint, "prefetch"))
    runs.append(run("images-default", mounts["images"].mountpoint, "default"))
    return run_vllm(mounts["root"] / "in-process", runs, in_process=True)


@pytest.fixture(scope="module")
def served(mounts) -> VllmRuns:
    """The tampered mount in each verify mode, loaded with vLLM's own process layout (engine core and worker
    processes, as `vllm serve` runs), default strategy: what a user of vLLM sees."""
    runs = [run("full", mounts["full"].mountpoint, "default"), run("open", mounts["open"].mountpoint, "default")]
    return run_vllm(mounts["root"] / "served", runs, in_process=False)


def max_logprob_difference(a: dict, b: dict) -> float:
    """The largest |Δ| between two runs' logprobs of the same tokens (inf where the top tokens differ)."""
    worst = 0.0
    for steps_a, steps_b in zip(a["logprobs"], b["logprobs"], strict=True):
        for step_a, step_b in zip(steps_a, steps_b, strict=True):
            if step_a.keys() != step_b.keys():
                return float("inf")
            worst = max([worst, *(abs(step_a[t] - step_b[t]) for t in step_a)])
    return worst


# -- the same output from the mount ---------------------------------------------------------------------

def test_the_plain_runs_are_complete_and_agree_across_strategies(in_process):
    reference = in_process.results["plain-default"]
    assert "error" not in reference, in_process.detail("plain-default")
    assert [len(tokens) for tokens in reference["tokens"]] == [12, 12]
    assert all(len(step) >= 5 for steps in reference["logprobs"] for step in steps)
    for strategy in STRATEGIES:
        assert in_process.results[f"plain-{strategy}"] == reference, in_process.detail(f"plain-{strategy}")


def test_random_weights_give_other_tokens_so_the_comparison_can_fail(in_process):
    dummy, real = in_process.results["dummy"], in_process.results["plain-default"]
    assert "error" not in dummy, in_process.detail("dummy")
    assert dummy["tokens"] != real["tokens"]
    assert max_logprob_difference(dummy, real) > 0


@pytest.mark.parametrize("mount, strategy", [*(("good", s) for s in STRATEGIES), ("good-full", "prefetch"),
                                             ("images", "default")])
def test_vllm_through_the_mount_gives_the_plain_tokens_and_logprobs(mounts, in_process, mount, strategy):
    label = f"{mount}-{strategy}"
    got, want = in_process.results[label], in_process.results[f"plain-{strategy}"]
    assert "error" not in got, in_process.detail(label)
    # vLLM says where it loads from: this run read the mount, not some other copy.
    assert f"Starting to load model {mounts[mount].mountpoint}..." in in_process.log(label)
    assert got["tokens"] == want["tokens"]
    assert max_logprob_difference(got, want) == 0
    assert got == want  # the same top tokens at every step, with bit-identical logprobs


def test_vllm_sees_the_mount_as_a_fuse_file_system(in_process):
    # Why vLLM never prefetches on its own here: it auto-prefetches only on NFS and Lustre.
    logs = "".join(in_process.log(f"good-{strategy}") for strategy in STRATEGIES)
    assert "Filesystem type for checkpoints: FUSE.CTFS" in logs


# -- a tampered shard -----------------------------------------------------------------------------------

# What each strategy says about the refused shard with `--verify full`, the mode operators should run: the
# failed open(), naming the file. safetensors (the lazy and prefetch paths) reports every failed open as
# "No such file or directory", whatever the errno; eager's own open() keeps the errno.
VERIFY_FULL_ERRORS = {
    "default": "FileNotFoundError: No such file or directory: {path}",
    "eager": "OSError: [Errno 5] Input/output error: '{path}'",
    "prefetch": "FileNotFoundError: No such file or directory: {path}",
}


def daemon_lines_about_the_shard(mount) -> list[str]:
    return [line for line in mount.log().splitlines() if f"/{TAMPERED_SHARD}" in line]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_with_verify_full_a_tampered_shard_fails_the_load_naming_the_file(mounts, in_process, strategy):
    label = f"full-{strategy}"
    want = VERIFY_FULL_ERRORS[strategy].format(path=mounts["full"].path(TAMPERED_SHARD))
    assert in_process.results[label] == {"error": want}, in_process.detail(label)
    assert want in in_process.log(label)  # in vLLM's own output, where the user looks


def test_with_verify_full_the_daemon_logs_why_it_refused_the_shard(mounts, in_process):
    assert all("error" in in_process.results[f"full-{strategy}"] for strategy in STRATEGIES)
    lines = daemon_lines_about_the_shard(mounts["full"])
    assert lines and all(f"open /{TAMPERED_SHARD} refused (EIO)" in line and "authentication tag mismatch" in line
                         for line in lines), lines


def test_served_with_verify_full_vllm_reports_the_refused_file_as_the_root_cause(mounts, served):
    # vLLM's engine processes: the worker's error is printed with its cause, then the engine's summary.
    log = served.log("full")
    assert served.results["full"]["error"].startswith("RuntimeError: Engine core initialization failed. See root "
                                                      "cause above."), served.detail("full")
    cause = VERIFY_FULL_ERRORS["default"].format(path=mounts["full"].path(TAMPERED_SHARD))
    assert cause in log and log.index(cause) < log.rindex("Engine core initialization failed"), served.detail("full")


def test_served_with_verify_open_a_tampered_shard_still_fails_the_load_but_only_the_daemon_says_why(mounts, served):
    # The default mode: the open succeeds and the worker's mmap read of the bad chunk gets EIO, which the
    # kernel turns into SIGBUS; vLLM reports only that its engine failed to start. (From a memory image,
    # the open fails, as with --verify full.)
    assert served.results["open"]["error"].startswith("RuntimeError: Engine core initialization failed"), \
        served.detail("open")
    lines = daemon_lines_about_the_shard(mounts["open"])
    assert lines and all("read of" in line and "authentication tag mismatch" in line for line in lines), lines
