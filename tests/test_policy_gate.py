"""The open-time gate: embedded AND operator policy, the decision cache, and its audit records."""

import json
import os
import threading
from pathlib import Path

import pytest
from conftest import parked_thread

from ctfs.errors import PolicyError
from ctfs.policy import gate as gate_module
from ctfs.policy.audit import AuditLog
from ctfs.policy.context import Reader
from ctfs.policy.engine import DEFAULT_POLICY, Decision
from ctfs.policy.gate import PolicyGate

ME = Reader(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
OTHER_USER = Reader(pid=os.getpid(), uid=os.getuid() + 1000, gid=os.getgid())
ONLY_ME = f"package model\nallow if input.process.uid == {ME.uid}"
DENY_ALL = "package model\nallow = false"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def audit_path(tmp_path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def audit_log(audit_path):
    log = AuditLog.to_file(str(audit_path))
    yield log
    log.close()


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def open_file(gate: PolicyGate, reader: Reader = ME, *, embedded=None, file="/llama/a.safetensors"):
    return gate.check(
        reader=reader, file=file, model_dir="/llama", embedded_policy=embedded, key_ids=["prod-2025"],
        file_identity=("inode", 7, file),
    )


def test_a_file_without_a_policy_is_allowed_by_the_default():
    assert open_file(PolicyGate()).allowed
    assert open_file(PolicyGate(), embedded=DEFAULT_POLICY).allowed


@pytest.mark.parametrize(
    ("embedded", "operator", "allowed", "reason"),
    [
        (ONLY_ME, None, True, "allowed by embedded"),
        (ONLY_ME, ONLY_ME, True, "allowed by embedded, operator"),
        (DENY_ALL, ONLY_ME, False, "embedded: allow is false"),
        (ONLY_ME, DENY_ALL, False, "operator: allow is false"),
        (None, DENY_ALL, False, "operator: allow is false"),
    ],
)
def test_embedded_and_operator_policy_must_both_allow(embedded, operator, allowed, reason):
    decision = open_file(PolicyGate(operator_policy=operator), embedded=embedded)
    assert decision == Decision(allowed, reason)


def test_only_one_uid_through_the_gate():
    gate = PolicyGate(operator_policy=ONLY_ME)
    assert open_file(gate, ME).allowed
    assert not open_file(gate, OTHER_USER).allowed


def test_operator_labels_reach_the_policy():
    policy = 'package model\nallow if input.labels.env == "prod"'
    assert open_file(PolicyGate(operator_policy=policy, labels={"env": "prod"})).allowed
    assert not open_file(PolicyGate(operator_policy=policy, labels={"env": "dev"})).allowed


def test_an_embedded_syntax_error_denies():
    decision = open_file(PolicyGate(), embedded="package model\nallow { true }")
    assert not decision.allowed and decision.reason.startswith("embedded: policy error: line 2 col 7")


def test_an_invalid_operator_policy_is_refused_up_front():
    with pytest.raises(PolicyError, match="policy package is 'ops'"):
        PolicyGate(operator_policy="package ops\nallow = true")


def test_decisions_are_cached_for_the_ttl_and_every_open_is_audited(audit_log, audit_path):
    clock = FakeClock()
    gate = PolicyGate(cache_ttl=5.0, audit=audit_log, clock=clock)
    open_file(gate)
    clock.now += 4.9
    open_file(gate)
    clock.now += 0.1
    open_file(gate)
    open_file(gate)
    assert [rec["cached"] for rec in audit_lines(audit_path)] == [False, True, False, True]


def test_a_zero_ttl_disables_the_cache(audit_log, audit_path):
    gate = PolicyGate(cache_ttl=0, audit=audit_log, clock=FakeClock())
    open_file(gate)
    open_file(gate)
    assert [rec["cached"] for rec in audit_lines(audit_path)] == [False, False]


def test_the_cache_is_per_file_and_per_process_identity(audit_log, audit_path):
    gate = PolicyGate(operator_policy=ONLY_ME, audit=audit_log, clock=FakeClock())
    assert open_file(gate, ME).allowed
    assert not open_file(gate, OTHER_USER).allowed
    assert open_file(gate, ME, file="/llama/b.safetensors").allowed
    assert not open_file(gate, ME, embedded=DENY_ALL).allowed
    assert [rec["cached"] for rec in audit_lines(audit_path)] == [False, False, False, False]


def test_another_thread_of_the_same_process_shares_the_cached_decision(audit_log, audit_path):
    gate = PolicyGate(audit=audit_log, clock=FakeClock())
    with parked_thread() as tid:
        open_file(gate, ME)
        open_file(gate, Reader(pid=tid, uid=ME.uid, gid=ME.gid))
    records = audit_lines(audit_path)
    assert [rec["cached"] for rec in records] == [False, True]
    assert [rec["process"]["pid"] for rec in records] == [ME.pid, tid]


def test_allow_and_deny_are_audited(audit_log, audit_path):
    gate = PolicyGate(operator_policy=ONLY_ME, labels={"env": "prod"}, audit=audit_log)
    open_file(gate, ME)
    open_file(gate, OTHER_USER)
    allow, deny = audit_lines(audit_path)
    assert allow["decision"] == "allow" and allow["reason"] == "allowed by embedded, operator"
    assert deny["decision"] == "deny" and deny["reason"] == "operator: allow is undefined for this input"
    assert deny["process"]["uid"] == OTHER_USER.uid
    for rec in (allow, deny):
        assert rec["file"] == "/llama/a.safetensors"
        assert rec["key_ids"] == ["prod-2025"]
        assert rec["labels"] == {"env": "prod"}


def test_an_open_that_cannot_be_audited_is_denied():
    log = AuditLog.to_file("/dev/full")
    decision = open_file(PolicyGate(audit=log))
    log.close()
    assert not decision.allowed and decision.reason.startswith("audit log write failed")


def test_concurrent_checks_are_all_decided_and_audited(audit_log, audit_path):
    gate = PolicyGate(operator_policy=ONLY_ME, audit=audit_log)
    results = []

    def reader(n: int) -> None:
        for i in range(20):
            results.append(open_file(gate, ME, file=f"/llama/{n}-{i % 3}.safetensors").allowed)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 160
    assert len(audit_lines(audit_path)) == 160


def test_policy_file_test_with_a_rego_file(tmp_path):
    rego = tmp_path / "ops.rego"
    rego.write_text("package model\nallow if input.process.uid == 1001")
    def never(path: str) -> str:
        pytest.fail("a .rego file needs no extraction")

    allowed = gate_module.test_policy_file(str(rego), {"process": {"uid": 1001}}, embedded_policy_of=never)
    denied = gate_module.test_policy_file(str(rego), {"process": {"uid": 0}}, embedded_policy_of=never)
    assert allowed == Decision(True, "allowed by ops.rego")
    assert denied == Decision(False, "ops.rego: allow is undefined for this input")


def test_policy_file_test_with_a_model_file_uses_its_embedded_policy_or_the_default():
    def embedded_policy_of(path: str) -> str | None:
        return {"/m/deny.safetensors": DENY_ALL}.get(path)

    denied = gate_module.test_policy_file("/m/deny.safetensors", {}, embedded_policy_of=embedded_policy_of)
    allowed = gate_module.test_policy_file("/m/plain.safetensors", {}, embedded_policy_of=embedded_policy_of)
    assert denied == Decision(False, "deny.safetensors: allow is false")
    assert allowed.allowed
