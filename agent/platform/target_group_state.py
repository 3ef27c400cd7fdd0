"""The target group document (`target-group.json`): is this api-server out of rotation now?

agent.platform.target_group writes it when it deregisters the instance and again when it has
registered it back, so a run that died in between (a CodeDeploy hook killed at its timeout, a
reboot) is seen by the next one, which registers the instance again before anything else: it
never stays out of the target group silently. `status` shows the last result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from agent.state import StateDoc, register


@dataclass
class TargetGroupDoc(StateDoc):
    name: ClassVar[str] = "target-group"
    version: ClassVar[int] = 1

    target_group_arn: Optional[str] = None
    instance_id: Optional[str] = None
    ports: List[int] = field(default_factory=list)  # the ports it was deregistered from
    out_since: Optional[float] = None  # epoch seconds; None: not left out by this agent
    last_result: Optional[str] = None  # out | registered | healthy | unhealthy | registered again
    last_reason: Optional[str] = None
    last_change: Optional[float] = None


register(
    TargetGroupDoc,
    status_key="target_group",
    title="target group",
    shown=("last_result", "out_since"),
    optional=True,
)
