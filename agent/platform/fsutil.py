"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.

A reader (systemd, a unit, another agent run) sees either the old file or the new one, never
a partial or missing file, even when the writer is killed at any instant. `FileLock` makes the
runs of one job take turns (a flock in the state dir, waited for until a deadline, naming its
holder for whoever gives up).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import time
from pathlib import Path
from typing import Callable, Optional, Union

PathLike = Union[str, Path]
_TMP_SUFFIX = ".tmp-agent"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def resolve_owner(owner: Optional[str], group: Optional[str]) -> tuple[int, int]:
    """Names -> ids; -1 keeps the current one. Unknown names raise KeyError naming them."""
    uid = gid = -1
    if owner is not None:
        try:
            uid = pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise KeyError(f"user {owner!r} does not exist") from None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise KeyError(f"group {group!r} does not exist") from None
    return uid, gid


def fsync_dir(directory: PathLike) -> None:
    fd = os.open(str(directory), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: PathLike, data: bytes, mode: int = 0o600, uid: int = -1, gid: int = -1
) -> None:
    """Replace `path` with `data` atomically; mode and owner are set before any byte is written."""
    path = Path(path)
    fd = -1
    tmp = path.parent / f"{_tmp_prefix(path)}{os.getpid()}{_TMP_SUFFIX}"
    try:
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True


def remove_stale_temps(path: PathLike) -> int:
    """Remove temp files a killed writer left beside `path`; returns how many.

    Call it only while holding the lock every writer of `path` holds: then no temp file is
    being written. As a second guard, a temp file whose writer (the PID in its name) is still
    alive is left alone, our own excepted (we are not writing yet).
    """
    path = Path(path)
    prefix = _tmp_prefix(path)
    removed = 0
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        pid = name[len(prefix) : -len(_TMP_SUFFIX)]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        try:
            entry.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def read_bytes_or_none(path: PathLike) -> Optional[bytes]:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


class FileLock:
    """An exclusive flock on `path`, waited for until a deadline: one run of a job at a time."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.fd: Optional[int] = None

    def acquire(
        self,
        until: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> bool:
        """True once held; False when `clock()` reached `until` first (nothing is held then)."""
        self.fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    self.release()
                    raise
            if clock() >= until:
                self.release()
                return False
            sleep(0.2)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def write_holder(self, text: str) -> None:
        """Say who holds the lock (e.g. "pid 123 since ..."), for a waiter that gives up.

        Written into the lock file itself, while held; the lock is the flock, not the content.
        """
        if self.fd is None:
            raise RuntimeError(f"{self.path} is not held")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode("utf-8", "replace")[:200], 0)

    def holder(self) -> str:
        """What the holder wrote with `write_holder`; "" when nothing (or it cannot be read).

        Best effort: read without the lock, so it may name the previous holder for the instant
        between a new holder's flock and its write.
        """
        try:
            with open(self.path, "rb") as f:
                return f.read(200).decode("utf-8", "replace").strip()
        except OSError:
            return ""
