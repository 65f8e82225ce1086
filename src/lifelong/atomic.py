"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Each writer builds the full content first, writes it to a temporary file in the target's directory
(same filesystem, so the rename is atomic), flushes and fsyncs it, then ``os.replace``s it over the
target. On any error the temporary file is removed and the previous file is left untouched.
Parent directories are created. Every writer returns the target as a ``Path``.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Keeps the permission bits of a file it replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # 0o666 masked by the umask, like open(path, "w"); tempfile.mkstemp would force 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically.

    Serialization happens before any file is touched: an object json cannot encode raises
    ``TypeError`` and leaves the previous file as it was. ``default`` is passed to ``json.dumps``
    (e.g. ``default=str``). NaN and infinities are written as ``NaN``/``Infinity``, which Python's
    json reads back (metrics are NaN where they are undefined).
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
