"""The `target_group` section of agent.yaml: the api-server's load balancer target group.

Pure (stdlib only) so agent.config can import it. `check_target_group` holds the section's own
checks; agent.config reports the (key, why) it returns like any other key. The section is read
by agent.platform.target_group, which takes an api-server out of rotation around a restart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

# arn:<partition>:elasticloadbalancing:<region>:<account>:targetgroup/<name>/<id>
TARGET_GROUP_ARN = re.compile(
    r"^arn:aws[a-z-]*:elasticloadbalancing:[a-z0-9-]+:\d{12}:targetgroup/[A-Za-z0-9-]{1,32}"
    r"/[0-9a-f]+$"
)


@dataclass
class TargetGroupConfig:
    # the target group this api-server is registered in; null: no load balancer, a restart
    # happens in place
    arn: Optional[str] = None
    # how long to wait for the load balancer to drain this instance (at least the target
    # group's deregistration delay) before the restart goes on anyway
    deregister_timeout: float = 120.0
    # how long the registered-again instance may take to be reported healthy (the restart, then
    # HealthyThresholdCount health checks)
    register_timeout: float = 300.0
    # seconds between DescribeTargetHealth calls while waiting
    poll_interval: float = 2.0


def check_target_group(tg: TargetGroupConfig) -> Optional[Tuple[str, str]]:
    """(dotted key, why) for the first bad key of the section, else None."""
    if tg.arn is not None and not TARGET_GROUP_ARN.match(tg.arn):
        return "target_group.arn", f"must be a target group's ARN, got {tg.arn!r}"
    for key in ("deregister_timeout", "register_timeout", "poll_interval"):
        value = getattr(tg, key)
        if not value > 0:
            return f"target_group.{key}", f"must be positive, got {value}"
    return None
