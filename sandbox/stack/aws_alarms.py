"""create_in_aws's creator for AWS::CloudWatch::Alarm: the template's alarms, made in the
embedded AWS with PutMetricAlarm from their resolved properties (a single metric, or metric
math over `Metrics`), so a launched stack can be asked which alarms it has and on what.

Numbers a parameter gives arrive as strings (as CloudFormation passes them) and are converted
here; an alarm without AlarmName gets the name CloudFormation would generate.
"""

from __future__ import annotations

from typing import Any, Dict

# CloudFormation property -> PutMetricAlarm parameter, for those passed as they are
_SAME = (
    "AlarmDescription",
    "Namespace",
    "MetricName",
    "Dimensions",
    "Statistic",
    "ExtendedStatistic",
    "ComparisonOperator",
    "TreatMissingData",
    "AlarmActions",
    "OKActions",
    "InsufficientDataActions",
    "Unit",
    "ThresholdMetricId",
)
_INTS = ("Period", "EvaluationPeriods", "DatapointsToAlarm")


def _query(q: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(q)
    if "ReturnData" in out:
        out["ReturnData"] = str(out["ReturnData"]).lower() == "true"
    stat = out.get("MetricStat")
    if isinstance(stat, dict) and "Period" in stat:
        out["MetricStat"] = {**stat, "Period": int(stat["Period"])}
    return out


def put_alarm(model, aws, rid, report):
    p = model.properties(rid)
    name = p.get("AlarmName") or model.generated_name(rid, 255)
    kwargs: Dict[str, Any] = {"AlarmName": name}
    kwargs.update({k: p[k] for k in _SAME if k in p})
    kwargs.update({k: int(p[k]) for k in _INTS if k in p})
    if "Threshold" in p:
        kwargs["Threshold"] = float(p["Threshold"])
    if "ActionsEnabled" in p:
        kwargs["ActionsEnabled"] = str(p["ActionsEnabled"]).lower() == "true"
    if "Metrics" in p:
        kwargs["Metrics"] = [_query(q) for q in p["Metrics"]]
    aws.client("cloudwatch").put_metric_alarm(**kwargs)
    model.attributes[(rid, "Arn")] = (
        f"arn:aws:cloudwatch:{model.pseudo['AWS::Region']}:{model.pseudo['AWS::AccountId']}"
        f":alarm:{name}"
    )
    return name
