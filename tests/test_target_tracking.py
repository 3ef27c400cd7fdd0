"""The worker group's scaling policy as Auto Scaling would run it (sandbox/stack/target_tracking.py
with sandbox/stack/metric_math.py), from the template's resolved properties: a rising queue
scales out to DesiredWorkers clamped at WorkerMaxSize; a falling one scales in only after the
scale-in alarm's 15 minutes and never while new workers warm up; an empty group (WorkerMinSize
0) is started by the wake-up alarm; a silent publisher changes nothing; and the template's
target and expression still mean capacity = DesiredWorkers. Fast: pure functions."""

from __future__ import annotations

import itertools

import pytest

from sandbox.stack.metric_math import evaluate
from sandbox.stack.model import StackModel
from sandbox.stack.target_tracking import (
    HIGH_DATAPOINTS,
    LOW_DATAPOINTS,
    Change,
    choose_for_scale_in,
    metric_series,
    simulate,
    tracking_policy,
    wake_policy,
)


@pytest.fixture(scope="module")
def model() -> StackModel:
    return StackModel.load()  # the example's parameters: WorkerMinSize 1, WorkerMaxSize 4


def test_the_templates_policy_means_capacity_equals_desired_workers(model):
    policy = tracking_policy(model)
    assert policy.target == 1.0
    assert (policy.min_size, policy.max_size) == (1, 4)
    by_name = {q.name: q for q in policy.queries}
    # the cluster-wide DesiredWorkers the scheduler publishes, and this group's in-service count
    desired = by_name["DesiredWorkers"]
    assert (desired.namespace, desired.dimensions) == (
        "AirflowEC2Agent",
        (("Cluster", model.stack_name),),
    )
    in_service = by_name["GroupInServiceInstances"]
    assert (in_service.namespace, in_service.dimensions) == (
        "AWS/AutoScaling",
        (("AutoScalingGroupName", model.ref("WorkerGroup")),),
    )
    # the group collects every group metric a scaling policy or alarm of it reads
    collected = {m for c in model.prop("WorkerGroup", "MetricsCollection") for m in c["Metrics"]}
    assert "GroupInServiceInstances" in collected
    # over every small (DesiredWorkers, in service): the capacity target tracking computes from
    # the metric, ceil(in service x metric / target), is DesiredWorkers itself
    pairs = list(itertools.product(range(0, 13), range(1, 9)))
    metric = metric_series(
        policy.queries,
        policy.expression,
        {
            "DesiredWorkers": [float(d) for d, _ in pairs],
            "GroupInServiceInstances": [float(n) for _, n in pairs],
        },
    )
    for (d, n), value in zip(pairs, metric):
        assert value is not None
        assert round(n * value / policy.target, 6) == d, (d, n, value)
    # no worker in service: no datapoint (not a division by zero, not a 0 read as "no work")
    assert metric_series(
        policy.queries,
        policy.expression,
        {"DesiredWorkers": [5.0], "GroupInServiceInstances": [0.0]},
    ) == [None]


def test_a_rising_queue_scales_out_to_desired_workers_clamped_at_the_maximum(model):
    policy = tracking_policy(model)
    run = simulate(policy, [2.0] * 5 + [9.0] * 20, start=2)
    # three datapoints above the target (minutes 5, 6, 7), then at once to the maximum
    assert run.changes == [Change(5 + HIGH_DATAPOINTS - 1, 2, 4, "scale-out: AlarmHigh")]
    wider = tracking_policy(StackModel.load(extra={"WorkerMaxSize": "12"}))
    run = simulate(wider, [2.0] * 5 + [9.0] * 20, start=2)
    assert [(c.before, c.after) for c in run.changes] == [(2, 9)]
    assert run.in_service[-1] == 9  # the new workers in service after their launch


def test_a_falling_queue_scales_in_only_after_the_scale_in_alarms_evaluation(model):
    policy = tracking_policy(model)
    # 14 minutes below the target are not enough: the queue comes back, nothing is removed
    blip = simulate(policy, [4.0] * 3 + [1.0] * (LOW_DATAPOINTS - 1) + [4.0] * 10, start=4)
    assert blip.changes == []
    run = simulate(policy, [4.0] * 3 + [1.0] * 30, start=4)
    (change,) = run.changes
    assert change == Change(3 + LOW_DATAPOINTS - 1, 4, 1, "scale-in: AlarmLow")
    # within 10 % of the target (9 wanted of 10) is not below the scale-in alarm's threshold
    ten = tracking_policy(StackModel.load(extra={"WorkerMaxSize": "12"}))
    assert simulate(ten, [10.0] * 3 + [9.0] * 30, start=10).changes == []
    # never below the minimum: no work at all leaves WorkerMinSize workers
    assert simulate(policy, [4.0] * 3 + [0.0] * 30, start=4).changes[-1].after == 1


