"""agent/platform/target_group.py: an api-server leaves the target group around a restart.

The decision and the waits are pure (virtual clock and sleep). The rotation itself runs against
the embedded AWS (moto's ELBv2 over real HTTP, through the agent's own AwsClients): a target
group with real moto EC2 instances as targets, as the stack's Auto Scaling group registers them.
moto reports a registered running instance `healthy` at once and a deregistered one `unused` at
once (no health checks, no deregistration delay), so the waits end on their first poll here;
their timeouts are checked on virtual time with the pure `wait_until`.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import pytest

from agent.config import config_from_dict
from agent.errors import ConfigError
from agent.platform.aws import AwsClients
from agent.platform.target_group import (
    Rotation,
    RotationError,
    Target,
    decide,
    out_of_rotation,
    wait_until,
)
from agent.platform.target_group_state import TargetGroupDoc
from agent.state import StateStore


class VirtualTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: List[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


# -- pure --------------------------------------------------------------------------------------


def test_decide_leaves_only_when_another_target_is_healthy():
    me, other = "i-me", "i-other"
    both = [Target(me, 8080, "healthy"), Target(other, 8080, "healthy")]
    d = decide(both, me)
    assert d.rotate and d.mine == [Target(me, 8080, "healthy")] and "i-other" in d.reason
    alone = decide([Target(me, 8080, "healthy")], me)
    assert not alone.rotate and "no other target is healthy" in alone.reason
    assert alone.mine == [Target(me, 8080, "healthy")]
    sick = decide([Target(me, 8080, "healthy"), Target(other, 8080, "unhealthy")], me)
    assert not sick.rotate
    draining = decide([Target(me, 8080, "healthy"), Target(other, 8080, "draining")], me)
    assert not draining.rotate
    # not registered (first boot: the group registers it once InService), or already leaving
    assert not decide([Target(other, 8080, "healthy")], me).rotate
    assert not decide([Target(me, 8080, "draining"), Target(other, 8080, "healthy")], me).rotate
    # an unhealthy instance of its own may still leave (it takes nothing away)
    assert decide([Target(me, 8080, "unhealthy"), Target(other, 8080, "healthy")], me).rotate


def test_wait_until_gives_up_at_the_deadline_with_what_it_saw_last():
    t = VirtualTime()
    seen = iter(["draining"] * 100)
    assert wait_until(lambda: next(seen), 10.0, 3.0, t.clock, t.sleep) == "draining"
    assert t.slept == [3.0, 3.0, 3.0, 1.0] and t.now == 1010.0
    t2 = VirtualTime()
    answers = iter(["initial", "initial", None])
    assert wait_until(lambda: next(answers), 60.0, 2.0, t2.clock, t2.sleep) is None
    assert t2.slept == [2.0, 2.0]


def test_config_section():
    cfg = config_from_dict({})
    assert cfg.target_group.arn is None
    assert (cfg.target_group.deregister_timeout, cfg.target_group.register_timeout) == (120, 300)
    arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/tg-a/0123abcd"
    assert config_from_dict({"target_group": {"arn": arn}}).target_group.arn == arn
    with pytest.raises(ConfigError, match="target_group.arn"):
        config_from_dict({"target_group": {"arn": "arn:aws:iam::123456789012:role/x"}})
    with pytest.raises(ConfigError, match="target_group.poll_interval"):
        config_from_dict({"target_group": {"poll_interval": 0}})


# -- against the embedded AWS ------------------------------------------------------------------


@pytest.fixture
def group(aws, tmp_path) -> Dict[str, Any]:
    """A target group and two running instances registered in it, as the stack's group does."""
    ec2, elb = aws.client("ec2"), aws.client("elbv2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    arn = elb.create_target_group(
        Name="api-servers", Protocol="HTTP", Port=8080, VpcId=vpc["VpcId"], TargetType="instance"
    )["TargetGroups"][0]["TargetGroupArn"]
    ids = [
        i["InstanceId"]
        for i in ec2.run_instances(ImageId="ami-12c6146b", MinCount=2, MaxCount=2)["Instances"]
    ]
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": i} for i in ids])
    aws.clear_calls()
    state = str(tmp_path / "state")
    return {"arn": arn, "me": ids[0], "other": ids[1], "elb": elb, "ec2": ec2, "state": state}


