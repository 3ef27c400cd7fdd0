"""create_in_aws's creators for the worker group's scaling: Auto Scaling policies (target
tracking and step) and the CloudWatch alarms that invoke step policies, plus the group's
metrics collection (`enable_metrics_collection`, called by the group's creator).

Each creator takes (model, aws, logical id, report), creates the resource from its resolved
properties in the embedded AWS and returns what `Ref` gives it (a policy's ARN, an alarm's
name). moto stores a policy and an alarm as given and answers DescribePolicies and
DescribeAlarms with them; it does not evaluate alarms or run policies: what the policy would do
is sandbox/stack/target_tracking.py's, from the same resolved properties.
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


_ALARM_KEYS = (
    "AlarmDescription",
    "ComparisonOperator",
    "TreatMissingData",
    "AlarmActions",
    "OKActions",
    "InsufficientDataActions",
    "Metrics",
    "MetricName",
    "Namespace",
    "Statistic",
    "Dimensions",
    "Unit",
)
_ALARM_INTS = ("EvaluationPeriods", "DatapointsToAlarm", "Period")


def _alarm(model, aws, rid, report):
    p = model.properties(rid)
    name = p.get("AlarmName") or model.generated_name(rid, 255)
    kwargs: Dict[str, Any] = {"AlarmName": name}
    for key in _ALARM_KEYS:
        if key in p:
            kwargs[key] = p[key]
    for key in _ALARM_INTS:
        if key in p:
            kwargs[key] = int(p[key])
    if "Threshold" in p:
        kwargs["Threshold"] = float(p["Threshold"])
    for query in kwargs.get("Metrics", []):
        stat = query.get("MetricStat")
        if stat and "Period" in stat:
            stat["Period"] = int(stat["Period"])
    aws.client("cloudwatch").put_metric_alarm(**kwargs)
    region, account = model.pseudo["AWS::Region"], model.pseudo["AWS::AccountId"]
    model.attributes[(rid, "Arn")] = f"arn:aws:cloudwatch:{region}:{account}:alarm:{name}"
    report.notes.append((rid, "stored, not evaluated: moto's alarms do not change state"))
    return name


HANDLERS_SCALING: Dict[str, Callable[..., Any]] = {
    "AWS::AutoScaling::ScalingPolicy": _scaling_policy,
    "AWS::CloudWatch::Alarm": _alarm,
}
