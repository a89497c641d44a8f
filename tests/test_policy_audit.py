"""The audit trail: what a record holds, where it goes, and reading it back (ctfs.policy.audit)."""

import json
import os
import stat
import subprocess
import sys
import threading
import time
import types
from datetime import datetime, timezone

import pytest

from ctfs.policy.audit import AuditLog, filter_records, format_record, read_records
from ctfs.policy.context import Reader
from ctfs.policy.engine import Decision
from ctfs.policy.gate import PolicyGate

ALLOW = Decision(True, "allowed by embedded")
DENY = Decision(False, "operator: allow is false")
PROCESS = {
    "pid": 4242, "uid": 1001, "gid": 1001, "exe": "/usr/bin/python3", "cmdline": ["python3", "--token=s3cret"]
}


def write(log: AuditLog, decision: Decision = ALLOW, **overrides) -> dict:
    fields = dict(
        file="/llama/a.safetensors", process=PROCESS, decision=decision, key_ids=["prod-2025"],
        labels={"env": "prod"}, cached=False,
    )
    return log.record(**(fields | overrides))


def test_a_record_holds_identifiers_only(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog.to_file(str(path))
    write(log, ALLOW)
    write(log, DENY, cached=True)
    log.close()
    allow, deny = (json.loads(line) for line in path.read_text().splitlines())
    assert set(allow) == {"time", "file", "process", "decision", "reason", "key_ids", "labels", "cached"}
    assert allow["process"] == {"pid": 4242, "uid": 1001, "gid": 1001, "exe": "/usr/bin/python3"}
    assert (allow["decision"], deny["decision"]) == ("allow", "deny")
    assert deny["reason"] == "operator: allow is false" and deny["cached"] is True
    assert allow["key_ids"] == ["prod-2025"] and allow["labels"] == {"env": "prod"}
    assert datetime.fromisoformat(allow["time"]).tzinfo == timezone.utc and allow["time"].endswith("Z")
    assert "s3cret" not in path.read_text()


def test_no_secret_reaches_the_log_through_the_gate(tmp_path):
    """A reader whose arguments carry a token, and a key id beside key material the gate never gets."""
    path = tmp_path / "audit.jsonl"
    secret = "c2VjcmV0LW1hc3Rlci1rZXktbWF0ZXJpYWw="
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", f"--api-key={secret}"])
    log = AuditLog.to_file(str(path))
    try:
        PolicyGate(audit=log).check(
            reader=Reader(pid=child.pid, uid=os.getuid(), gid=os.getgid()), file="/llama/a.safetensors",
            model_dir="/llama", embedded_policy=None, key_ids=["master-kid-1"], file_identity=1,
        )
    finally:
        log.close()
        child.kill()
        child.wait()
    text = path.read_text()
    (rec,) = (json.loads(line) for line in text.splitlines())
    assert rec["key_ids"] == ["master-kid-1"] and rec["process"]["pid"] == child.pid
    assert secret not in text and "api-key" not in text


def test_the_file_is_created_0600_and_appended_to(tmp_path):
    path = tmp_path / "audit.jsonl"
    path_str = str(path)
    for _ in range(2):
        log = AuditLog.to_file(path_str)
        write(log)
        log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(path.read_text().splitlines()) == 2


def test_each_record_is_on_disk_at_once(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog.to_file(str(path))
    write(log)
    assert len(path.read_text().splitlines()) == 1
    log.close()


def test_a_closed_log_refuses_to_write(tmp_path):
    log = AuditLog.to_file(str(tmp_path / "audit.jsonl"))
    log.close()
    with pytest.raises(ValueError):
        write(log)


def test_concurrent_writers_leave_whole_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog.to_file(str(path))
    long_labels = {f"label{i}": "x" * 200 for i in range(50)}

    def writer() -> None:
        for _ in range(50):
            write(log, labels=long_labels)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    records = read_records(str(path))
    assert len(list(records)) == 400 and records.malformed == 0


def test_journal_without_python_systemd_falls_back_to_a_json_line_on_stderr(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "systemd", None)
    write(AuditLog.to_journal(), DENY)
    rec = json.loads(capfd.readouterr().err)
    assert rec["decision"] == "deny" and rec["file"] == "/llama/a.safetensors"


def test_journal_with_python_systemd_sends_structured_fields(monkeypatch):
    sent = []
    journal = types.SimpleNamespace(send=lambda message, **fields: sent.append((message, fields)))
    monkeypatch.setitem(sys.modules, "systemd", types.SimpleNamespace(journal=journal))
    monkeypatch.setitem(sys.modules, "systemd.journal", journal)
    write(AuditLog.to_journal(), DENY)
    ((message, fields),) = sent
    assert json.loads(message)["decision"] == "deny"
    assert fields == {
        "SYSLOG_IDENTIFIER": "ctfs-audit", "PRIORITY": "4", "CTFS_DECISION": "deny",
        "CTFS_FILE": "/llama/a.safetensors", "CTFS_UID": "1001", "CTFS_EXE": "/usr/bin/python3",
    }


# --- reading back ------------------------------------------------------------------------------------


def sample(**overrides) -> dict:
    rec = {
        "time": "2025-03-04T09:15:00.000Z", "file": "/llama/a.safetensors",
        "process": {"pid": 1, "uid": 1001, "gid": 1001, "exe": "/usr/bin/python3"}, "decision": "allow",
        "reason": "allowed by embedded", "key_ids": ["prod-2025"], "labels": {}, "cached": False,
    }
    return rec | overrides


def test_read_records_skips_and_counts_malformed_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text(
        json.dumps(sample()) + "\n"
        + "not json\n"
        + "\n"
        + "[1, 2]\n"
        + json.dumps(sample(decision="deny")) + "\n"
        + '{"time": "2025-03-04T09:16'  # a record cut short by a crash
    )
    records = read_records(str(path))
    assert [rec["decision"] for rec in records] == ["allow", "deny"]
    assert records.malformed == 3


def test_read_records_from_stdin(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    path.write_text(json.dumps(sample()) + "\n")
    with open(path) as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert [rec["file"] for rec in read_records("-")] == ["/llama/a.safetensors"]


def test_filter_records_by_each_criterion():
    records = [
        sample(),
        sample(decision="deny", process={"uid": 0}),
        sample(file="/mistral/b.safetensors", time="2025-03-05T00:00:00.000Z"),
        sample(time="garbage"),
    ]

    def files(**criteria):
        return [(rec["file"], rec["time"]) for rec in filter_records(records, **criteria)]

    assert len(files()) == 4
    assert [rec["decision"] for rec in filter_records(records, decision="deny")] == ["deny"]
    assert len(files(uid=1001)) == 3
    assert files(file_glob="/mistral/*") == [("/mistral/b.safetensors", "2025-03-05T00:00:00.000Z")]
    assert files(since=datetime(2025, 3, 4, 12, tzinfo=timezone.utc)) == [
        ("/mistral/b.safetensors", "2025-03-05T00:00:00.000Z")
    ]
    assert len(files(decision="allow", uid=1001, file_glob="*.safetensors")) == 3


@pytest.fixture
def tokyo_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_filter_since_without_a_zone_is_local_time(tokyo_local_time):
    assert len(list(filter_records([sample()], since=datetime(2025, 3, 4, 18, 0)))) == 1  # 09:00 UTC
    assert list(filter_records([sample()], since=datetime(2025, 3, 4, 18, 30))) == []  # 09:30 UTC


def test_format_record_is_one_readable_line():
    line = format_record(sample(decision="deny", reason="operator: allow is false", cached=True))
    assert "\n" not in line
    for part in ("2025-03-04T09:15:00.000Z", "DENY", "/llama/a.safetensors", "uid=1001", "pid=1",
                 "exe=/usr/bin/python3", "keys=prod-2025", "operator: allow is false", "(cached)"):
        assert part in line


def test_format_record_survives_missing_fields():
    assert "?" in format_record({"decision": "allow"})
    assert format_record({"process": "not an object"})