def _cfg(group: Dict[str, Any], arn: str = ""):
    return config_from_dict(
        {
            "state_dir": group["state"],
            "target_group": {"arn": arn or group["arn"], "poll_interval": 1.0},
        }
    )


def states(group: Dict[str, Any]) -> Dict[str, str]:
    got = group["elb"].describe_target_health(TargetGroupArn=group["arn"])
    return {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in got["TargetHealthDescriptions"]}


def elb_calls(aws) -> List[str]:
    return [c["action"] for c in aws.calls() if c["service"] == "elasticloadbalancing"]


def test_two_healthy_targets_deregister_wait_then_register_again(aws, group, imds):
    imds.set(**{"meta-data/instance-id": group["me"]})  # the instance id comes from IMDS
    cfg, t = _cfg(group), VirtualTime()
    with out_of_rotation(cfg, AwsClients(cfg), clock=t.clock, sleep=t.sleep) as outcome:
        inside = elb_calls(aws)
        # inside the block the load balancer no longer lists this instance
        assert states(group) == {group["other"]: "healthy"}
        assert outcome.rotated and outcome.drained
        assert outcome.targets == [Target(group["me"], 8080, "healthy")]
    assert inside == [
        "DescribeTargetHealth",  # every target: the decision
        "DeregisterTargets",
        "DescribeTargetHealth",  # this instance: unused (moto: at once, no draining delay)
        "DescribeTargetHealth",  # every target: another is still healthy
    ]
    # after the block (and the test's own read): register, then this instance is healthy
    assert elb_calls(aws)[len(inside) + 1 :] == ["RegisterTargets", "DescribeTargetHealth"]
    assert states(group) == {group["me"]: "healthy", group["other"]: "healthy"}
    assert t.slept == []  # moto answers at once: no poll had to wait


def test_only_this_instance_registered_restarts_in_place(aws, group):
    group["elb"].deregister_targets(TargetGroupArn=group["arn"], Targets=[{"Id": group["other"]}])
    aws.clear_calls()
    cfg = _cfg(group)
    ran = []
    with out_of_rotation(cfg, AwsClients(cfg), instance_id=group["me"]) as outcome:
        ran.append(states(group))
    assert ran == [{group["me"]: "healthy"}]  # never left the target group
    assert not outcome.rotated and "no other target is healthy" in outcome.reason
    assert "DeregisterTargets" not in elb_calls(aws) and "RegisterTargets" not in elb_calls(aws)


def test_block_raises_the_instance_is_registered_again_and_it_is_logged(aws, group, caplog):
    cfg = _cfg(group)
    caplog.set_level(logging.ERROR, logger="agent.platform.target_group")
    clients = AwsClients(cfg)
    with (
        pytest.raises(RuntimeError, match="restart failed"),
        out_of_rotation(cfg, clients, instance_id=group["me"]) as outcome,
    ):
        assert outcome.rotated and group["me"] not in states(group)
        raise RuntimeError("restart failed")
    assert states(group) == {group["me"]: "healthy", group["other"]: "healthy"}
    # registered again at once, without waiting for a health the failed restart may never reach
    assert elb_calls(aws)[-3:] == [
        "DescribeTargetHealth",
        "RegisterTargets",
        "DescribeTargetHealth",
    ]
    assert any(
        "the restart failed; registering the instance again" in r.getMessage()
        and group["me"] in r.getMessage()
        for r in caplog.records
    )


