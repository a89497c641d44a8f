"""The systemd units: `systemd-analyze verify` clean, and the properties the service relies on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctfs.daemon.config import load_config

UNITS = Path(__file__).resolve().parent.parent / "systemd"
CTFS_UNIT = UNITS / "ctfs@.service"
VLLM_UNIT = UNITS / "vllm@.service"
# Where docs/server.md installs the executables the units run.
INSTALLED_CTFS = "/opt/ctfs/bin/ctfs"
INSTALLED_VLLM = "/opt/vllm/bin/vllm"

# Every directive that makes systemd 252 run the service in its own mount namespace
# (exec_needs_mount_namespace() and the directives that imply one): the FUSE mount would be
# invisible to the host, and to vLLM.
MOUNT_NAMESPACE_DIRECTIVES = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateNetwork",
    "PrivateIPC", "NetworkNamespacePath", "IPCNamespacePath", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
    "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths", "BindPaths",
    "BindReadOnlyPaths", "TemporaryFileSystem", "MountFlags", "MountAPIVFS", "RootDirectory",
    "RootImage", "MountImages", "ExtensionImages", "ExtensionDirectories", "DynamicUser",
    "LogNamespace",
}


def directives(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a unit file, in order."""
    section, found = "", []
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), "continuation lines are not used, so this parser stays simple"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(unit: Path, key: str) -> list[str]:
    return [value for _, k, value in directives(unit) if k == key]


def test_every_unit_file_is_checked_here():
    assert sorted(UNITS.glob("*.service")) == sorted([CTFS_UNIT, VLLM_UNIT])


def test_units_pass_systemd_analyze_verify(tmp_path):
    """verify needs every ExecXxx= executable to exist, and /opt/ctfs and /opt/vllm do not here.

    So it checks copies in which only those install paths are swapped: the ctfs entry point of
    this virtual environment, and a stand-in script for vLLM (not installed on test machines).
    Everything else is verified as written. A template is verified as systemd 252 does it, with
    an instance name; vllm@'s BindsTo= finds ctfs@ next to it. Warnings (unknown keys, bad
    values) only reach stderr with exit status 0, so stderr must be empty too.
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/setup.sh installs the systemd package"
    venv_ctfs = Path(sys.executable).parent / "ctfs"
    assert venv_ctfs.is_file(), "install ctfs into the virtual environment first (scripts/setup.sh)"
    vllm_stand_in = tmp_path / "vllm"
    vllm_stand_in.write_text("#!/bin/sh\n")
    vllm_stand_in.chmod(0o755)
    for unit in (CTFS_UNIT, VLLM_UNIT):
        text = unit.read_text().replace(INSTALLED_CTFS, str(venv_ctfs))
        text = text.replace(INSTALLED_VLLM, str(vllm_stand_in))
        (tmp_path / unit.name).write_text(text)
        (tmp_path / unit.name.replace("@", "@demo")).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", "ctfs@demo.service", "vllm@demo.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_only_the_documented_install_paths_are_swapped_for_verify():
    commands = [value for _, key, value in directives(CTFS_UNIT) if key.startswith("Exec")]
    assert {command.lstrip("-").split()[0] for command in commands} == {INSTALLED_CTFS, "/bin/kill"}
    assert values(VLLM_UNIT, "ExecStart")[0].split()[0] == INSTALLED_VLLM


def test_readiness_watchdog_and_restart():
    assert values(CTFS_UNIT, "Type") == ["notify"]
    assert values(CTFS_UNIT, "NotifyAccess") == ["main"]
    assert values(CTFS_UNIT, "WatchdogSec") == ["30s"]
    assert values(CTFS_UNIT, "Restart") == ["on-failure"]


def test_mount_lifecycle_commands():
    config = "--config /etc/ctfs/%i.toml"
    assert values(CTFS_UNIT, "ExecStartPre") == [f"{INSTALLED_CTFS} umount --stale {config}"]
    assert values(CTFS_UNIT, "ExecStart") == [f"{INSTALLED_CTFS} mount --foreground {config}"]
    assert values(CTFS_UNIT, "ExecStop") == [f"-{INSTALLED_CTFS} umount {config}"]
    assert values(CTFS_UNIT, "ExecReload") == ["/bin/kill -HUP $MAINPID"]


def test_keys_come_from_systemd_credentials():
    assert values(CTFS_UNIT, "LoadCredentialEncrypted") == ["keys.jwks:/etc/credstore.encrypted/ctfs-%i.jwks"]
    assert "#LoadCredential=keys.jwks:/etc/ctfs/keys/%i.jwks" in CTFS_UNIT.read_text()


@pytest.mark.parametrize("unit", [CTFS_UNIT, VLLM_UNIT], ids=lambda unit: unit.name)
def test_nothing_hides_the_mount_in_a_private_namespace(unit):
    assert {key for _, key, _ in directives(unit)} & MOUNT_NAMESPACE_DIRECTIVES == set()


def test_hardening_for_a_root_mount():
    # Run as root: with User= the seccomp and namespace directives below would imply
    # NoNewPrivileges, which breaks a mount through the setuid fusermount3.
    assert values(CTFS_UNIT, "User") == []
    assert values(CTFS_UNIT, "CapabilityBoundingSet") == ["CAP_SYS_ADMIN"]
    assert values(CTFS_UNIT, "DevicePolicy") == ["closed"]
    assert values(CTFS_UNIT, "DeviceAllow") == ["/dev/fuse rw"]
    assert values(CTFS_UNIT, "RestrictAddressFamilies") == ["AF_UNIX"]
    assert values(CTFS_UNIT, "LockPersonality") == ["yes"]
    assert values(CTFS_UNIT, "UMask") == ["0077"]
    assert values(CTFS_UNIT, "LimitCORE") == ["0"]
    assert values(CTFS_UNIT, "MemorySwapMax") == ["0"]  # plaintext memory images never reach swap


def test_vllm_is_bound_to_the_mount_and_prefetches():
    assert values(VLLM_UNIT, "BindsTo") == ["ctfs@%i.service"]
    assert values(VLLM_UNIT, "After") == ["ctfs@%i.service"]
    assert "ctfs@%i.service" in values(VLLM_UNIT, "WantedBy")[0].split()
    command = values(VLLM_UNIT, "ExecStart")[0].split()
    assert command[command.index("--safetensors-load-strategy") + 1] == "prefetch"


def test_example_config_is_valid_and_matches_the_units():
    config = load_config(UNITS / "example.toml")
    # Installed as /etc/ctfs/llama.toml, it mounts where vllm@llama.service reads.
    model_dir = values(VLLM_UNIT, "ExecStart")[0].split()[2]
    assert config.mountpoint == model_dir.replace("%i", "llama")
    # Keys arrive through $CREDENTIALS_DIRECTORY, so the example lists none.
    assert config.keys == []
    assert config.allow_other is True
    assert config.trust == [str(UNITS / "trust" / "publisher.jwk")]
