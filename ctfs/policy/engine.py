"""Rego evaluation of CryptoTensors policies (rule `data.model.allow`) with regorus, failing closed."""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import regorus

from ctfs.errors import PolicyError

DEFAULT_POLICY = "package model\nallow = true"
RULE = "data.model.allow"
EVAL_TIMEOUT_S = 2.0

# Distinct policy texts a mount meets are few (one per model, one operator policy); the bound only
# stops a directory of many different embedded policies from growing memory without limit.
_ENGINE_CACHE_SIZE = 64
_UNDEFINED_RULE = "not a valid rule path"
_MODULE_FILE = "model.rego"  # the name upstream loads the policy under
_LOCATION = re.compile(r"^\s*--> .*:(\d+):(\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Decision:
    """The outcome of a policy check; `reason` names the module that denied and why."""

    allowed: bool
    reason: str


def validate_policy(text: str) -> None:
    """Raise PolicyError unless `text` parses as Rego v1 in package `model` and defines `allow`."""
    engine = _new_engine()
    try:
        package = engine.add_policy(_MODULE_FILE, text)
    except RuntimeError as exc:
        raise PolicyError(f"invalid Rego policy: {_one_line(exc)}") from None
    if package != "data.model":
        found = package.removeprefix("data.")
        raise PolicyError(f"policy package is {found!r}; CryptoTensors requires 'package model'")
    if not _defines_allow(engine):
        raise PolicyError("policy defines no 'allow' rule (for example 'allow if { ... }')")


def evaluate(modules: Sequence[tuple[str, str]], input_doc: dict) -> Decision:
    """Allow only if every (name, rego text) module's `data.model.allow` is exactly true."""
    if not modules:
        return Decision(False, "no policy to evaluate")
    for name, text in modules:
        denial = _denial(text, input_doc)
        if denial is not None:
            return Decision(False, f"{name}: {denial}")
    return Decision(True, "allowed by " + ", ".join(name for name, _ in modules))


def _denial(text: str, input_doc: dict) -> str | None:
    future = _policy_thread().submit(_verdict, text, input_doc)
    try:
        return future.result(timeout=EVAL_TIMEOUT_S)
    except TimeoutError:
        # A queued job nobody waits for any more must not delay the ones behind it.
        future.cancel()
        return f"evaluation timed out after {EVAL_TIMEOUT_S:g} s"


def _verdict(text: str, input_doc: dict) -> str | None:
    """Run on the policy thread: None when the module allows, otherwise why it does not."""
    try:
        # The engine dies (SIGSEGV) on a str holding lone surrogates: refuse such input as an error here.
        json.dumps(input_doc, ensure_ascii=False).encode("utf-8")
        engine = _engine_for(text)
        engine.set_input(input_doc)
        result = engine.eval_rule(RULE)
    except BaseException as exc:  # regorus panics are BaseException; any failure must deny
        return _describe_error(exc)
    if result is True:
        return None
    if result is False:
        return "allow is false"
    if result is None:
        return "allow is undefined for this input"
    return f"allow is not a boolean (got {type(result).__name__})"


def _describe_error(exc: BaseException) -> str:
    message = _one_line(exc)
    if message == _UNDEFINED_RULE:
        return "no 'allow' rule in package 'model'"
    return f"policy error: {message}"


def _one_line(exc: BaseException) -> str:
    """Reduce a multi-line regorus diagnostic (source excerpt, Rust backtrace) to 'line L col C: what'."""
    body = str(exc).split("Stack backtrace:", 1)[0]
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    what = next((line[7:] for line in lines if line.startswith("error: ")), lines[0])
    where = _LOCATION.search(body)
    return f"line {where[1]} col {where[2]}: {what}" if where else what


def _defines_allow(engine: regorus.Engine) -> bool:
    modules = json.loads(engine.get_ast_as_json())
    return any(_is_complete_allow_rule(rule) for module in modules for rule in module["ast"]["rules"])


def _is_complete_allow_rule(rule: dict) -> bool:
    """True for `default allow ...` and `allow [= value] [if {...}]`, not for sets, objects or functions."""
    if "Default" in rule:
        ref = rule["Default"].get("refr")
    else:
        ref = rule.get("Spec", {}).get("head", {}).get("Compr", {}).get("refr")
    return isinstance(ref, dict) and ref.get("Var", {}).get("value") == "allow"


def _new_engine() -> regorus.Engine:
    engine = regorus.Engine()
    # Upstream CryptoTensors parses policies as Rego v1; a v0 policy would fail there, so here too.
    engine.set_rego_v0(False)
    return engine


# regorus engines are unsendable: pyo3 panics when a thread other than the creator touches one.
# FUSE callbacks arrive on libfuse threads whose Python thread state (and so any threading.local)
# lives only for one call, so a per-thread cache would never hit. One long-lived thread therefore
# owns every engine, and evaluations are handed to it.
_worker_state = threading.local()
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _policy_thread() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="ctfs-policy", initializer=_start_engine_cache
            )
        return _executor


def _start_engine_cache() -> None:
    _worker_state.engines = OrderedDict()


def _engine_for(text: str) -> regorus.Engine:
    """A parsed engine for this policy text, reused across decisions (parsing ~1 ms, evaluating ~10 µs)."""
    engines: OrderedDict[str, regorus.Engine] = _worker_state.engines
    engine = engines.get(text)
    if engine is not None:
        engines.move_to_end(text)
        return engine
    engine = _new_engine()
    engine.add_policy(_MODULE_FILE, text)
    engines[text] = engine
    if len(engines) > _ENGINE_CACHE_SIZE:
        engines.popitem(last=False)
    return engine


def _forget_policy_thread() -> None:
    """In a forked child the policy thread is gone; start a new one on first use."""
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_policy_thread)
