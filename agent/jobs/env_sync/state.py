"""The env sync document (`env.json`): the last sync's result and what it wrote.

`status` compares `file_sha256` with the env file on disk (changed since the last sync?).
A failed run is recorded by the job runner in the (when, result, reason) fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

from agent.state import StateDoc, register


@dataclass
class EnvDoc(StateDoc):
    name: ClassVar[str] = "env"
    version: ClassVar[int] = 1
    failure_fields: ClassVar[Optional[Tuple[str, str, str]]] = (
        "last_failure",
        "last_sync_result",
        "last_failure_reason",
    )

    last_sync: Optional[float] = None  # when a sync last succeeded (wrote or found it equal)
    last_sync_result: Optional[str] = None  # ok | failed | refused | timeout | interrupted
    file_sha256: Optional[str] = None  # sha256 of the file the last successful sync wrote
    variables: Optional[int] = None  # how many variables it holds
    last_failure: Optional[float] = None
    last_failure_reason: Optional[str] = None


register(EnvDoc, status_key="env", title="env sync")
