"""The `ctfs` command: thin wrappers that parse options and call the library layers."""

from __future__ import annotations

import functools
import json
import os
import secrets
import sys
from pathlib import Path

import click
from click.core import ParameterSource
from tqdm import tqdm

from ctfs.crypto.signing import public_key_of
from ctfs.daemon.config import LOG_LEVELS, VERIFY_MODES, MiB, MountConfig
from ctfs.errors import CtfsError
from ctfs.files.atomic import atomic_output, write_all
from ctfs.files.decrypt import decrypt_file
from ctfs.files.encrypt import EncryptOptions, encrypt_file
from ctfs.files.encrypted import verify_files
from ctfs.files.inspect import describe
from ctfs.files.modeldir import (
    SIGNATURE_NAME,
    check_distinct,
    is_safetensors,
    safetensors_data_bytes,
    safetensors_files,
    transform_tree,
    walk_files,
)
from ctfs.format.encryption import (
    DEFAULT_CHUNK_SIZE,
    ENC_KEY_LENGTHS,
)
from ctfs.keys.chain import KeyOptions
from ctfs.keys.files import load_key_paths
from ctfs.keys.jwk import EncryptionKey, SigningKey, to_reference_jwk
from ctfs.keys.store import KeyStore


def fail(message: str) -> None:
    click.echo(f"ctfs: error: {message}", err=True)
    sys.exit(1)


def reports_errors(func):
    """Turn expected failures into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CtfsError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        except KeyboardInterrupt:
            fail("interrupted")

    return wrapper


def progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)


# The key options of docs/keys.md, declared once: every command that reads keys takes them, and `ctfs mount`
# hands them to its MountConfig.
_KEY_OPTIONS = {
    "keys": click.option("--keys", "-k", "keys", multiple=True,
                         help="JWK or JWK Set file, or a directory of them (repeatable); the other key sources "
                              "of docs/keys.md are read too."),
    "trust": click.option("--trust", multiple=True, show_default="the public halves of the signing keys found",
                          help="Verify key of a trusted signer: file or directory (repeatable)."),
    "key_command": click.option("--key-command", help="Command printing a master key as a JWK, given a kid "
                                                      "and an algorithm (docs/keys.md)."),
    "allow_jku": click.option("--allow-jku", multiple=True,
                              help="file:// prefix under which a header's jku may supply a master key (repeatable)."),
    "insecure_key_perms": click.option("--insecure-key-perms", is_flag=True,
                                       help="Accept key files readable by group or others."),
}
# A new file is encrypted and signed with keys held up front: a lookup by kid (command, jku) cannot supply them.
_KEYS_HELD = ("keys", "insecure_key_perms")
# Signed model directories (OpenSSF model signing, DIR/model.sig).
model_key_option = click.option("--model-key", type=click.Path(exists=True, dir_okay=False),
                                help="EC private key (PEM) to sign the whole directory with: writes DIR/model.sig.")
model_key_out_option = click.option("--model-key", type=click.Path(dir_okay=False),
                                    help="Write a P-256 model signing key here (0600), its public half as *.pub.pem.")
model_pubkey_option = click.option("--model-pubkey", type=click.Path(exists=True, dir_okay=False),
                                   help="The pinned public key (PEM) the directory's model.sig must verify with.")


def with_key_options(names: tuple[str, ...] = tuple(_KEY_OPTIONS)):
    """Give a command the key options `names`, as one KeyOptions argument `key_options`; the command builds
    its key chain with `key_options.chain()`, inside its own error reporting."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            chosen = KeyOptions(**{name: kwargs.pop(name) for name in names})
            return func(*args, key_options=chosen, **kwargs)

        for name in reversed(names):
            wrapper = _KEY_OPTIONS[name](wrapper)
        return wrapper

    return decorate


force_option = click.option("--force", is_flag=True,
                            help="Overwrite an existing output file (a destination directory must still be empty).")


def refuse_to_overwrite(path: Path, force: bool) -> None:
    """Every command that writes an output file keeps an existing one unless --force is given."""
    if os.path.lexists(path) and not force:
        raise CtfsError(f"{path} exists; pass --force to overwrite it")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ctfs")
def main() -> None:
    """Serve encrypted CryptoTensors models as plain safetensors, and the tools around them."""


@main.command()
@click.argument("out", type=click.Path(dir_okay=False), required=False)
@click.option("--alg", type=click.Choice(sorted(ENC_KEY_LENGTHS)), default="aes256gcm", show_default=True,
              help="Algorithm of the encryption key.")
