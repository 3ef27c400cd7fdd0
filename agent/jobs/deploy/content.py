"""What a deployment changed, by category, and whether the scheduler/webserver units must restart.

Airflow 3's api-server and scheduler do not read DAG files (the dag-processor parses them and
notices new ones by itself), so a DAG-only deployment must leave those roles' units running:
restarting the api-server takes the execution API away from every running task. A bundle
that changes what they do load must restart them. The installed tree (AIRFLOW_HOME) is hashed
per category (`categorize` is the table):

| category       | files                                                  | restarts units |
|----------------|--------------------------------------------------------|----------------|
| `dags`         | dags/**                                                | no             |
| `plugins`      | plugins/**                                             | yes            |
| `config`       | airflow.cfg, webserver_config.py, airflow_local_settings.py, config/** | yes |
| `requirements` | requirements*.txt, constraints*.txt at the top         | yes            |

Not hashed: CodeDeploy's own files (appspec.yml, hooks/), logs/, the revision marker, every
`__pycache__` and `*.pyc`, and anything else at the top (say include/ SQL files: read by
tasks when they run, not loaded by a long-running process). A symlink counts by its name
(it is never followed: root reads this tree, which the airflow user controls).

What a running unit loaded is known from the record the deploy hook keeps per unit (its
MainPID and the hashes when it last started it); a unit with another MainPID since (restarted
by confapply, a reboot, by hand) loaded the tree as it was before this deployment's install
(BeforeInstall's snapshot: between deployments the tree does not change); without either,
what it loaded is unknown and it restarts.
"""

from __future__ import annotations

import hashlib
import os
import stat as st_mod
from pathlib import Path
from typing import Dict, List, Optional

from agent.platform import safe_tree

CATEGORIES = ("dags", "plugins", "config", "requirements")
RESTART_CATEGORIES = ("plugins", "config", "requirements")
_CONFIG_FILES = ("airflow.cfg", "webserver_config.py", "airflow_local_settings.py")
_SKIP_DIRS = ("__pycache__",)

Hashes = Dict[str, str]


def categorize(rel: str) -> Optional[str]:
    """The category of a path relative to AIRFLOW_HOME, or None when it is not hashed (pure)."""
    parts = rel.split("/")
    if any(p in _SKIP_DIRS for p in parts) or rel.endswith(".pyc"):
        return None
    top = parts[0]
    if top in ("dags", "plugins"):
        return top if len(parts) > 1 else None
    if top == "config":
        return "config" if len(parts) > 1 else None
    if len(parts) == 1:
        if top in _CONFIG_FILES:
            return "config"
        if top.endswith(".txt") and top.startswith(("requirements", "constraints")):
            return "requirements"
    return None


def changed_categories(loaded: Optional[Hashes], now: Hashes) -> List[str]:
    """The restart categories whose content differs from what a unit loaded; all of them that
    hold anything when what it loaded is unknown (pure)."""
    if loaded is None:
        return [c for c in RESTART_CATEGORIES if now.get(c) != empty_hash()]
    return [c for c in RESTART_CATEGORIES if loaded.get(c) != now.get(c)]


def describe_changes(before: Optional[Hashes], now: Hashes) -> str:
    """`plugins 1a2b3c4d -> 5e6f7a8b, dags ...` for the log, or `nothing` (pure)."""
    if before is None:
        return "unknown (no snapshot of the tree before the install)"
    parts = [
        f"{c} {before.get(c, '-')[:8]} -> {now.get(c, '-')[:8]}"
        for c in CATEGORIES
        if before.get(c) != now.get(c)
    ]
    return ", ".join(parts) or "nothing"


def empty_hash() -> str:
    return hashlib.sha256(b"").hexdigest()


def tree_hashes(home: Path) -> Hashes:
    """{category: sha256 over its files' (relative path, content digest)} of the tree now.

    Read through directory descriptors (agent.platform.safe_tree): nothing below `home` is
    resolved by name, no symlink followed, no other filesystem entered. A missing home is an
    empty tree (the first deployment's BeforeInstall)."""
    files: Dict[str, List[bytes]] = {c: [] for c in CATEGORIES}
    if os.path.lexists(home):
        tree = safe_tree.Tree(str(home))
        for rel, dir_fd, _, entries in tree.walk():
            # prune what is never hashed (logs/ can be large): only dags, plugins, config
            for entry in list(entries):
                child = safe_tree.join(rel, entry.name)
                if entry.is_dir and not _may_hold_hashed(child):
                    entries.remove(entry)
                    continue
                if entry.is_dir:
                    continue
                category = categorize(child)
                if category is not None and st_mod.S_ISREG(entry.st.st_mode):
                    digest = _file_digest(dir_fd, entry)
                    files[category].append(child.encode() + b"\0" + digest.encode())
        for rel, why in tree.skipped:
            category = categorize(rel)
            if why == safe_tree.SKIP_SYMLINK and category is not None:
                files[category].append(rel.encode() + b"\0symlink")
    return {c: _combine(entries) for c, entries in files.items()}


def _may_hold_hashed(rel: str) -> bool:
    parts = rel.split("/")
    return parts[0] in ("dags", "plugins", "config") and "__pycache__" not in parts


def _file_digest(dir_fd: int, entry: safe_tree.Entry) -> str:
    """sha256 of one regular file, opened relative to its directory without following a
    symlink; a file that vanished or changed kind since the listing counts as `changed`."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(entry.name, flags, dir_fd=dir_fd)
    except OSError:
        return "changed"
    try:
        if not st_mod.S_ISREG(os.fstat(fd).st_mode):
            return "changed"
        h = hashlib.sha256()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
    finally:
        os.close(fd)


def _combine(entries: List[bytes]) -> str:
    h = hashlib.sha256()
    for item in sorted(entries):
        h.update(item + b"\n")
    return h.hexdigest()