def test_one_api_server_out_at_a_time(aws, group):
    """The second api-server to restart while the first is out restarts in place."""
    cfg = _cfg(group)
    clients = AwsClients(cfg)
    with out_of_rotation(cfg, clients, instance_id=group["me"]) as first:
        with out_of_rotation(cfg, clients, instance_id=group["other"]) as second:
            assert states(group) == {group["other"]: "healthy"}
        assert first.rotated and not second.rotated
    assert states(group) == {group["me"]: "healthy", group["other"]: "healthy"}


def test_another_target_leaving_at_the_same_moment_sends_this_one_back_first(aws, group):
    elb, t = group["elb"], VirtualTime()
    real_clock = t.clock
    left = []

    def clock() -> float:
        # the other api-server deregisters itself while this one waits for its own draining
        if not left:
            left.append(elb.deregister_targets(TargetGroupArn=group["arn"],
                                               Targets=[{"Id": group["other"]}]))  # fmt: skip
        return real_clock()

    rotation = Rotation(elb, group["arn"], group["me"], clock=clock, sleep=t.sleep)
    with rotation.out() as outcome:
        assert states(group) == {group["me"]: "healthy"}  # back before the restart
    assert not outcome.rotated and "after leaving" in outcome.reason


def test_not_registered_or_no_target_group_calls_nothing_but_the_read(aws, group):
    cfg = _cfg(group)
    with out_of_rotation(cfg, AwsClients(cfg), instance_id="i-0notregistered00") as outcome:
        pass
    assert not outcome.rotated and "not registered" in outcome.reason
    assert elb_calls(aws) == ["DescribeTargetHealth"]
    aws.clear_calls()
    none = config_from_dict({})
    with out_of_rotation(none, AwsClients(none), instance_id=group["me"]) as outcome:
        pass
    assert not outcome.rotated and aws.calls() == []


def test_errors_name_the_target_group_and_the_instance(aws, group):
    missing = group["arn"].rsplit("/", 1)[0] + "/ffffffffffffffff"
    cfg = _cfg(group, missing)
    with (
        pytest.raises(RotationError) as err,
        out_of_rotation(cfg, AwsClients(cfg), instance_id=group["me"]),
    ):
        pytest.fail("the block must not run when the target group cannot be read")
    assert missing in str(err.value) and group["me"] in str(err.value)
    assert "DescribeTargetHealth" in str(err.value)
    # registering again fails (the instance was stopped meanwhile): named too, after the block
    cfg = _cfg(group)
    with (
        pytest.raises(RotationError) as err,
        out_of_rotation(cfg, AwsClients(cfg), instance_id=group["me"]),
    ):
        group["ec2"].stop_instances(InstanceIds=[group["me"]])
    text = str(err.value)
    assert group["arn"] in text and group["me"] in text and "RegisterTargets" in text


def test_a_run_that_died_while_out_is_registered_again_by_the_next(aws, group):
    store = StateStore(group["state"])
    elb = group["elb"]
    dead = Rotation(elb, group["arn"], group["me"], store=store)
    dead.deregister([Target(group["me"], 8080, "healthy")])  # ... and the hook was killed here
    doc = store.read(TargetGroupDoc)
    assert doc.out_since is not None and doc.ports == [8080] and doc.instance_id == group["me"]
    assert states(group) == {group["other"]: "healthy"}
    cfg = _cfg(group)
    with out_of_rotation(cfg, AwsClients(cfg), instance_id=group["me"]) as outcome:
        # registered again first, then the usual decision: out while the block runs
        assert outcome.rotated and states(group) == {group["other"]: "healthy"}
    assert states(group) == {group["me"]: "healthy", group["other"]: "healthy"}
    doc = store.read(TargetGroupDoc)
    assert doc.out_since is None and doc.last_result == "healthy"
    calls = elb_calls(aws)
    assert calls[:2] == ["DeregisterTargets", "DescribeTargetHealth"]  # the dead run's
    # (the test's own read), then the next run's repair before its decision
    assert calls[3:6] == ["DescribeTargetHealth", "RegisterTargets", "DescribeTargetHealth"]


