"""Policy evaluation with regorus (ctfs.policy.engine) and the input document (ctfs.policy.context)."""

import json
import os
import re
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import parked_thread

from ctfs.errors import PolicyError
from ctfs.policy.context import (
    Reader,
    build_input,
    cgroup_path,
    process_info,
    unit_of_cgroup,
)
from ctfs.policy.engine import DEFAULT_POLICY, Decision, evaluate, validate_policy

DOCS = Path(__file__).resolve().parent.parent / "docs" / "policy.md"
ME = Reader(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
TUESDAY_MORNING = datetime(2025, 3, 4, 9, 15, tzinfo=timezone.utc)


def decide(policy: str, reader: Reader = ME, *, labels=None, now=TUESDAY_MORNING) -> Decision:
    doc = build_input(reader, file="/llama/a.safetensors", model_dir="/llama", labels=labels or {}, now=now)
    return evaluate([("embedded", policy)], doc)


# --- upstream compatibility -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy", [DEFAULT_POLICY, "package model\nallow = true", "package model\n\nallow if { true }"]
)
def test_upstream_style_policies_validate_and_allow(policy):
    validate_policy(policy)
    assert decide(policy).allowed


def test_rego_v0_syntax_is_rejected_as_upstream_rejects_it():
    v0 = "package model\nallow { true }"
    with pytest.raises(PolicyError, match="`if` keyword is required"):
        validate_policy(v0)
    denied = decide(v0)
    assert not denied.allowed and "`if` keyword is required" in denied.reason


# --- validate_policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("package model\nallow if {{", "invalid Rego policy: line 2 col"),
        ("package cryptotensors\nallow = true", "'cryptotensors'; CryptoTensors requires 'package model'"),
        ("package model.sub\nallow = true", "'model.sub'"),
        ("package model\ndeny = true", "defines no 'allow' rule"),
        ("package model\nallow contains 1 if { true }", "defines no 'allow' rule"),
        ("", "invalid Rego policy"),
    ],
)
def test_validate_policy_refuses_with_one_line(policy, message):
    with pytest.raises(PolicyError, match=re.escape(message)) as caught:
        validate_policy(policy)
    assert "\n" not in str(caught.value) and "backtrace" not in str(caught.value).lower()


def test_validate_policy_accepts_default_rule_and_input_rules():
    validate_policy("package model\nimport rego.v1\ndefault allow := false\nallow if input.process.uid == 0")


# --- evaluate: fail closed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        ("package model\nallow = false", "embedded: allow is false"),
        ("package model\nallow if { false }", "embedded: allow is undefined for this input"),
        ('package model\nallow = "yes"', "embedded: allow is not a boolean (got str)"),
        ("package model\nallow = 1", "embedded: allow is not a boolean (got int)"),
        ("package model\nallow if {{", "embedded: policy error: line 2 col"),
        ("package model\nallow if { 1 / 0 == 1 }", "embedded: policy error: line 2 col 14: divide by zero"),
        ("package model\ndeny = true", "embedded: no 'allow' rule in package 'model'"),
        ("package cryptotensors\nallow = true", "embedded: no 'allow' rule in package 'model'"),
        ("package model\nallow if input.process.no_such_field == 1", "embedded: allow is undefined"),
    ],
)
def test_everything_but_true_denies_with_a_reason(policy, reason):
    decision = decide(policy)
    assert not decision.allowed
    assert decision.reason.startswith(reason)
    assert "\n" not in decision.reason


def test_no_modules_denies():
    assert not evaluate([], {}).allowed


def test_every_module_must_allow_and_the_reason_names_the_one_that_did_not():
    doc = {"process": {"uid": 1001}}
    uid_1001 = "package model\nallow if input.process.uid == 1001"
    deny_all = "package model\nallow = false"
    assert evaluate([("embedded", DEFAULT_POLICY), ("operator", uid_1001)], doc) == Decision(
        True, "allowed by embedded, operator"
    )
    assert evaluate([("embedded", deny_all), ("operator", uid_1001)], doc) == Decision(
        False, "embedded: allow is false"
    )
    assert evaluate([("embedded", uid_1001), ("operator", deny_all)], doc) == Decision(
        False, "operator: allow is false"
    )


