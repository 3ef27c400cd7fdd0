"""What the worker group's scaling policies decide, minute by minute, evaluated as Auto Scaling
does, from the template's RESOLVED properties (a StackModel: its parameters and conditions).

`tracking_policy(model)` reads WorkerScalingPolicy (target, metric queries, expression, warmup)
and the group's MinSize/MaxSize; `wake_policy(model)` the WorkerWakeAlarm and its step policy,
or None when its condition (WorkerMinSize 0) does not hold. `simulate(...)` runs a group of
`start` in-service workers against a DesiredWorkers series (one value per minute, None: the
publisher sent nothing): each minute the group's own metrics (GroupInServiceInstances,
GroupDesiredCapacity) are what the simulated group has, the policy's metric math is evaluated
over them (sandbox/stack/metric_math.py) and the alarms' rules applied:

- target tracking's AlarmHigh: the last 3 one-minute datapoints above the target -> new
  capacity ceil(in service x metric / target); AlarmLow: the last 15 below 0.9 x target ->
  the same formula, a scale-in (3 of 3 and 15 of 15 are the alarms Auto Scaling creates; the
  0.9 is the AlarmLow threshold it sets, seen on its alarms and not in its documentation);
  a missing datapoint breaches neither (the alarms treat missing data as missing);
- capacity is rounded up (a scale-out adds enough, a scale-in removes no more than the metric
  allows) and clamped to MinSize..MaxSize;
- no scale-in while instances launch or warm up (the policy's EstimatedInstanceWarmup, else
  the group's DefaultInstanceWarmup, from InService);
  a scale-out counts every in-service instance, warming or not;
- a new instance is in service `launch_minutes` after the decision (boot, cfn-init and the
  CodeDeploy launch hook's first deployment); a scale-in takes instances out of service at once
  (they drain in Terminating:Wait, and GroupInServiceInstances does not count them);
- the wake-up alarm: its expression at or above its threshold for its datapoints ->
  ExactCapacity of its step.

The result is the list of capacity changes (`Change`: minute, before, after, why) and the
series the group and the metric took. `choose_for_scale_in` is which instance Auto Scaling's
default termination policy removes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sandbox.stack.metric_math import Series, evaluate

HIGH_DATAPOINTS = 3  # AlarmHigh: 3 of 3 one-minute datapoints above the target
LOW_DATAPOINTS = 15  # AlarmLow: 15 of 15 below LOW_FRACTION x the target
LOW_FRACTION = 0.9
POLICY = "WorkerScalingPolicy"
WAKE_ALARM = "WorkerWakeAlarm"


@dataclass(frozen=True)
class MetricQuery:
    id: str
    namespace: str
    name: str
    dimensions: Tuple[Tuple[str, str], ...]
    stat: str


@dataclass(frozen=True)
class TrackingPolicy:
    target: float
    queries: Tuple[MetricQuery, ...]
    expression: str
    warmup_s: int
    scale_in: bool
    min_size: int
    max_size: int


@dataclass(frozen=True)
class WakePolicy:
    queries: Tuple[MetricQuery, ...]
    expression: str
    threshold: float
    datapoints: int
    capacity: int


@dataclass(frozen=True)
class Change:
    minute: int
    before: int
    after: int
    why: str


@dataclass
class Run:
    changes: List[Change] = field(default_factory=list)
    desired: List[int] = field(default_factory=list)  # GroupDesiredCapacity per minute
    in_service: List[int] = field(default_factory=list)  # GroupInServiceInstances per minute
    metric: Series = field(default_factory=list)  # the tracked expression per minute

    def scale_ins(self) -> List[Change]:
        return [c for c in self.changes if c.after < c.before]


def _queries(metrics: Sequence[Dict[str, Any]]) -> Tuple[Tuple[MetricQuery, ...], str]:
    queries, returned = [], []
    for m in metrics:
        if "MetricStat" in m:
            stat = m["MetricStat"]
            dims = tuple((d["Name"], str(d["Value"])) for d in stat["Metric"].get("Dimensions", []))
            queries.append(
                MetricQuery(
                    m["Id"], stat["Metric"]["Namespace"], stat["Metric"]["MetricName"], dims,
                    stat["Stat"],
                )
            )  # fmt: skip
        if m.get("ReturnData", True) and "Expression" in m:
            returned.append(m["Expression"])
    if len(returned) != 1:
        raise ValueError(f"expected one expression with ReturnData, found {len(returned)}")
    return tuple(queries), returned[0]


def tracking_policy(model, rid: str = POLICY) -> TrackingPolicy:
    p = model.properties(rid)
    if p.get("PolicyType") != "TargetTrackingScaling":
        raise ValueError(f"{rid} is not a target tracking policy: {p.get('PolicyType')}")
    tt = p["TargetTrackingConfiguration"]
    queries, expression = _queries(tt["CustomizedMetricSpecification"]["Metrics"])
    group = next(r for r in model.resources if model.ref(r) == p["AutoScalingGroupName"])
    g = model.properties(group)
    return TrackingPolicy(
        target=float(tt["TargetValue"]),
        queries=queries,
        expression=expression,
        # the policy's own warmup, else the group's default (the template sets the latter)
        warmup_s=int(p.get("EstimatedInstanceWarmup", g.get("DefaultInstanceWarmup", 0))),
        scale_in=not bool(tt.get("DisableScaleIn", False)),
        min_size=int(g["MinSize"]),
        max_size=int(g["MaxSize"]),
    )


def wake_policy(model, rid: str = WAKE_ALARM) -> Optional[WakePolicy]:
    if rid not in model.resources or not model.active(rid):
        return None
    a = model.properties(rid)
    if a["ComparisonOperator"] != "GreaterThanOrEqualToThreshold":
        raise ValueError(f"{rid}: {a['ComparisonOperator']} is not what the evaluator reads")
    (action,) = a["AlarmActions"]
    policy = next(r for r in model.resources if model.active(r) and model.ref(r) == action)
    p = model.properties(policy)
    if p.get("AdjustmentType") != "ExactCapacity" or len(p["StepAdjustments"]) != 1:
        raise ValueError(f"{policy}: the evaluator reads one ExactCapacity step")
    queries, expression = _queries(a["Metrics"])
    return WakePolicy(
        queries=queries,
        expression=expression,
        threshold=float(a["Threshold"]),
        datapoints=int(a.get("DatapointsToAlarm", a["EvaluationPeriods"])),
        capacity=int(p["StepAdjustments"][0]["ScalingAdjustment"]),
    )


def metric_series(
    queries: Sequence[MetricQuery], expression: str, inputs: Dict[str, Series]
) -> Series:
    """The expression over `inputs` ({metric name: series}), each query bound by its name."""
    missing = sorted({q.name for q in queries} - set(inputs))
    if missing:
        raise ValueError(f"no series for the metric(s) {missing}")
    return evaluate(expression, {q.id: list(inputs[q.name]) for q in queries})


def _capacity(value: float) -> int:
    # rounded first: 3 x (1/3) is 1.0000000000000002 in floating point, one capacity unit
    return math.ceil(round(value, 6))


def _last(series: Series, n: int, test) -> bool:
    window = series[-n:]
    return len(window) == n and all(v is not None and test(v) for v in window)


def simulate(
    policy: TrackingPolicy,
    desired_workers: Series,
    start: int,
    launch_minutes: int = 10,
    wake: Optional[WakePolicy] = None,
) -> Run:
    """The group's capacity changes over `desired_workers` (one value per minute)."""
    if not policy.min_size <= start <= policy.max_size:
        raise ValueError(f"start {start} is outside {policy.min_size}..{policy.max_size}")
    run = Run()
    desired, in_service = start, start
    launching: List[int] = []  # the minute each launching instance enters service
    warm_until = 0  # no scale-in before this minute
    warm = math.ceil(policy.warmup_s / 60)

    def clamp(n: int) -> int:
        return max(policy.min_size, min(policy.max_size, n))

    def change(minute: int, new: int, why: str) -> None:
        nonlocal desired, in_service
        run.changes.append(Change(minute, desired, new, why))
        if new > desired:
            launching.extend([minute + launch_minutes] * (new - desired))
        else:
            in_service -= desired - new
        desired = new

    for minute in range(len(desired_workers)):
        ready = [m for m in launching if m <= minute]
        if ready:
            launching[:] = [m for m in launching if m > minute]
            in_service += len(ready)
            warm_until = minute + warm
        run.desired.append(desired)
        run.in_service.append(in_service)
        inputs = {
            "DesiredWorkers": list(desired_workers[: minute + 1]),
            "GroupInServiceInstances": list(run.in_service),
            "GroupDesiredCapacity": list(run.desired),
        }
        metric = metric_series(policy.queries, policy.expression, inputs)
        run.metric.append(metric[-1])
        now = metric[-1]
        if _last(metric, HIGH_DATAPOINTS, lambda v: v > policy.target):
            new = clamp(_capacity(in_service * now / policy.target))
            if new > desired:
                change(minute, new, "scale-out: AlarmHigh")
        elif (
            policy.scale_in
            and _last(metric, LOW_DATAPOINTS, lambda v: v < LOW_FRACTION * policy.target)
            # a scale-in waits while a scale-out's instances launch or warm up
            and not launching
            and minute >= warm_until
        ):
            new = clamp(_capacity(in_service * now / policy.target))
            if new < desired:
                change(minute, new, "scale-in: AlarmLow")
        if wake is not None:
            woke = metric_series(wake.queries, wake.expression, inputs)
            if _last(woke, wake.datapoints, lambda v: v >= wake.threshold):
                new = clamp(wake.capacity)
                if new != desired:
                    change(minute, new, "wake-up alarm: ExactCapacity")
    return run


