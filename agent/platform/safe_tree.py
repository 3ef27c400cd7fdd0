"""Walk, chown and prune a directory tree that another user can change while root walks it.

Root's deploy hooks work inside AIRFLOW_HOME, which the `airflow` user owns: any task can
rename a directory and put a symlink in its place between root listing a name and root using
it. A walk by path names re-resolves every component on each call and follows such a symlink
out of the tree (`chown -R` by names has chowned /etc/shadow this way). This module never
resolves a path below the root:

- the root is opened with O_DIRECTORY|O_NOFOLLOW; every subdirectory is opened relative to its
  parent's descriptor with O_NOFOLLOW, and its fstat must match the (device, inode) the listing
  saw, else it is skipped ("changed during the walk");
- a directory on another device than the root (a mount point) is never entered;
- symlinks are never followed and never chowned: a symlink's owner means nothing for following
  it outside sticky world-writable directories, and chowning a symlink by name cannot be made
  race-free from Python (the name may be swapped for a hard link between the check and the
  call); the walk leaves them as they are and counts them;
- other files are opened (O_NOFOLLOW|O_NONBLOCK|O_NOCTTY, never a device) and chowned through
  that descriptor after fstat confirms the listed inode; a file with more than one link is
  left alone, as its other name may be outside the tree (a hard link to /etc/shadow);
- removal (`remove_at`) unlinks names relative to verified directory descriptors;
- `open_below` + `replace_at` write one file below the root without following a symlink on
  the way or at the name.

Everything refused is recorded in `Tree.skipped` as (relative path, reason) for the caller's
log; nothing here raises for a name that changed under it, only for a root that is not a
directory (or is a symlink).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as st_mod
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in must not block the open; O_NOCTTY: a tty never becomes ours
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# where a name moved, vanished or became something else between listing and use
_RACE_ERRNOS = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO)

SKIP_SYMLINK = "symlink, not followed"
SKIP_DEVICE = "on another filesystem, not crossed"
SKIP_CHANGED = "changed during the walk"
SKIP_LINKS = "has other hard links, left alone"
SKIP_SPECIAL = "device node, left alone"


def lstat_at(name: str, dir_fd: int) -> os.stat_result:
    """The entry `name` of the directory `dir_fd` itself (a symlink is not followed)."""
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


@dataclass
class Entry:
    name: str
    st: os.stat_result

    @property
    def is_dir(self) -> bool:
        return st_mod.S_ISDIR(self.st.st_mode)

    @property
    def is_symlink(self) -> bool:
        return st_mod.S_ISLNK(self.st.st_mode)


@dataclass
class Tree:
    """One walk of the tree at `root` (a path whose parents root controls).

    `lstat` and `fstat` are injectable so tests can show a different device or inode."""

    root: str
    lstat: Callable[[str, int], os.stat_result] = lstat_at
    fstat: Callable[[int], os.stat_result] = os.fstat
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    symlinks: int = 0

    def open_root(self) -> Tuple[int, os.stat_result]:
        """The root's descriptor and stat; OSError (ELOOP for a symlink) if it is no directory."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            return fd, self.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def skip(self, rel: str, reason: str) -> None:
        if reason == SKIP_SYMLINK:
            self.symlinks += 1
        self.skipped.append((rel, reason))

    def list(self, dir_fd: int, rel: str) -> List[Entry]:
        out = []
        for name in os.listdir(dir_fd):
            try:
                out.append(Entry(name, self.lstat(name, dir_fd)))
            except OSError as exc:
                if exc.errno not in _RACE_ERRNOS:
                    raise
                self.skip(join(rel, name), SKIP_CHANGED)
        return out

    def open_dir(self, parent_fd: int, entry: Entry, rel: str, dev: int) -> int:
        """The descriptor of subdirectory `entry` of `parent_fd`, or -1 (recorded as skipped)
        when it is on another device or is no longer the directory the listing saw."""
        if entry.st.st_dev != dev:
            self.skip(rel, SKIP_DEVICE)
            return -1
        try:
            fd = os.open(entry.name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno not in _RACE_ERRNOS:
                raise
            self.skip(rel, SKIP_CHANGED)
            return -1
        now = self.fstat(fd)
        if (now.st_dev, now.st_ino) != (entry.st.st_dev, entry.st.st_ino) or now.st_dev != dev:
            os.close(fd)
            self.skip(rel, SKIP_CHANGED if now.st_dev == dev else SKIP_DEVICE)
            return -1
        return fd

    def walk(
        self, start: Optional[Tuple[int, str]] = None
    ) -> Iterator[Tuple[str, int, os.stat_result, List[Entry]]]:
        """Top-down (relative path, dir fd, dir stat, entries) for the root and every directory
        below it on the root's device. The fd is open only during the yield. Symlinks are
        recorded as skipped and left out of `entries`; like os.walk's dirnames, a caller may
        remove directory entries from the list to keep the walk out of them.

        `start`: (fd, relative path) of a directory below the root that the caller opened
        (with `open_dir`) to walk only that part; the walk closes it."""
        if start is None:
            root_fd, root_st = self.open_root()
            rel = ""
        else:
            root_fd, rel = start
            root_st = self.fstat(root_fd)
        dev = root_st.st_dev
        # each frame: (rel, fd, its subdirectories still to enter); closed when done
        stack: List[Tuple[str, int, List[Entry]]] = []
        pending = [(rel, root_fd, root_st)]
        try:
            while pending or stack:
                if pending:
                    rel, fd, dst = pending.pop()
                    try:
                        entries = []
                        for entry in self.list(fd, rel):
                            if entry.is_symlink:
                                self.skip(join(rel, entry.name), SKIP_SYMLINK)
                            else:
                                entries.append(entry)
                        yield rel, fd, dst, entries
                    except BaseException:
                        os.close(fd)
                        raise
                    subdirs = [e for e in entries if e.is_dir]
                    subdirs.reverse()  # popped from the end: listing order
                    stack.append((rel, fd, subdirs))
                    continue
                rel, fd, subdirs = stack[-1]
                if not subdirs:
                    stack.pop()
                    os.close(fd)
                    continue
                entry = subdirs.pop()
                child_rel = join(rel, entry.name)
                child = self.open_dir(fd, entry, child_rel, dev)
                if child != -1:
                    # the owner now, through the descriptor (the listing's may be stale)
                    pending.append((child_rel, child, self.fstat(child)))
        finally:
            for _, fd, _ in pending + stack:
                os.close(fd)

    def chown(self, uid: int, gid: int) -> int:
        """Give every directory and file of the tree to uid:gid; returns how many changed."""
        changed = 0
        for rel, fd, dst, entries in self.walk():
            if (dst.st_uid, dst.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)
                changed += 1
            for entry in entries:
                if entry.is_dir or (entry.st.st_uid, entry.st.st_gid) == (uid, gid):
                    continue  # a directory is chowned when the walk enters it
                changed += self._chown_file(fd, entry, join(rel, entry.name), uid, gid)
        return changed

    def _chown_file(self, dir_fd: int, entry: Entry, rel: str, uid: int, gid: int) -> int:
        mode = entry.st.st_mode
        if st_mod.S_ISCHR(mode) or st_mod.S_ISBLK(mode):
            self.skip(rel, SKIP_SPECIAL)  # opening a device can act on it
            return 0
        if entry.st.st_nlink > 1:
            self.skip(rel, SKIP_LINKS)
            return 0
        try:
            fd = os.open(entry.name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in _RACE_ERRNOS:
                raise
            self.skip(rel, SKIP_CHANGED)
            return 0
        try:
            now = self.fstat(fd)
            if (now.st_dev, now.st_ino) != (entry.st.st_dev, entry.st.st_ino):
                self.skip(rel, SKIP_CHANGED)
                return 0
            if now.st_nlink > 1:  # linked since the listing
                self.skip(rel, SKIP_LINKS)
                return 0
            os.fchown(fd, uid, gid)
            return 1
        finally:
            os.close(fd)

    def remove_at(self, parent_fd: int, entry: Entry, rel: str, dev: int) -> bool:
        """Remove directory `entry` of `parent_fd` and everything in it, never following a
        symlink (one inside is unlinked itself) nor entering another device. False, with the
        reasons in `skipped`, when some of it changed under the walk or was refused."""
        fd = self.open_dir(parent_fd, entry, rel, dev)
        if fd == -1:
            return False
        whole = True
        try:
            for child in self.list(fd, rel):
                child_rel = join(rel, child.name)
                if child.is_dir:
                    whole = self.remove_at(fd, child, child_rel, dev) and whole
                    continue
                try:
                    os.unlink(child.name, dir_fd=fd)  # a symlink or file: its name only
                except OSError as exc:
                    if exc.errno not in _RACE_ERRNOS:
                        raise
                    self.skip(child_rel, SKIP_CHANGED)
                    whole = False
        finally:
            os.close(fd)
        if not whole:
            return False
        try:
            os.rmdir(entry.name, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno not in _RACE_ERRNOS + (errno.ENOTEMPTY, errno.EEXIST):
                raise
            self.skip(rel, SKIP_CHANGED)
            return False
        return True


def open_below(root: str, parts: List[str], make: bool = False) -> int:
    """The descriptor of root/parts[0]/..., each component opened relative to the last with
    O_NOFOLLOW (a symlink anywhere is an OSError, ELOOP or ENOTDIR); `make` creates missing
    directories (0755). The caller closes it."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise ValueError(f"bad path component {part!r} below {root}")
            if make:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def replace_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Replace file `name` of directory `dir_fd` with `data` atomically: a fresh temp file
    (O_EXCL: a planted name or symlink fails it) renamed over `name` (a symlink there is
    replaced, not followed)."""
    tmp = f".{name}.{os.getpid()}.tmp-agent"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def describe_skips(skipped: List[Tuple[str, str]], limit: int = 5) -> str:
    """`a (reason), b (reason) and N more` for one log line."""
    shown = ", ".join(f"{rel} ({why})" for rel, why in skipped[:limit])
    more = len(skipped) - limit
    return shown + (f" and {more} more" if more > 0 else "")