def test_the_wait_lasts_while_the_load_balancer_still_routes_to_the_instance(aws, group):
    """As on AWS (`draining` until the load balancer stopped routing to it): the embedded AWS
    answers `draining` while the sandbox's load balancer reports it still routes to the
    instance (sandbox.elbv2_draining), so the restart starts only once it no longer does."""
    cfg, t = _cfg(group), VirtualTime()
    routed = {group["me"], group["other"]}
    aws.set_routed(routed)

    def sleep(seconds: float) -> None:  # the load balancer catches up after three polls
        t.sleep(seconds)
        if len(t.slept) == 3:
            aws.set_routed({group["other"]})

    try:
        with out_of_rotation(cfg, AwsClients(cfg), group["me"], t.clock, sleep) as outcome:
            assert outcome.drained and len(t.slept) == 3
            assert states(group) == {group["other"]: "healthy"}
        reads = group["elb"].describe_target_health(
            TargetGroupArn=group["arn"], Targets=[{"Id": group["other"]}]
        )["TargetHealthDescriptions"]
        assert [d["TargetHealth"]["State"] for d in reads] == ["healthy"]
    finally:
        aws.set_routed(set())


def test_a_target_the_load_balancers_checks_have_down_is_not_healthy(aws, group):
    """As on AWS (`healthy` only while the load balancer's health checks pass): the embedded AWS
    answers `unhealthy` for a registered target the sandbox's load balancer reports down
    (sandbox.elbv2_draining). The other api-server down: this one restarts in place. This one
    down after its restart: the registration waits until the load balancer has it up again."""
    cfg, t = _cfg(group), VirtualTime()
    try:
        aws.set_routed({group["me"], group["other"]}, failing={group["other"]})
        assert states(group)[group["other"]] == "unhealthy"
        with out_of_rotation(cfg, AwsClients(cfg), group["me"], t.clock, t.sleep) as outcome:
            assert not outcome.rotated and "no other target is healthy" in outcome.reason
        assert elb_calls(aws)[-1] == "DescribeTargetHealth"  # no (de)registration

        aws.set_routed({group["other"]})
        t.slept.clear()

        def sleep(seconds: float) -> None:  # up again on the load balancer after three polls
            t.sleep(seconds)
            if len(t.slept) == 3:
                aws.set_routed({group["me"], group["other"]})

        with out_of_rotation(cfg, AwsClients(cfg), group["me"], t.clock, sleep) as outcome:
            assert outcome.rotated
            aws.set_routed({group["other"]}, failing={group["me"]})  # its restart was long
        assert len(t.slept) == 3
        assert states(group) == {group["me"]: "healthy", group["other"]: "healthy"}
    finally:
        aws.set_routed(set())


def test_not_healthy_at_register_timeout_is_on_record_and_raised(aws, group):
    """Registered again after its restart but still down on the load balancer at
    target_group.register_timeout: the error names the wait, and the record `status` shows says
    `unhealthy`, not a plain `registered`."""
    cfg, t = _cfg(group), VirtualTime()
    try:
        aws.set_routed({group["other"]})
        refused = pytest.raises(RotationError, match=r"not healthy after 300 s.*: unhealthy")
        with refused, out_of_rotation(cfg, AwsClients(cfg), group["me"], t.clock, t.sleep) as out:
            assert out.rotated
            aws.set_routed({group["other"]}, failing={group["me"]})
        assert sum(t.slept) == pytest.approx(300.0)
        doc = StateStore(group["state"]).read(TargetGroupDoc)
        assert doc.last_result == "unhealthy" and doc.out_since is None
        assert "unhealthy" in (doc.last_reason or "")
    finally:
        aws.set_routed(set())