def choose_for_scale_in(instances: Sequence[Dict[str, Any]], count: int) -> List[str]:
    """The instance ids Auto Scaling's default termination policy removes, one at a time:
    never one protected from scale in; from the Availability Zone with the most instances
    (that has an unprotected one); the oldest launch template version first. Where AWS then
    picks the one closest to the next billing hour, or at random, this takes the highest
    instance id, so a run is repeatable. `instances`: DescribeAutoScalingGroups' Instances."""
    left = [dict(i) for i in instances]
    chosen: List[str] = []
    for _ in range(count):
        free = [i for i in left if not i.get("ProtectedFromScaleIn")]
        if not free:
            break  # Auto Scaling lowers the desired capacity and waits for protection to end
        zones: Dict[str, int] = {}
        for i in left:
            zones[i["AvailabilityZone"]] = zones.get(i["AvailabilityZone"], 0) + 1
        free_zones = {i["AvailabilityZone"] for i in free}
        most = max(zones[z] for z in free_zones)
        pool = [i for i in free if zones[i["AvailabilityZone"]] == most]
        oldest = min(_version(i) for i in pool)
        pool = [i for i in pool if _version(i) == oldest]
        pick = max(pool, key=lambda i: i["InstanceId"])
        chosen.append(pick["InstanceId"])
        left.remove(pick)
    return chosen


def _version(instance: Dict[str, Any]) -> int:
    version = str((instance.get("LaunchTemplate") or {}).get("Version", "0"))
    return int(version) if version.isdigit() else 0
