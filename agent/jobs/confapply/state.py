"""confapply's persistent view: the document (`confapply.json`: the content hash last applied
and how the last apply went) and the content hash of the watched files now.

Shared by the confapply daemon and `status` (which compares the two), so neither imports the
other's internals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple

from agent.jobs.confapply.plan import content_hash, watched_files
from agent.state import StateDoc, register


@dataclass
class ConfapplyDoc(StateDoc):
    name: ClassVar[str] = "confapply"
    version: ClassVar[int] = 1
    failure_fields: ClassVar[Optional[Tuple[str, str, str]]] = (
        "last_attempt",
        "last_result",
        "last_error",
    )

    applied_hash: Optional[str] = None  # content hash of the last complete apply
    applied_at: Optional[float] = None
    role: Optional[str] = None
    units: List[str] = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    last_result: Optional[str] = None  # ok | failed
    last_error: Optional[str] = None
    last_attempt: Optional[float] = None
    pending_hash: Optional[str] = None  # the hash a failed apply was for
    last_restarted: List[str] = field(default_factory=list)
    last_skipped: List[str] = field(default_factory=list)
    # worker unit -> its MainPID when the worker's record kept confapply from restarting it
    held_pids: Dict[str, int] = field(default_factory=dict)


# status shows it as the "config hash" line (applied vs now), not as a document line
register(ConfapplyDoc)


def watched_paths(cfg) -> List[str]:
    """The files confapply watches (env file first), as absolute paths."""
    return [os.path.abspath(f) for f in watched_files(cfg.env.file, cfg.confapply.watch)]


def read_contents(files: List[str]) -> List[Tuple[str, Optional[bytes]]]:
    """(path, bytes) per file; None for a missing file (OSError otherwise propagates)."""
    out: List[Tuple[str, Optional[bytes]]] = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                out.append((f, fh.read()))
        except FileNotFoundError:
            out.append((f, None))
    return out


def current_hash(cfg) -> str:
    """The content hash of the watched files now."""
    return content_hash(read_contents(watched_paths(cfg)))