def test_a_cached_engine_sees_each_new_input():
    uid_1001 = "package model\nallow if input.process.uid == 1001"
    results = [evaluate([("p", uid_1001)], {"process": {"uid": uid}}).allowed for uid in (1001, 0, 1001, 7)]
    assert results == [True, False, True, False]


def test_concurrent_evaluations_from_many_threads_are_correct():
    uid_even = "package model\nallow if input.process.uid % 2 == 0"
    results: dict[int, bool] = {}

    def run(uid: int) -> None:
        results[uid] = evaluate([("p", uid_even)], {"process": {"uid": uid}}).allowed

    threads = [threading.Thread(target=run, args=(uid,)) for uid in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {uid: uid % 2 == 0 for uid in range(32)}


def test_evaluation_works_in_a_forked_child_after_use_in_the_parent():
    assert evaluate([("p", DEFAULT_POLICY)], {}).allowed
    child = os.fork()
    if child == 0:
        os._exit(0 if evaluate([("p", DEFAULT_POLICY)], {}).allowed else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- policies over the input -------------------------------------------------------------------------


def test_only_one_uid():
    policy = f"package model\nallow if input.process.uid == {ME.uid}"
    assert decide(policy).allowed
    assert not decide(policy, Reader(pid=ME.pid, uid=ME.uid + 1, gid=ME.gid)).allowed


def test_only_one_executable():
    exe = os.path.realpath(sys.executable)
    assert decide(f"package model\nallow if input.process.exe == {json.dumps(exe)}").allowed
    assert not decide('package model\nallow if input.process.exe == "/usr/bin/cat"').allowed


def test_only_a_time_window():
    policy = (
        "package model\n"
        "allow if {\n"
        '  [hour, _, _] := time.clock([time.parse_rfc3339_ns(input.time.rfc3339), "UTC"])\n'
        "  hour >= 8\n"
        "  hour < 18\n"
        "}\n"
    )
    assert decide(policy, now=TUESDAY_MORNING).allowed
    assert not decide(policy, now=TUESDAY_MORNING.replace(hour=20)).allowed


def test_only_before_an_expiry_in_unix_time():
    policy = "package model\nallow if input.time.unix < 1741080000"
    assert decide(policy, now=TUESDAY_MORNING).allowed
    assert not decide(policy, now=TUESDAY_MORNING.replace(hour=10)).allowed


def test_only_a_label():
    policy = 'package model\nallow if input.labels.env == "prod"'
    assert decide(policy, labels={"env": "prod"}).allowed
    assert not decide(policy, labels={"env": "dev"}).allowed
    assert not decide(policy).allowed


# --- the input document ------------------------------------------------------------------------------


def test_process_info_of_this_process():
    info = process_info(os.getpid())
    assert info["pid"] == os.getpid()
    assert info["exe"] == os.path.realpath(sys.executable)
    assert info["uid"] == os.getuid() and info["gid"] == os.getgid()
    assert info["cmdline"] == sys.orig_argv
    assert isinstance(info["cgroup"], str) and info["cgroup"].startswith("/")


def test_process_info_of_a_thread_id_describes_its_process():
    with parked_thread() as tid:
        assert process_info(tid)["exe"] == os.path.realpath(sys.executable)


def test_process_info_of_a_dead_pid_is_all_null():
    proc = subprocess.Popen(["true"])
    proc.wait()
    info = process_info(proc.pid)
    assert info == {"pid": proc.pid} | dict.fromkeys(("uid", "gid", "exe", "cmdline", "cgroup", "unit"))


def test_build_input_takes_credentials_from_fuse_and_the_rest_from_proc():
    reader = Reader(pid=os.getpid(), uid=4242, gid=4343)
    doc = build_input(
        reader, file="/llama/model-00001-of-00002.safetensors", model_dir="/llama", labels={"env": "prod"},
        now=TUESDAY_MORNING,
    )
    assert doc["process"]["uid"] == 4242 and doc["process"]["gid"] == 4343
    assert doc["process"]["exe"] == os.path.realpath(sys.executable)
    assert doc["file"] == {
        "path": "/llama/model-00001-of-00002.safetensors",
        "name": "model-00001-of-00002.safetensors",
        "model_dir": "/llama",
        "utf8": True,
    }
    assert doc["time"] == {"rfc3339": "2025-03-04T09:15:00Z", "unix": 1741079700}
    assert doc["labels"] == {"env": "prod"}
    assert set(doc["host"]) == {"hostname", "machine_id"} and doc["host"]["hostname"]


def test_a_path_that_is_not_utf8_reaches_the_policy_escaped_and_flagged():
    raw = os.fsdecode(b"/dir\xff/m\xc3.safetensors")  # what the mount gets from the kernel
    doc = build_input(ME, file=raw, model_dir=os.fsdecode(b"/dir\xff"), labels={}, now=TUESDAY_MORNING)
    assert doc["file"] == {"path": "/dir\\xff/m\\xc3.safetensors", "name": "m\\xc3.safetensors",
                           "model_dir": "/dir\\xff", "utf8": False}
    json.dumps(doc, ensure_ascii=False).encode("utf-8")  # valid UTF-8 throughout
    policy = 'package model\nallow if input.file.path == "/dir\\\\xff/m\\\\xc3.safetensors"'
    assert evaluate([("operator", policy)], doc).allowed


def test_input_the_engine_cannot_take_is_a_denial_not_a_crash():
    # A lone surrogate kills the Rego engine's process; it must never reach it.
    doc = {"file": {"path": os.fsdecode(b"/x\xff")}}
    decision = evaluate([("operator", "package model\nallow = true")], doc)
    assert not decision.allowed and "surrogate" in decision.reason


def test_build_input_converts_other_zones_to_utc():
    berlin_winter = timezone(timedelta(hours=1))
    now = TUESDAY_MORNING.astimezone(berlin_winter)
    doc = build_input(ME, file="/m/a", model_dir="/m", labels={}, now=now)
    assert doc["time"] == {"rfc3339": "2025-03-04T09:15:00Z", "unix": 1741079700}


def test_cgroup_path_prefers_the_unified_line_and_falls_back_to_systemds_v1_hierarchy():
    assert cgroup_path("0::/system.slice/vllm.service\n") == "/system.slice/vllm.service"
    v1 = "4:memory:/x\n1:name=systemd:/system.slice/vllm.service\n"
    assert cgroup_path(v1) == "/system.slice/vllm.service"
    assert cgroup_path("4:memory:/x\n") is None
    assert cgroup_path(None) is None


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("/system.slice/vllm.service", "vllm.service"),
        ("/system.slice/vllm.service/payload", "vllm.service"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        # A user unit named like a system service must not pass for it.
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/vllm.service", "user@1000.service"),
        ("/system.slice/docker-0123abcd.scope", "docker-0123abcd.scope"),
        ("/", None),
        (None, None),
    ],
)
def test_unit_is_the_system_managers_unit(cgroup, unit):
    assert unit_of_cgroup(cgroup) == unit


# --- the documentation -------------------------------------------------------------------------------


def test_documented_input_has_exactly_the_fields_build_input_produces():
    documented = json.loads(re.search(r"```json\n(.*?)```", DOCS.read_text(), re.S)[1])
    built = build_input(ME, file="/m/a", model_dir="/m", labels={"env": "prod", "tenant": "search"})
    assert {k: set(v) for k, v in documented.items()} == {k: set(v) for k, v in built.items()}


def test_every_documented_policy_is_valid_and_allows_the_documented_input():
    text = DOCS.read_text()
    documented_input = json.loads(re.search(r"```json\n(.*?)```", text, re.S)[1])
    policies = re.findall(r"```rego\n(.*?)```", text, re.S)
    assert len(policies) >= 10
    for policy in policies:
        validate_policy(policy)
        assert evaluate([("doc", policy)], documented_input).allowed, policy
