"""create_in_aws's creator for the worker group's scaling policies (target tracking and step),
plus the group's metrics collection (`enable_metrics_collection`, called by the group's
creator). The alarm that invokes a step policy is sandbox/stack/aws_alarms.py's, as every alarm.

The creator takes (model, aws, logical id, report), creates the policy from its resolved
properties in the embedded AWS and returns what `Ref` gives it (the policy's ARN). moto stores
a policy as given and answers DescribePolicies with it; it evaluates no alarm and runs no
policy: what the policy would do is sandbox/stack/target_tracking.py's, from the same resolved
properties.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List

# the properties PutScalingPolicy takes as they are (CloudFormation and the API share names)
_POLICY_KEYS = (
    "PolicyType",
    "AdjustmentType",
    "MetricAggregationType",
    "TargetTrackingConfiguration",
    "StepAdjustments",
)
_POLICY_INTS = ("EstimatedInstanceWarmup", "MinAdjustmentMagnitude", "ScalingAdjustment")


def enable_metrics_collection(aws, group_name: str, collections: List[Dict[str, Any]]) -> None:
    """A group's MetricsCollection property, as CloudFormation applies it."""
    for item in collections:
        kwargs: Dict[str, Any] = {
            "AutoScalingGroupName": group_name,
            "Granularity": item["Granularity"],
        }
        if item.get("Metrics"):
            kwargs["Metrics"] = list(item["Metrics"])
        aws.client("autoscaling").enable_metrics_collection(**kwargs)


def _step_adjustments(steps: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for step in steps:
        one: Dict[str, Any] = {"ScalingAdjustment": int(step["ScalingAdjustment"])}
        for bound in ("MetricIntervalLowerBound", "MetricIntervalUpperBound"):
            if bound in step:
                one[bound] = float(step[bound])
        out.append(one)
    return out


def _scaling_policy(model, aws, rid, report):
    p = model.properties(rid)
    name = p.get("PolicyName") or model.generated_name(rid, 255)
    kwargs: Dict[str, Any] = {"AutoScalingGroupName": p["AutoScalingGroupName"], "PolicyName": name}
    for key in _POLICY_KEYS:
        if key in p:
            kwargs[key] = copy.deepcopy(p[key])
    for key in _POLICY_INTS:
        if key in p:
            kwargs[key] = int(p[key])
    if "Cooldown" in p:
        kwargs["Cooldown"] = int(p["Cooldown"])
    if "StepAdjustments" in kwargs:
        kwargs["StepAdjustments"] = _step_adjustments(kwargs["StepAdjustments"])
    tt = kwargs.get("TargetTrackingConfiguration")
    if tt is not None:
        tt["TargetValue"] = float(tt["TargetValue"])
    asg = aws.client("autoscaling")
    asg.put_scaling_policy(**kwargs)
    # moto 5.2 answers PutScalingPolicy with `PolicyArn` (the API's is PolicyARN), which
    # boto3 drops: the ARN is read back as DescribePolicies gives it
    (policy,) = asg.describe_policies(
        AutoScalingGroupName=kwargs["AutoScalingGroupName"], PolicyNames=[name]
    )["ScalingPolicies"]
    model.attributes[(rid, "Arn")] = policy["PolicyARN"]
    model.attributes[(rid, "PolicyName")] = name
    report.notes.append((rid, "stored, not run: moto evaluates no alarm and runs no policy"))
    return policy["PolicyARN"]


HANDLERS_SCALING: Dict[str, Callable[..., Any]] = {
    "AWS::AutoScaling::ScalingPolicy": _scaling_policy,
}
