"""The task credentials document (`task-credentials.json`): which role, until when, last run.

Holds no key, secret or token: `status` shows the role and the expiry only.
A failed run is recorded by the job runner in the (when, result, reason) fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

from agent.jobs.task_credentials.plan import summary
from agent.state import StateDoc, register


def _detail(doc: Dict[str, Any]) -> str:
    return ", " + summary(doc)


@dataclass
class TaskCredentialsDoc(StateDoc):
    name: ClassVar[str] = "task-credentials"
    version: ClassVar[int] = 1
    failure_fields: ClassVar[Optional[Tuple[str, str, str]]] = (
        "last_failure",
        "last_result",
        "last_failure_reason",
    )

    role_arn: Optional[str] = None
    expiration: Optional[float] = None  # epoch seconds; the credentials' own end
    last_refresh: Optional[float] = None  # when the role was last assumed
    last_check: Optional[float] = None  # when a run last ended ok (refreshed or still valid)
    last_result: Optional[str] = None  # refreshed | valid | disabled | failed | ...
    last_failure: Optional[float] = None
    last_failure_reason: Optional[str] = None


register(
    TaskCredentialsDoc,
    status_key="task_credentials",
    title="task credentials",
    shown=("last_result",),
    detail=_detail,  # the role and the expiry as a date; --json has every field
    optional=True,
)
