"""The ledger's storage layer: the manifest, file hashes, the write lock and safe tensor files.

A ledger is a directory holding ``ledger.json`` (the manifest) and the files it lists. Each listed file
is recorded as ``{"path", "sha256", "bytes"}`` and re-hashed before use: a file that is missing,
truncated or modified is refused with ``LedgerCorruptError``, never used. Every write is atomic
(``lifelong.atomic``: temp file, fsync, rename), so a crash leaves the old file or the new one.
One process at a time may change a ledger (``LedgerLock``). Tensors are stored as safetensors;
pickle-based files (``.pt``, ``.pkl``, ...) are read with torch's weights-only unpickler, and full
unpickling, which runs whatever code the file names, happens only when the user passes ``--trust-pickle``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import socket
from datetime import datetime
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from lifelong.atomic import atomic_write_bytes, atomic_write_json
from lifelong.errors import LedgerCorruptError, LedgerError, LedgerLockedError, UnsafeFileError

__all__ = [
    "MANIFEST", "SCHEMA_VERSION", "LedgerLock", "check_file", "file_entry", "load_tensors",
    "read_manifest", "safetensors_metadata", "save_tensors", "sha256_file", "verify", "write_manifest",
]

SCHEMA_VERSION = 1
MANIFEST = "ledger.json"
LOCK_FILE = ".lock"

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # torch.save files: read weights-only
PICKLE_SUFFIXES = (".pkl", ".pickle")  # plain pickles: refused unless trusted
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b"\x80"  # PROTO opcode: how a pickle of protocol >= 2 (legacy torch.save) starts
_RESTORE = "restore it from a backup or a copy of the ledger"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks (patches and models can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(root: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> dict:
    """Record ``root/relpath`` for the manifest: ``{"path", "sha256", "bytes"}``.

    ``path`` stays relative to the ledger, with forward slashes, so a ledger can be moved or copied.
    """
    path = Path(root) / relpath
    return {"path": Path(relpath).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def check_file(root: str | os.PathLike[str], entry: dict) -> Path:
    """Re-hash the file an entry records and return its path; raise ``LedgerCorruptError`` on any mismatch.

    The size is compared before hashing: it is cheap, and "truncated" says more than "hash differs".
    """
    path = Path(root) / entry["path"]
    if not path.is_file():
        raise LedgerCorruptError(f"ledger file {path} is missing (listed in {Path(root) / MANIFEST}); {_RESTORE}.")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise LedgerCorruptError(
            f"ledger file {path} was truncated or extended: {size} bytes, recorded {entry['bytes']}; {_RESTORE}."
        )
    if sha256_file(path) != entry["sha256"]:
        raise LedgerCorruptError(
            f"ledger file {path} was modified after it was recorded (its SHA-256 differs); {_RESTORE}."
        )
    return path


def write_manifest(root: str | os.PathLike[str], manifest: dict) -> None:
    """Stamp ``manifest["schema_version"]`` and write it atomically to ``root/ledger.json``."""
    manifest["schema_version"] = SCHEMA_VERSION
    # schema_version first in the file, so a reader sees at once which format follows.
    atomic_write_json(Path(root) / MANIFEST, {"schema_version": SCHEMA_VERSION, **manifest})


def read_manifest(root: str | os.PathLike[str]) -> dict:
    """Read ``root/ledger.json``; refuse a directory that is not a ledger, bad JSON and unknown schemas."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        why = f"it has no {MANIFEST}" if root.is_dir() else "no such directory"
        raise LedgerError(f"not a ledger: {root} ({why}); {_create_hint(root)}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise LedgerCorruptError(f"{path} is not valid JSON ({e}); {_RESTORE}.") from None
    if not isinstance(manifest, dict):
        raise LedgerCorruptError(f"{path} holds a JSON {type(manifest).__name__}, not an object; {_RESTORE}.")
    version = manifest.get("schema_version")
    if type(version) is not int or version < 1:
        raise LedgerError(
            f"{path} has no valid schema_version (found {version!r}); this lifelong reads schema version "
            f"{SCHEMA_VERSION}. The file was not written by lifelong or was edited by hand: {_RESTORE}."
        )
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"{path} has schema version {version}, but this lifelong supports up to version {SCHEMA_VERSION}; "
            f"upgrade lifelong to read this ledger."
        )
    return manifest


def _create_hint(root: Path) -> str:
    return f"create one with `lifelong init {root} --model NAME`"


def verify(root: str | os.PathLike[str], manifest: dict) -> list[str]:
    """Re-hash every file the manifest lists: ``manifest["files"]`` and each ``changes[i]["files"]``.

    Returns one problem per damaged file, naming it; ``[]`` when every file matches. Files under the
    ledger that no entry lists are not checked: only what the manifest vouches for is ever used.
    """
    entries = list(manifest.get("files", []))
    for change in manifest.get("changes", []):
        entries += change.get("files", [])
    problems, seen = [], set()
    for entry in entries:
        key = (entry["path"], entry["sha256"], entry["bytes"])
        if key in seen:
            continue
        seen.add(key)
        try:
            check_file(root, entry)
        except LedgerCorruptError as e:
            problems.append(str(e))
    return problems


