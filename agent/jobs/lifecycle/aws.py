"""Auto Scaling calls of `lifecycle watch` for this instance: find the group and the
termination hook, heartbeat, complete, scale-in protection.

The group comes from agent.yaml, else the `aws:autoscaling:groupName` instance tag (IMDS),
else DescribeAutoScalingInstances; the hook from `lifecycle.hook_name`, else the group's only
EC2_INSTANCE_TERMINATING hook. Calls go by instance id (no lifecycle action token needed).
Retries: the client from agent.platform.aws uses botocore's adaptive mode (throttling backs off and
rate-limits); the watcher adds its own bounded retries on top.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from agent.errors import AgentError
from agent.platform.aws import AwsClients, describe_error
from agent.platform.imds import ImdsClient

COMPLETE_RESULT = "CONTINUE"


class LifecycleAws:
    """The Auto Scaling calls of this daemon, for one instance."""

    def __init__(self, cfg, clients: AwsClients, imds: ImdsClient):
        self.cfg = cfg
        self.clients = clients
        self.imds = imds
        self._instance_id: Optional[str] = None
        self._group: Optional[str] = None

    @property
    def asg(self):
        return self.clients.client("autoscaling")

    def instance_id(self) -> str:
        if self._instance_id is None:
            self._instance_id = self.imds.instance_id()
        return self._instance_id

    def group_name(self) -> str:
        """agent.yaml, else the aws:autoscaling:groupName tag, else DescribeAutoScalingInstances."""
        if self._group:
            return self._group
        group = self.cfg.lifecycle.group_name or self.imds.tag("aws:autoscaling:groupName")
        if not group:
            resp = self.asg.describe_auto_scaling_instances(InstanceIds=[self.instance_id()])
            found = resp.get("AutoScalingInstances") or []
            group = found[0]["AutoScalingGroupName"] if found else None
        if not group:
            raise AgentError(
                f"instance {self.instance_id()} belongs to no Auto Scaling group "
                "(lifecycle.group_name unset, no aws:autoscaling:groupName tag in IMDS, "
                "DescribeAutoScalingInstances empty)"
            )
        self._group = group
        return group

    def hook(self) -> tuple[str, float]:
        """(hook name, HeartbeatTimeout) of the group's termination hook."""
        group = self.group_name()
        name = self.cfg.lifecycle.hook_name
        kwargs: Dict[str, Any] = {"AutoScalingGroupName": group}
        if name:
            kwargs["LifecycleHookNames"] = [name]
        hooks = self.asg.describe_lifecycle_hooks(**kwargs).get("LifecycleHooks") or []
        if not name:
            hooks = [
                h
                for h in hooks
                if h.get("LifecycleTransition") == "autoscaling:EC2_INSTANCE_TERMINATING"
            ]
            if len(hooks) != 1:
                raise AgentError(
                    f"lifecycle.hook_name is unset and group {group} has {len(hooks)} "
                    "termination hooks; set lifecycle.hook_name"
                )
        if not hooks:
            raise AgentError(f"group {group} has no lifecycle hook named {name!r}")
        hook = hooks[0]
        return hook["LifecycleHookName"], float(hook.get("HeartbeatTimeout") or 3600)

    def heartbeat(self, hook: str) -> None:
        self.asg.record_lifecycle_action_heartbeat(
            LifecycleHookName=hook,
            AutoScalingGroupName=self.group_name(),
            InstanceId=self.instance_id(),
        )

    def complete(self, hook: str) -> None:
        self.asg.complete_lifecycle_action(
            LifecycleHookName=hook,
            AutoScalingGroupName=self.group_name(),
            InstanceId=self.instance_id(),
            LifecycleActionResult=COMPLETE_RESULT,
        )

    def set_protection(self, protected: bool) -> None:
        self.asg.set_instance_protection(
            InstanceIds=[self.instance_id()],
            AutoScalingGroupName=self.group_name(),
            ProtectedFromScaleIn=protected,
        )


def no_active_action(exc: BaseException) -> bool:
    """Auto Scaling's answer when the wait is already over (completed before, or timed out)."""
    text = describe_error(exc)
    return text.startswith("ValidationError") and "No active Lifecycle Action" in text
