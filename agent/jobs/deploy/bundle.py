"""The deploy hooks' file operations in AIRFLOW_HOME, which the `airflow` user controls.

Root runs these while any Airflow task may rename, replace or symlink anything under
AIRFLOW_HOME, so both go through agent.platform.safe_tree (directory descriptors, no symlink
followed, no device crossed, every subdirectory checked to be the inode its listing saw):

- `clear_pycache` (BeforeInstall): remove every `__pycache__` under dags/ and plugins/. A
  dags/ or plugins/ that is a symlink (say to a directory outside AIRFLOW_HOME) is not entered;
  the log names what was skipped.
- `write_marker` (ApplicationStart): the revision marker, written below AIRFLOW_HOME through
  descriptors too.
- `chown_tree` (AfterInstall): give AIRFLOW_HOME and everything in it to the deploy owner.
  Symlinks are left as they are (never followed, never chowned: see safe_tree); so are files
  with other hard links and anything that changed while the walk ran; the log counts them.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Iterable, Tuple

from agent.errors import AgentError
from agent.platform import safe_tree
from agent.platform.fsutil import atomic_write

log = logging.getLogger(__name__)


def _open_home(tree: safe_tree.Tree) -> Tuple[int, os.stat_result]:
    try:
        return tree.open_root()
    except FileNotFoundError:
        raise AgentError(f"{tree.root} does not exist: did the install step run?") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise AgentError(f"{tree.root} is not a directory (or is a symlink)") from None
        raise


def _log_skips(tree: safe_tree.Tree, what: str) -> None:
    """Symlinks are normal in a bundle (one line at INFO); anything else skipped is worth a
    WARNING: it changed during the walk, or it is on another filesystem or hard-linked."""
    others = [(rel, why) for rel, why in tree.skipped if why != safe_tree.SKIP_SYMLINK]
    if tree.symlinks:
        log.info("%s: %d symlink(s) left as they are (not followed)", what, tree.symlinks)
    if others:
        log.warning("%s: skipped %s", what, safe_tree.describe_skips(others))


def clear_pycache(home: Path, subdirs: Iterable[str]) -> int:
    """Remove `__pycache__` directories under home/<subdir>; returns how many."""
    tree = safe_tree.Tree(str(home))
    if not os.path.lexists(home):  # the first deployment: nothing installed yet
        return 0
    home_fd, home_st = _open_home(tree)
    removed = 0
    try:
        by_name = {e.name: e for e in tree.list(home_fd, "")}
        for sub in subdirs:
            entry = by_name.get(sub)
            if entry is None:
                continue
            if entry.is_symlink:
                target = _readlink(home_fd, sub)
                log.warning(
                    "%s/%s is a symlink (to %s): not entered, its __pycache__ left alone",
                    home,
                    sub,
                    target,
                )
                continue
            if not entry.is_dir:
                continue
            removed += _clear_under(home_fd, home_st.st_dev, entry, tree)
    finally:
        os.close(home_fd)
    _log_skips(tree, f"clearing __pycache__ under {home}")
    return removed


def _clear_under(home_fd: int, dev: int, entry: safe_tree.Entry, tree: safe_tree.Tree) -> int:
    fd = tree.open_dir(home_fd, entry, entry.name, dev)
    if fd == -1:
        return 0
    removed = 0
    for rel, dir_fd, _, entries in tree.walk(start=(fd, entry.name)):
        for child in list(entries):
            if child.is_dir and child.name == "__pycache__":
                entries.remove(child)  # not walked into: removed whole
                where = safe_tree.join(rel, child.name)
                removed += tree.remove_at(dir_fd, child, where, dev)
    return removed


def _readlink(dir_fd: int, name: str) -> str:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return "?"


def chown_tree(home: Path, uid: int, gid: int) -> int:
    """Give `home` and everything under it on its filesystem to uid:gid; how many changed."""
    tree = safe_tree.Tree(str(home))
    os.close(_open_home(tree)[0])  # a missing home or a symlink: a clear error first
    changed = tree.chown(uid, gid)
    _log_skips(tree, f"chown of {home}")
    return changed


def write_marker(home: Path, marker: Path, data: bytes) -> None:
    """Write the revision marker. Below `home` (the default, /airflow/.deployed-revision)
    every directory on the way is opened without following a symlink, so a task cannot point
    root's write out of AIRFLOW_HOME; elsewhere (a root-owned path) a plain atomic write."""
    try:
        rel = marker.relative_to(home)
    except ValueError:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, data, mode=0o644)
        return
    *parents, name = rel.parts
    try:
        fd = safe_tree.open_below(str(home), parents, make=True)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise AgentError(
                f"{marker}: a directory on the way is a symlink or not a directory; not written"
            ) from None
        raise
    try:
        safe_tree.replace_at(fd, name, data)
    finally:
        os.close(fd)