@click.option("--kid", help="Key id prefix; the keys get KID-enc and KID-sign.", show_default="random")
@model_key_out_option
@force_option
@reports_errors
def keygen(out: str | None, alg: str, kid: str | None, model_key: str | None, force: bool) -> None:
    """Write a JWK Set with a new encryption key and a new Ed25519 signing key (mode 0600),
    and/or a model signing key pair (--model-key)."""
    if not out and not model_key:
        raise CtfsError("give OUT, --model-key, or both")
    if out:
        refuse_to_overwrite(Path(out), force)
    if model_key:
        _write_model_key(Path(model_key), force)
    if not out:
        return
    prefix = kid or secrets.token_hex(4)
    seed = secrets.token_bytes(32)
    keys = [
        EncryptionKey(alg, secrets.token_bytes(ENC_KEY_LENGTHS[alg]), kid=f"{prefix}-enc"),
        SigningKey(public_key_of(seed), seed, kid=f"{prefix}-sign"),
    ]
    doc = json.dumps({"keys": [to_reference_jwk(k) for k in keys]}, indent=2) + "\n"
    with atomic_output(out, 0o600) as fd:
        write_all(fd, doc.encode())
    click.echo(f"wrote {out}: encryption key {prefix}-enc ({alg}), signing key {prefix}-sign (ed25519)")


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@with_key_options(_KEYS_HELD)
@click.option("--format-version", type=click.Choice(["1", "2"]), default="2", show_default=True,
              help="CryptoTensors format: 2 encrypts in chunks, so readers decrypt only what they read.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=DEFAULT_CHUNK_SIZE, show_default=True,
              help="Bytes per encrypted chunk (format 2).")
@click.option("--tensors", multiple=True, help="Encrypt only these tensors (repeatable); others stay plain.")
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False),
              help="Rego policy (package model, rule allow) to embed.")
@model_key_option
@force_option
@reports_errors
def encrypt(src, dst, key_options, format_version, chunk_size, tensors, policy_file, model_key, force) -> None:
    """Encrypt a .safetensors file, or every one in a model directory (other files are copied)."""
    keys = key_options.chain()
    signer = _directory_signer(Path(src), model_key, key_options.insecure_key_perms)
    policy = None
    if policy_file:
        from ctfs.policy.engine import validate_policy

        policy = Path(policy_file).read_text("utf-8")
        validate_policy(policy)
    options = EncryptOptions(format_version, chunk_size, tensors or None, policy)
    enc_key, sign_key = keys.first_encryption_key(), keys.signing_key()
    _apply(Path(src), Path(dst), force, "encrypt",
           lambda s, d, cb: encrypt_file(s, d, enc_key, sign_key, options, on_bytes=cb),
           finish=signer.sign if signer else None)


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@with_key_options()
@force_option
@reports_errors
def decrypt(src, dst, key_options, force) -> None:
    """Decrypt a file or a model directory to plain safetensors (writes plaintext weights to disk)."""
    chain = key_options.chain()
    _apply(Path(src), Path(dst), force, "decrypt", lambda s, d, cb: decrypt_file(s, d, chain, on_bytes=cb))


def _apply(src: Path, dst: Path, force: bool, verb: str, operation, finish=None) -> None:
    if src.is_dir():
        files = [src / rel for rel in walk_files(src) if is_safetensors(src / rel)]
        with progress(safetensors_data_bytes(files), verb) as bar:
            done = transform_tree(src, dst, lambda s, d: operation(s, d, bar.update), finish)
        click.echo(f"{verb}ed {len(done)} safetensors file(s) from {src} into {dst}")
        if (src / SIGNATURE_NAME).is_file() and finish is None:
            click.echo(f"left out {SIGNATURE_NAME}: it signs the bytes of {src}, not these; "
                       f"sign {dst} with `ctfs sign` if it is to be published")
    else:
        if dst.is_dir():
            dst = dst / src.name
        check_distinct(src, dst)
        refuse_to_overwrite(dst, force)
        with progress(src.stat().st_size, verb) as bar:
            operation(src, dst, bar.update)
        click.echo(f"{verb}ed {src} into {dst}")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@with_key_options()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@reports_errors
def inspect(file, key_options, as_json) -> None:
    """Describe a file: tensors, encryption, keys, policy, and the signature status when a signer is known."""
    chain = key_options.chain()
    # No signer known anywhere and no --keys: "not checked" says more than INVALID would.
    report = describe(Path(file), chain if chain.may_verify() or key_options.keys else None)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    for key in ("file", "encrypted", "version", "chunk_size", "algorithm", "enc_kid", "sign_kid", "signature"):
        if key in report:
            click.echo(f"{key:12} {report[key]}")
    if "policy" in report:
        click.echo("policy       " + report["policy"].replace("\n", "\n             "))
    click.echo(f"tensors      {len(report['tensors'])}")
    for t in report["tensors"]:
        mark = "encrypted" if t["encrypted"] else "plain"
        click.echo(f"  {t['name']}  {t['dtype']}{t['shape']}  {t['bytes']} B  {mark}")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@model_pubkey_option