class LedgerLock:
    """The ledger's write lock: ``with LedgerLock(root, command="lifelong learn"): ...``.

    An exclusive ``fcntl.flock`` on ``root/.lock``. The kernel drops a flock when its holder exits,
    however it exits (even SIGKILL), so there are no stale locks to remove by hand. A flock belongs to
    an open file description, so two ``LedgerLock``s in one process conflict as well. The holder writes
    who it is into the file (pid, command, since, host) so that a refused writer can name it; that
    line is information only, the flock is the lock. POSIX only.
    """

    def __init__(self, root: str | os.PathLike[str], command: str = "lifelong"):
        self.root = Path(root)
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> LedgerLock:
        if not self.root.is_dir():
            raise LedgerError(f"not a ledger: {self.root} (no such directory); {_create_hint(self.root)}.")
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise LedgerLockedError(
                f"ledger {self.root} is being changed by another process ({holder}); wait for it to finish. "
                f"The lock is released automatically when that process exits, even if it is killed."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        since = datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "command": self.command, "since": since, "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # nobody holds it now: leave no holder line behind
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _describe_holder(fd: int) -> str:
    """``pid 123, `lifelong learn`, since ...`` from the holder's line in the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        parts = [f"pid {info['pid']}", f"`{info['command']}`", f"since {info['since']}"]
        if info.get("host") not in (None, socket.gethostname()):
            parts.append(f"on host {info['host']}")
        return ", ".join(parts)
    except (ValueError, KeyError, TypeError):
        return "its details are not written yet"  # it took the lock an instant ago


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` atomically as a safetensors file; ``metadata`` (str -> str) goes in its header.

    Tensors are made contiguous (safetensors stores raw buffers). Two entries sharing memory (tied
    weights) are refused by safetensors: store one of them.
    """
    data = safetensors.torch.save({name: t.contiguous() for name, t in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


def load_tensors(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` dict from a safetensors, torch checkpoint or (trusted) pickle file.

    ``.pt .pth .bin .ckpt`` are read with torch's weights-only unpickler (tensors and plain containers);
    a file holding other Python objects, and any ``.pkl``/``.pickle``, needs ``trust_pickle=True``.
    A ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is unwrapped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise LedgerError(f"cannot read tensors from {path}: no such file; check the path.")
    if suffix == ".safetensors":
        try:
            obj = safetensors.torch.load_file(path)
        except safetensors.SafetensorError as e:
            raise _not_safetensors(path, e) from None
    elif suffix in TORCH_SUFFIXES:
        obj = _load_torch_file(path, trust_pickle)
    elif suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise UnsafeFileError(_unsafe_message(path, "is a pickle file"))
        obj = _load_pickle(path)
    else:
        supported = ", ".join((".safetensors",) + TORCH_SUFFIXES + PICKLE_SUFFIXES)
        raise LedgerError(f"cannot read tensors from {path}: unsupported suffix {suffix!r}; use one of {supported}.")
    return _as_tensor_dict(obj, path)


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata in a safetensors file's header; ``{}`` when it has none."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except safetensors.SafetensorError as e:
        raise _not_safetensors(path, e) from None


def _not_safetensors(path, error: Exception) -> LedgerCorruptError:
    return LedgerCorruptError(f"{path} is not a valid safetensors file ({error}); "
                              f"it is truncated or damaged: {_RESTORE}.")


def _unsafe_message(path: Path, what: str) -> str:
    return (
        f"{path} {what}; loading it would run code from the file. If you trust where it came from, "
        f"pass --trust-pickle (or convert it to safetensors)."
    )


def _load_torch_file(path: Path, trust_pickle: bool):
    with open(path, "rb") as f:
        head = f.read(4)
    # Garbage would also fail the weights-only unpickler; say "damaged", not "pass --trust-pickle".
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise LedgerCorruptError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                                 f"it is damaged or misnamed.")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            if not trust_pickle:
                raise UnsafeFileError(_unsafe_message(path, "holds Python objects beyond tensors")) from None
        return torch.load(path, map_location="cpu", weights_only=False)  # the user vouches for the file
    except (RuntimeError, EOFError) as e:  # e.g. a truncated zip archive
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LedgerCorruptError(f"{path} cannot be read as a PyTorch checkpoint ({reason}); "
                                 f"it is truncated or damaged.") from None


def _load_pickle(path: Path):
    """Unrestricted unpickling of a trusted file (torch.load cannot read a plain ``pickle.dump``)."""
    with open(path, "rb") as f:
        if f.read(4) == _ZIP_MAGIC:  # a torch.save file named .pkl
            return torch.load(path, map_location="cpu", weights_only=False)
        f.seek(0)
        try:
            return pickle.load(f)
        except (pickle.UnpicklingError, EOFError) as e:
            raise LedgerCorruptError(f"{path} cannot be unpickled ({e}); it is truncated or damaged.") from None


def _as_tensor_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` and check that a flat str -> Tensor dict is left."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise LedgerError(f"{path} holds a {type(obj).__name__}, not a dict of tensors; "
                          f"save a state_dict (name -> tensor).")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise LedgerError(
                f"{path} is not a flat dict of tensors: entry {name!r} is a {type(value).__name__}; "
                f"save a flat state_dict (name -> tensor)."
            )
    return dict(obj)
