"""Writing result files safely: a reader never sees a half-written file."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Union


def fsync_dir(folder: Union[str, os.PathLike]) -> None:
    """Make a rename inside ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync folders; the rename itself is still atomic
    finally:
        os.close(fd)


def write_atomic(path: Union[str, os.PathLike], data: Union[str, bytes], encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically; returns the path.

    The data goes to a temporary file in the same folder, is flushed and fsynced, and
    then replaces ``path`` with :func:`os.replace` (the folder is fsynced too): an interrupted
    write or a full disk leaves the old file (or none), never a truncated one, and no
    temporary file. The folder must exist.
    """
    path = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never reuse someone else's file; mode 0o666 minus the umask, like open(path, "w")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


__all__ = ["write_atomic", "fsync_dir"]
