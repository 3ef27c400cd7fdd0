"""The template's CloudWatch alarms (cloudformation/airflow-cluster.yaml) against what is really
published: every alarm on the agent's namespace names a metric the agent's code records, with
the dimensions it records it with (read from the code's `record(...)` calls, so renaming an
event or changing its role breaks this test), and the Cluster value the instances' agent.yaml
gives; every alarm notifies AlarmTopicArn only when one is given; the managed services' alarms
are on the metrics and dimensions those services publish."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, Optional, Set, Tuple

import pytest

from agent.config import ROLES
from agent.events.plan import DIMENSIONS, METRICS
from sandbox.cfn_template import load_template
from sandbox.stack.model import TEMPLATE

AGENT = Path(__file__).resolve().parent.parent / "agent"
NAMESPACE = "AirflowEC2Agent"
NOTIFY = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}


def recorded_events() -> Dict[str, Set[str]]:
    """metric -> the roles the agent's code records it with (every role when the call leaves
    the role to role.json or passes a variable), from each `record` of agent.events.publish."""
    found: Dict[str, Set[str]] = {}
    for path in AGENT.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "agent.events.publish"
            for alias in node.names
            if alias.name == "record"
        }
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in names
            ):
                continue
            arg = node.args[1]
            # a literal, or a choice between literals (`"A" if refused else "B"`)
            choices = [arg.body, arg.orelse] if isinstance(arg, ast.IfExp) else [arg]
            assert all(isinstance(c, ast.Constant) for c in choices), (
                f"{path}:{node.lineno}: the metric must be a literal the scan can read"
            )
            role: Optional[str] = None
            for kw in node.keywords:
                if kw.arg == "role" and isinstance(kw.value, ast.Constant):
                    role = kw.value.value
            for metric in choices:
                found.setdefault(metric.value, set()).update({role} if role else set(ROLES))
    return found


def _invokes_a_scaling_policy(props: dict, resources: dict) -> bool:
    refs = [a.get("Ref") for a in props.get("AlarmActions", []) if isinstance(a, dict)]
    return any(resources.get(r, {}).get("Type") == "AWS::AutoScaling::ScalingPolicy" for r in refs)


def _alarms_of_template(scaling: bool) -> Dict[str, dict]:
    resources = load_template(TEMPLATE)["Resources"]
    return {
        rid: r["Properties"]
        for rid, r in resources.items()
        if r["Type"] == "AWS::CloudWatch::Alarm"
        and _invokes_a_scaling_policy(r["Properties"], resources) == scaling
    }


def alarms() -> Dict[str, dict]:
    """The notification alarms (a scaling policy's alarm, scaling_alarms(), acts instead)."""
    return _alarms_of_template(scaling=False)


def scaling_alarms() -> Dict[str, dict]:
    return _alarms_of_template(scaling=True)


def test_the_scaling_alarm_watches_what_the_metrics_publisher_sends():
    # the worker group's wake-up alarm (README "Scaling workers"): the scheduler's metrics
    # daemon (agent/jobs/metrics, not an event) publishes DesiredWorkers with Cluster alone
    assert set(scaling_alarms()) == {"WorkerWakeAlarm"}
    ours = [
        (metric, dims)
        for namespace, metric, dims in metrics_of(scaling_alarms()["WorkerWakeAlarm"])
        if namespace == NAMESPACE
    ]
    assert ours == [("DesiredWorkers", [{"Name": "Cluster", "Value": {"Ref": "AWS::StackName"}}])]


def metrics_of(props: dict) -> Iterator[Tuple[str, str, list]]:
    """(namespace, metric, dimensions) of an alarm: its one metric, or each of its metric math."""
    if "MetricName" in props:
        yield props["Namespace"], props["MetricName"], props.get("Dimensions", [])
    for query in props.get("Metrics", []):
        if "MetricStat" in query:
            m = query["MetricStat"]["Metric"]
            yield m["Namespace"], m["MetricName"], m.get("Dimensions", [])


def test_the_scan_finds_the_agents_events():
    events = recorded_events()
    assert set(events) == set(METRICS), "every event metric is recorded somewhere, and only those"
    assert events["DrainsPastDeadline"] == {"worker"}
    assert events["EnvSyncFailures"] == set(ROLES)


def test_every_agent_alarm_names_a_metric_and_dimensions_the_agent_publishes():
    events = recorded_events()
    template = load_template(TEMPLATE)
    # the instances' agent.yaml says `cluster: ${AWS::StackName}` (one per role)
    assert template["Resources"]["InstanceConfig"]["Metadata"]  # where agent.yaml is written
    text = TEMPLATE.read_text(encoding="utf-8")
    assert text.count("cluster: ${AWS::StackName}") == len(ROLES)
    seen = 0
    for rid, props in alarms().items():
        for namespace, metric, dims in metrics_of(props):
            if namespace != NAMESPACE:
                continue
            seen += 1
            assert metric in events, f"{rid}: the agent records no {metric}"
            by_name = {d["Name"]: d["Value"] for d in dims}
            assert tuple(by_name) == DIMENSIONS, f"{rid}: {metric} dimensions {list(by_name)}"
            assert by_name["Cluster"] == {"Ref": "AWS::StackName"}, rid
            assert by_name["Role"] in events[metric], (
                f"{rid}: {metric} is recorded with role {sorted(events[metric])}, "
                f"not {by_name['Role']}"
            )
    assert seen >= 5


def test_the_failure_events_and_the_drain_past_its_deadline_have_alarms():
    watched = {
        metric
        for props in alarms().values()
        for ns, metric, _d in metrics_of(props)
        if ns == NAMESPACE
    }
    assert {
        "DrainsPastDeadline",
        "DrainFailures",
        "LifecycleHoldsExpired",
        "ConfapplyRestartFailures",
        "EnvSyncFailures",
        "EnvSyncRefusals",
    } <= watched


@pytest.mark.parametrize(
    "namespace, metric, dimension",
    [
        ("AWS/RDS", "CPUUtilization", "DBInstanceIdentifier"),
        ("AWS/RDS", "FreeStorageSpace", "DBInstanceIdentifier"),
        ("AWS/RDS", "DatabaseConnections", "DBInstanceIdentifier"),
        ("AWS/ElastiCache", "DatabaseMemoryUsagePercentage", "CacheClusterId"),
        ("AWS/ApplicationELB", "HTTPCode_Target_5XX_Count", "TargetGroup"),
        ("AWS/ApplicationELB", "HTTPCode_ELB_5XX_Count", "LoadBalancer"),
        ("AWS/ApplicationELB", "UnHealthyHostCount", "TargetGroup"),
    ],
)
def test_the_managed_services_alarms(namespace, metric, dimension):
    found = [
        {d["Name"] for d in dims}
        for props in alarms().values()
        for ns, name, dims in metrics_of(props)
        if (ns, name) == (namespace, metric)
    ]
    assert found and all(dimension in names for names in found)


def test_every_alarm_notifies_the_topic_only_when_one_is_given():
    template = load_template(TEMPLATE)
    assert template["Parameters"]["AlarmTopicArn"]["Default"] == ""
    assert "HasAlarmTopic" in template["Conditions"]
    for rid, props in alarms().items():
        assert props["AlarmActions"] == NOTIFY and props["OKActions"] == NOTIFY, rid
        assert "Condition" not in template["Resources"][rid], f"{rid} exists without a topic"
