"""Atomic file writes: a file under its final name is either the old one or the complete new one, never a fragment.

Every writer of visionkit (weights, Lightning checkpoints, COCO results and metrics JSON, PNGs) goes through
:func:`atomic_write`: the content is written to a temporary file in the destination folder, fsynced, renamed over the
destination with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsynced so that the rename survives a
power cut.

Temporary files are named ``.<name>.<host>-<pid>.<random>.tmp``. A process killed during a write (SIGKILL, OOM, power
cut) leaves its temporary file behind; the next atomic write into the same folder removes every such file whose
writer was on this host and is no longer running (:func:`remove_stale_temporaries`), so nothing accumulates and no
other live writer's file is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "remove_stale_temporaries", "write_json_atomic"]

_TEMPORARY = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$")


def _host_tag() -> str:
    """This host's name reduced to the characters allowed in the temporary-file pattern."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but belongs to someone else, or the platform cannot tell
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``directory``.

    Only files matching visionkit's temporary-file pattern, written on this host by a process that no longer runs,
    are removed.

    Args:
        directory: The folder to clean; a missing folder is not an error.

    Returns:
        The removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    host, removed = _host_tag(), []
    for entry in directory.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] != host or _process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            entry.unlink()
            removed.append(entry)
    return removed


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary path next to ``path``, fsync it, then rename it over ``path``.

    The folder is created if needed. If ``write`` raises (or the process is interrupted), ``path`` keeps its old
    content and the temporary file is removed (or, after a hard kill, by the next atomic write into that folder).

    Args:
        path: Destination file.
        write: Writes the whole content to the path it is given (an empty file already exists there).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}.{_host_tag()}-{os.getpid()}.{secrets.token_hex(6)}.tmp")
    try:
        # O_EXCL: never write through a file or link that someone else put there; 0o666 lets the umask decide the
        # mode, as for a file opened normally (mkstemp would leave it 0o600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        if tmp.stat().st_mode & 0o777 != mode:  # some writers (safetensors) re-create the file as 0o600
            os.chmod(tmp, mode)
        with tmp.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)
    return path


def write_json_atomic(content: Any, path: str | os.PathLike[str], *, indent: int | None = None) -> Path:
    """Write ``content`` as UTF-8 JSON atomically (see :func:`atomic_write`).

    Args:
        content: Anything ``json.dump`` accepts.
        path: Destination file; parent folders are created.
        indent: ``json.dump``'s indent (``None``: compact).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as stream:
            json.dump(content, stream, indent=indent)

    return atomic_write(path, write)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened this way on Windows, where the rename
    # is already as durable as it gets, so that failure is expected and has nothing to report.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
