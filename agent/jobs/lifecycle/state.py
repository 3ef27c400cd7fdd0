"""The lifecycle document (`lifecycle.json`): everything `lifecycle watch` knows between polls.

Fields (see agent/jobs/lifecycle/watch.py for how they change): `phase` (idle | draining |
done), `event` (the current or last event), `handled` (event keys already acted on),
`target_lifecycle_state`, `last_poll` (the last poll that read at least one fact),
`poll_errors` ({IMDS path: why it could not be read} at the last poll) and `last_poll_error`
(the same, as one line), `last_pass_error` (a loop pass that failed), `drain`,
`lifecycle_action`, `protection`, and `summary` (the same line as systemd's STATUS=).
Tasks in `drain` are in agent.worker.tasks.safe_task's form: never their arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from agent.state import StateDoc, register


@dataclass
class LifecycleDoc(StateDoc):
    name: ClassVar[str] = "lifecycle"
    version: ClassVar[int] = 1

    phase: str = "idle"
    event: Optional[Dict[str, Any]] = None
    handled: List[str] = field(default_factory=list)
    target_lifecycle_state: Optional[str] = None
    last_poll: Optional[float] = None
    last_poll_error: Optional[str] = None
    poll_errors: Optional[Dict[str, str]] = None
    last_pass_error: Optional[str] = None
    drain: Optional[Dict[str, Any]] = None
    lifecycle_action: Optional[Dict[str, Any]] = None
    protection: Optional[Dict[str, Any]] = None
    summary: Optional[str] = None


def status_detail(doc: Dict[str, Any]) -> str:
    """What the human `status` line adds: the lifecycle hook's heartbeats, when there is one,
    and why the last poll or pass failed (a watcher that cannot read IMDS sees no termination
    notice: that must show, not only in the journal)."""
    out = ""
    action = doc.get("lifecycle_action")
    if isinstance(action, dict) and action.get("hook"):
        out += (
            f" heartbeats={action.get('heartbeats_sent', 0)}"
            f" completed={bool(action.get('completed'))}"
        )
    if doc.get("last_poll_error"):
        out += f"; last poll failed: {doc['last_poll_error']}"
    if doc.get("last_pass_error"):
        out += f"; last pass failed: {doc['last_pass_error']}"
    return out


register(
    LifecycleDoc,
    status_key="lifecycle",
    shown=("summary", "phase", "target_lifecycle_state", "last_poll"),
    detail=status_detail,
)
