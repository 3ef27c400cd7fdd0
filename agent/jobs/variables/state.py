"""The variables documents: `variables.json` (the summary `status` shows and the VersionId
last synced completely), `variables-hashes.json` (a keyed hash per key known to be in
Airflow; never values) and `variables-watch.json` (the watch daemon's counters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple

from agent.state import StateDoc, register


@dataclass
class VariablesDoc(StateDoc):
    name: ClassVar[str] = "variables"
    version: ClassVar[int] = 1
    failure_fields: ClassVar[Optional[Tuple[str, str, str]]] = (
        "last_run_at",
        "last_result",
        "last_error",
    )

    secret_id: Optional[str] = None
    version_id: Optional[str] = None  # the last version synced completely
    synced_at: Optional[float] = None
    counts: Dict[str, int] = field(default_factory=dict)  # of the last complete sync
    last_run_at: Optional[float] = None
    last_result: Optional[str] = None  # ok | unchanged | failed | refused | interrupted
    last_error: Optional[str] = None
    last_counts: Dict[str, int] = field(default_factory=dict)  # of the last run
    not_pruned: List[str] = field(default_factory=list)  # left the secret, still in Airflow


@dataclass
class VariablesHashesDoc(StateDoc):
    name: ClassVar[str] = "variables-hashes"
    version: ClassVar[int] = 1

    hashes: Dict[str, str] = field(default_factory=dict)  # key -> keyed hash of what landed


@dataclass
class VariablesWatchDoc(StateDoc):
    name: ClassVar[str] = "variables-watch"
    version: ClassVar[int] = 1

    status: Optional[str] = None  # the STATUS= line
    polls: int = 0
    syncs: int = 0
    failures: int = 0
    last_sync_seconds: Optional[float] = None
    last_poll_at: Optional[float] = None
    interval: Optional[float] = None
    bridge_pid: Optional[int] = None
    bridge_starts: int = 0
    bridge_requests: int = 0


register(
    VariablesDoc,
    status_key="variables",
    shown=("last_result", "version_id", "synced_at", "counts", "last_error", "not_pruned"),
)
register(VariablesHashesDoc)
register(
    VariablesWatchDoc,
    status_key="variables_watch",
    title="vars watch",
    shown=("status", "last_poll_at", "bridge_pid", "bridge_starts"),
    optional=True,
)