@with_key_options()
@reports_errors
def verify(path, model_pubkey, key_options) -> None:
    """Check the signature and every tag of a file, or of every safetensors file in a directory.
    With --model-pubkey, first check the directory against its model.sig; then the CryptoTensors
    signatures and tags only if key options are given too."""
    if model_pubkey:
        _verify_model_signature(Path(path), model_pubkey)
        if not _key_options_given():
            return
    chain = key_options.chain()
    files = safetensors_files(Path(path))
    with progress(safetensors_data_bytes(files), "verify") as bar:
        verify_files(files, chain, on_bytes=bar.update)
    click.echo(f"verified {len(files)} file(s): signatures and every tag are valid")


# -- signed model directories (OpenSSF model signing, model.sig) ------------------------------------

@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--model-key", type=click.Path(exists=True, dir_okay=False), required=True,
              help="EC private key (PEM; P-256, P-384 or P-521).")
@_KEY_OPTIONS["insecure_key_perms"]
@reports_errors
def sign(directory, model_key, insecure_key_perms) -> None:
    """Write DIRECTORY/model.sig (OpenSSF model signing) covering every file of the directory."""
    signer = _directory_signer(Path(directory), model_key, insecure_key_perms)
    click.echo(f"signed {directory}: wrote {signer.sign(directory)}")


def _directory_signer(src: Path, model_key: str | None, insecure_key_perms: bool):
    """The signer for --model-key, loaded before any work is done; None without the option."""
    if not model_key:
        return None
    if not src.is_dir():
        raise CtfsError("--model-key signs a model directory, and SRC is a single file")
    from ctfs.files.modelsig import DirectorySigner

    return DirectorySigner(model_key, check_perms=not insecure_key_perms)


def _write_model_key(private_key: Path, force: bool) -> None:
    from ctfs.files.modelsig import public_key_path, write_key_pair

    for path in (private_key, public_key_path(private_key)):
        refuse_to_overwrite(path, force)
    public = write_key_pair(private_key)
    click.echo(f"wrote {private_key}: model signing key (EC P-256), public key {public}")


def _verify_model_signature(path: Path, model_pubkey: str) -> None:
    if not path.is_dir():
        raise CtfsError("--model-pubkey checks a model directory, and PATH is a single file")
    from ctfs.files.modelsig import SIGNATURE_NAME, verify_directory

    manifest = verify_directory(path, model_pubkey)
    click.echo(f"verified {SIGNATURE_NAME}: the directory holds exactly its {len(manifest.paths)} signed file(s)")


def _key_options_given() -> bool:
    params = click.get_current_context().params
    return any(params.get(name) for name in ("keys", "trust", "key_command", "allow_jku"))


# -- the mount ---------------------------------------------------------------------------------------

