"""The access decision at open(): embedded and operator policy, a short decision cache, the audit trail."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

from ctfs.policy.audit import AuditLog
from ctfs.policy.context import Reader, build_input
from ctfs.policy.engine import DEFAULT_POLICY, Decision, evaluate, validate_policy

log = logging.getLogger(__name__)

# Past this many live entries the oldest go first; a bound on memory, not a tuning knob.
_MAX_CACHED_DECISIONS = 4096


class PolicyGate:
    """Decides whether a reader may open a file; shared by all daemon threads."""

    def __init__(
        self,
        *,
        operator_policy: str | None = None,
        labels: Mapping[str, str] = {},
        cache_ttl: float = 5.0,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        # A broken operator policy would deny every open; refuse it at mount time instead.
        if operator_policy is not None:
            validate_policy(operator_policy)
        self._operator_policy = operator_policy
        self._labels = dict(labels)
        self._ttl = cache_ttl
        self._audit = audit
        self._clock = clock
        self._lock = threading.Lock()
        # Insertion order is expiry order (one TTL for all), so expired entries sit at the front.
        self._decisions: OrderedDict[Hashable, tuple[Decision, float]] = OrderedDict()

    def check(
        self,
        *,
        reader: Reader,
        file: str,
        model_dir: str,
        embedded_policy: str | None,
        key_ids: Sequence[str],
        file_identity: Hashable,
    ) -> Decision:
        """Evaluate (or recall) the decision for this open and audit it; fails closed."""
        input_doc = build_input(reader, file=file, model_dir=model_dir, labels=self._labels)
        key = (file_identity, embedded_policy, file, model_dir, process_identity(input_doc["process"]))
        decision = self._recall(key)
        cached = decision is not None
        if decision is None:
            decision = evaluate(self._modules(embedded_policy), input_doc)
            self._remember(key, decision)
        return self._audited(decision, input_doc, key_ids, cached)

    def _modules(self, embedded_policy: str | None) -> list[tuple[str, str]]:
        modules = [("embedded", embedded_policy if embedded_policy is not None else DEFAULT_POLICY)]
        if self._operator_policy is not None:
            modules.append(("operator", self._operator_policy))
        return modules

    def _recall(self, key: Hashable) -> Decision | None:
        with self._lock:
            entry = self._decisions.get(key)
        if entry is None or self._clock() >= entry[1]:
            return None
        return entry[0]

    def _remember(self, key: Hashable, decision: Decision) -> None:
        now = self._clock()
        with self._lock:
            self._decisions.pop(key, None)
            self._decisions[key] = (decision, now + self._ttl)
            self._evict(now)

    def _evict(self, now: float) -> None:
        """Drop expired entries, then the oldest past the bound; the caller holds the lock."""
        while self._decisions:
            _, expires = next(iter(self._decisions.values()))
            if expires > now and len(self._decisions) <= _MAX_CACHED_DECISIONS:
                return
            self._decisions.popitem(last=False)

    def _audited(
        self, decision: Decision, input_doc: dict, key_ids: Sequence[str], cached: bool
    ) -> Decision:
        if self._audit is None:
            return decision
        try:
            self._audit.record(
                file=input_doc["file"]["path"],
                process=input_doc["process"],
                decision=decision,
                key_ids=key_ids,
                labels=self._labels,
                cached=cached,
            )
        except OSError as exc:
            # An access that cannot be audited does not happen.
            log.error("audit log write failed, denying %s: %s", input_doc["file"]["path"], exc)
            return Decision(False, f"audit log write failed: {exc}")
        return decision


def process_identity(process: Mapping) -> tuple:
    """Who the reader is, for caching: every process field a policy sees except pid (and unit, derived
    from cgroup). cmdline is included because a policy may test it, and one interpreter binary runs
    many programs."""
    cmdline = process.get("cmdline")
    return (
        process.get("uid"),
        process.get("gid"),
        process.get("exe"),
        None if cmdline is None else tuple(cmdline),
        process.get("cgroup"),
    )


def test_policy_file(
    path: str, input_doc: dict, *, embedded_policy_of: Callable[[str], str | None]
) -> Decision:
    """Evaluate offline: a `.rego` file itself, or the policy embedded in a model file (via the callable;
    None means the file embeds none, so the default applies as at mount time)."""
    if path.endswith(".rego"):
        text = Path(path).read_text(encoding="utf-8")
    else:
        embedded = embedded_policy_of(path)
        text = embedded if embedded is not None else DEFAULT_POLICY
    return evaluate([(os.path.basename(path), text)], input_doc)