def test_no_scale_in_while_new_workers_launch_or_warm_up(model):
    policy = tracking_policy(model)
    assert policy.warmup_s == 180
    # a burst scales out at minute 2; the work is gone at once, but the new workers take 20
    # minutes to be in service and then warm up 3: the scale-in waits for both
    run = simulate(policy, [6.0] * 3 + [0.0] * 40, start=2, launch_minutes=20)
    out, back = run.changes
    assert (out.minute, out.before, out.after) == (2, 2, 4)
    assert (back.minute, back.before, back.after) == (2 + 20 + 3, 4, 1)


def test_an_empty_group_is_started_by_the_wake_up_alarm():
    assert wake_policy(StackModel.load()) is None  # only with WorkerMinSize 0
    model = StackModel.load(extra={"WorkerMinSize": "0"})
    policy, wake = tracking_policy(model), wake_policy(model)
    assert wake is not None and policy.min_size == 0
    # target tracking alone never leaves 0: its metric has no datapoint there
    assert simulate(policy, [0.0] * 3 + [3.0] * 30, start=0).changes == []
    run = simulate(policy, [0.0] * 3 + [3.0] * 30, start=0, wake=wake, launch_minutes=10)
    assert [(c.minute, c.before, c.after) for c in run.changes] == [
        (3, 0, 1),  # the first minute with work
        (3 + 10 + HIGH_DATAPOINTS - 1, 1, 3),  # that worker in service: tracking takes over
    ]
    # no work: scaled in to 0, and the wake-up alarm stays quiet while there is none
    idle = simulate(policy, [0.0] * 30, start=1, wake=wake)
    assert [(c.before, c.after) for c in idle.changes] == [(1, 0)]
    # while the group's desired workers launch, the wake-up alarm does not cut it back
    boot = simulate(policy, [3.0] * 12, start=0, wake=wake, launch_minutes=10)
    assert [(c.before, c.after) for c in boot.changes] == [(0, 1)]


def test_a_silent_publisher_holds_the_group_where_it_is(model):
    policy = tracking_policy(model)
    # DesiredWorkers stops arriving: its last value stands (FILL), not 0 ("no work")
    run = simulate(policy, [3.0] * 5 + [None] * 30, start=3)
    assert run.changes == []
    assert run.metric[-1] == 1.0


def test_metric_math_semantics():
    s = {"a": [4.0, None, 6.0, 3.0], "b": [2.0, 2.0, 0.0, None]}
    assert evaluate("a / b", s) == [2.0, 0.0, None, None]  # missing read as 0; x/0 dropped
    assert evaluate("a + 1", s) == [5.0, None, 7.0, 4.0]
    assert evaluate("IF(b > 0, a / b)", s) == [2.0, 0.0, None, None]
    assert evaluate("IF(b < 1, a, 0)", s) == [0.0, 0.0, 6.0, None]
    assert evaluate("FILL(a, REPEAT)", s) == [4.0, 4.0, 6.0, 3.0]
    assert evaluate("FILL(b, 7)", s) == [2.0, 2.0, 0.0, 7.0]
    assert evaluate("-a * 2 ^ 2", s) == [-16.0, None, -24.0, -12.0]
    assert evaluate("a > 3 AND b > 1", s) == [1.0, 0.0, 0.0, 0.0]
    for bad in ("METRICS()", "a / c", "a +", "AVG(a)"):
        with pytest.raises(ValueError, match="metric math"):
            evaluate(bad, s)


def test_scale_in_takes_the_default_termination_policys_choice():
    def inst(iid, az, version="1", protected=False):
        return {
            "InstanceId": iid,
            "AvailabilityZone": az,
            "ProtectedFromScaleIn": protected,
            "LaunchTemplate": {"Version": version},
        }

    group = [
        inst("i-1", "us-east-1a"),
        inst("i-2", "us-east-1b", version="2"),
        inst("i-3", "us-east-1b"),
        inst("i-4", "us-east-1b", protected=True),
    ]
    # the zone with the most instances, the oldest launch template version there
    assert choose_for_scale_in(group, 1) == ["i-3"]
    # then the zones are even (2 and 1 unprotected + 1 protected): b still has the most
    assert choose_for_scale_in(group, 2) == ["i-3", "i-2"]
    # protected instances are never chosen, however many are asked for
    assert choose_for_scale_in(group, 4) == ["i-3", "i-2", "i-1"]