def _mount_options(func):
    """Every MountConfig option as a flag of the same name, showing the config's default."""
    options = [
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                     help="TOML file with the mount options; flags given here override it."),
        click.option("--cache-size", default=f"{MountConfig.cache_size // MiB}M", show_default=True,
                     help="Bytes of decrypted chunks kept in memory, e.g. 512M."),
        click.option("--memory-budget", show_default="0: none",
                     help="Bytes of whole decrypted files the kernel reads from memory itself (FUSE "
                          "passthrough), e.g. 16G; 0 serves every file through the chunk cache."),
        click.option("--verify", type=click.Choice(VERIFY_MODES), default=MountConfig.verify, show_default=True,
                     help="full: check every tag at a file's first open (safe for mmap readers)."),
        click.option("--allow-plain", is_flag=True, help="Serve unencrypted safetensors files too."),
        click.option("--allow-other", is_flag=True, help="Let other users read the mount."),
        click.option("--follow", multiple=True,
                     help="Directory that symlinks in the source may point into (repeatable); e.g. a Hugging "
                          "Face cache's models--ORG--NAME when SOURCE is one of its snapshots."),
        model_pubkey_option,
        click.option("--policy", help="Operator Rego policy applied on top of each file's own."),
        click.option("--labels", "--label", "labels", multiple=True,
                     help="KEY=VALUE fact about this host for policies (repeatable)."),
        click.option("--audit-log", help="File for one JSON line per access decision, or 'journal'."),
        click.option("--hide-denied", is_flag=True, help="Do not list files the policy denies to the reader."),
        click.option("--policy-cache-ttl", type=float, default=MountConfig.policy_cache_ttl, show_default=True,
                     help="Seconds a policy decision is reused."),
        click.option("--log-level", type=click.Choice(LOG_LEVELS), default=MountConfig.log_level, show_default=True,
                     help="Least severe daemon message that is logged."),
        click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (for services)."),
        click.option("--log-file", show_default="/var/log/ctfs/MOUNTPOINT.log as root, else under $XDG_STATE_HOME/ctfs",
                     help="Where a background mount's daemon logs (a foreground one logs to stderr)."),
        click.option("--strict", is_flag=True,
                     help="Refuse to mount when the keys cannot open some encrypted file, instead of warning."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@click.argument("source", required=False)
@click.argument("mountpoint", required=False)
@with_key_options()
@_mount_options
@reports_errors
def mount(source, mountpoint, config_file, key_options, labels, **flags) -> None:
    """Serve the encrypted model directory SOURCE as plain safetensors at MOUNTPOINT."""
    from ctfs.daemon.config import config_from_options, default_log_file, load_config

    options = dict(flags, **vars(key_options), labels=dict(_split_label(l) for l in labels))
    # Only flags given on the command line: a default must not hide the TOML file's value.
    given = click.get_current_context().get_parameter_source
    overrides = {name: value for name, value in options.items() if given(name) is not ParameterSource.DEFAULT}
    overrides.update(source=source, mountpoint=mountpoint)
    config = load_config(config_file, overrides) if config_file else config_from_options(overrides)
    if config.foreground:
        from ctfs.daemon.lifecycle import run_foreground

        run_foreground(config)
        return
    from ctfs.daemon.lifecycle import start_background

    log_file = config.log_file or default_log_file(config.mountpoint)
    argv = [sys.executable, "-m", "ctfs", *sys.argv[1:], "--foreground"]
    start_background(argv, config.mountpoint, log_file)
    click.echo(f"ctfs: serving {config.source} at {config.mountpoint} (log: {log_file})")


def _split_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CtfsError(f"--label needs KEY=VALUE, got {text!r}")
    return key, value


@main.command()
@click.argument("mountpoint", required=False)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Take the mount point from this mount configuration.")
@click.option("--stale", is_flag=True, help="Only remove a dead mount left by a killed daemon; never fail.")
@click.option("--lazy", is_flag=True, help="Detach now even if busy; the mount goes once unused.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the daemon to exit.")
@reports_errors
def umount(mountpoint, config_file, stale, lazy, timeout) -> None:
    """Unmount a ctfs mount and wait for its daemon to exit."""
    from ctfs.daemon import mountpoint as mp

    if config_file:
        from ctfs.daemon.config import load_config

        mountpoint = load_config(config_file).mountpoint
    if not mountpoint:
        raise CtfsError("give MOUNTPOINT or --config")
    if stale:
        try:
            mp.clean_stale(mountpoint)
        except (CtfsError, OSError) as exc:
            click.echo(f"ctfs: warning: {exc}", err=True)
        return
    entry = mp.mount_entry(mountpoint)
    if entry is None:
        raise CtfsError(f"{mountpoint} is not mounted")
    if not mp.is_ctfs(entry):
        raise CtfsError(f"{mountpoint} is not a ctfs mount ({entry['fstype']} from {entry['source']}); "
                        "ctfs umount leaves it alone")
    pid = mp.ask_daemon_pid(mountpoint, timeout)
    mp.unmount(mountpoint, lazy=lazy)
    if pid is not None and not lazy and not mp.wait_for_exit(pid, timeout):
        raise CtfsError(f"unmounted, but daemon {pid} did not exit within {timeout:g} s")


@main.command()
@click.argument("mountpoint")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the daemon to answer.")
@reports_errors
def reload(mountpoint, timeout) -> None:
    """Make a running mount re-read its keys and operator policy (same as SIGHUP to its daemon)."""
    import signal

    from ctfs.daemon.mountpoint import ask_daemon_pid

    pid = ask_daemon_pid(mountpoint, timeout)
    if pid is None:
        raise CtfsError(f"{mountpoint} is not served by a ctfs daemon")
    os.kill(pid, signal.SIGHUP)
    click.echo(f"asked daemon {pid} to reload its keys and policy")


# -- policy and audit --------------------------------------------------------------------------------

@main.group()
def policy() -> None:
    """Work with access policies offline."""


@policy.command("test")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="JSON input document (the schema the daemon builds; see docs/policy.md).")
@reports_errors
def policy_test(file, input_file) -> None:
    """Evaluate FILE (a .rego policy, or the policy embedded in an encrypted file) against an input.
    Exits 0 if allowed, 1 if denied."""
    from ctfs.policy import gate

    try:
        input_doc = json.loads(Path(input_file).read_text("utf-8"))
    except ValueError as exc:
        raise CtfsError(f"{input_file}: not valid JSON ({exc})") from None
    decision = gate.test_policy_file(file, input_doc, embedded_policy_of=_embedded_policy)
    click.echo(f"{'allow' if decision.allowed else 'deny'}: {decision.reason}")
    sys.exit(0 if decision.allowed else 1)


def _embedded_policy(path: str) -> str | None:
    return describe(Path(path), None).get("policy")


@main.command()
@click.argument("log", default="-")
@click.option("--deny", "only_denied", is_flag=True, help="Only denied opens.")
@click.option("--uid", type=int, help="Only this reader uid.")
@click.option("--file", "file_glob", help="Only files matching this glob (path inside the mount).")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]),
              help="Only decisions at or after this time (local time unless an offset is given).")
@click.option("--json", "as_json", is_flag=True, help="Print the matching records as JSON lines.")
@reports_errors
def audit(log, only_denied, uid, file_glob, since, as_json) -> None:
    """Show access decisions from an audit LOG file (or '-' for stdin, e.g. from journalctl)."""
    from ctfs.policy.audit import filter_records, format_record, read_records

    records = read_records(log)
    for rec in filter_records(records, decision="deny" if only_denied else None, uid=uid,
                              file_glob=file_glob, since=since):
        click.echo(json.dumps(rec, ensure_ascii=False) if as_json else format_record(rec))
    if records.malformed:
        click.echo(f"ctfs: warning: skipped {records.malformed} malformed line(s)", err=True)


# -- keys: the keyring, and rotation ----------------------------------------------------------------

keyring_flag = click.option("--keyring", is_flag=True, required=True, expose_value=False,
                            help="Act on the OS keyring (required: the keyring is the store these commands manage).")


@main.group()
def key() -> None:
    """Keep keys in the OS keyring: for workstations; servers use files, credentials or --key-command."""


@key.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@keyring_flag
@_KEY_OPTIONS["insecure_key_perms"]
@reports_errors
def key_import(file, insecure_key_perms) -> None:
    """Store every key of a JWK or JWK Set FILE in the keyring, one entry per kid."""
    from ctfs.keys.jwk import load_key_file
    from ctfs.keys.keyring_store import import_keys, usable_backend

    kids = import_keys(usable_backend(), load_key_file(file, check_perms=not insecure_key_perms))
    click.echo(f"imported {len(kids)} key(s) into the keyring: {', '.join(kids)}")


@key.command("list")
@keyring_flag
@reports_errors
def key_list() -> None:
    """List the keys in the keyring: kid, type and algorithm, never the key."""
    from ctfs.keys.keyring_store import list_keys, usable_backend

    for kid, stored in list_keys(usable_backend()):
        if stored is None:
            click.echo(f"{kid}\t(entry missing)")
        elif isinstance(stored, EncryptionKey):
            click.echo(f"{kid}\toct\t{stored.alg}")
        else:
            click.echo(f"{kid}\tokp\ted25519\t{'private' if stored.seed else 'public'}")


@key.command("delete")
@click.argument("kid")
@keyring_flag
@reports_errors
def key_delete(kid) -> None:
    """Remove the key KID from the keyring."""
    from ctfs.keys.keyring_store import delete_key, usable_backend

    delete_key(usable_backend(), kid)
    click.echo(f"deleted {kid} from the keyring")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--new-keys", multiple=True, required=True,
              help="The new master key and signing key (with 'd'): file or directory (repeatable).")
@with_key_options()
@reports_errors
def rewrap(path, new_keys, key_options) -> None:
    """Rotate keys of a file or model directory in place: data keys re-wrapped, headers re-signed,
    tensor bytes untouched. Each file is replaced atomically; an interrupted run can be repeated."""
    from ctfs.files.rewrap import REWRAPPED, rewrap_path

    chain = key_options.chain()
    new = KeyStore(load_key_paths(new_keys, check_perms=not key_options.insecure_key_perms))
    # Refuse incomplete new keys before touching any file.
    new.first_encryption_key()
    new.signing_key()
    done = []

    def report(file: Path, outcome: str) -> None:
        done.append(outcome)
        click.echo(f"{file}: {outcome}")

    rewrap_path(path, chain, new, report)
    click.echo(f"rewrapped {done.count(REWRAPPED)} of {len(done)} file(s)")


if __name__ == "__main__":
    main()
