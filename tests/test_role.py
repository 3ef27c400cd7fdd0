"""Role detection: each source through the real CLI against the rig's IMDSv2 and moto EC2;
conflicts and no-source errors; `role --apply` on a real systemd leaves exactly the role's
units enabled.
"""

from __future__ import annotations

import json

import boto3
import pytest

from agent.config import config_from_dict
from agent.jobs.role import (
    RoleConflict,
    RoleError,
    SourceResult,
    decide_role,
    match_group,
    plan_units,
)
from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

# -- pure core ----------------------------------------------------------------------------------


def test_first_answer_wins_when_the_others_agree_or_are_silent():
    results = [SourceResult("a"), SourceResult("b", "worker"), SourceResult("c", "worker")]
    role, by = decide_role(results)
    assert (role, by.source) == ("worker", "b")


def test_disagreement_and_invalid_values_are_refused_naming_every_source():
    with pytest.raises(RoleConflict) as e:
        decide_role(
            [
                SourceResult("a", "worker"),
                SourceResult("b", None, "unreachable (x)"),
                SourceResult("c", "scheduler"),
            ]
        )
    msg = str(e.value)
    assert "a: 'worker'" in msg and "b: unreachable (x)" in msg and "c: 'scheduler'" in msg
    with pytest.raises(RoleConflict, match="not a role"):
        decide_role([SourceResult("a", "web")])


def test_no_answer_is_an_error_listing_the_sources():
    with pytest.raises(RoleError, match="no source names.*a: not set; b: absent"):
        decide_role([SourceResult("a", None, "not set"), SourceResult("b", None, "absent")])


def test_group_patterns_first_in_file_order():
    groups = {"*-workers-*": "worker", "prod-*": "scheduler"}
    assert match_group(groups, "prod-workers-abc") == ("*-workers-*", "worker")
    assert match_group(groups, "prod-sched") == ("prod-*", "scheduler")
    assert match_group(groups, "dev-x") is None
    assert match_group(groups, None) is None


def test_plan_units_never_disables_a_shared_unit():
    cfg = config_from_dict({})
    mine, others = plan_units(cfg, "worker")
    assert mine == [
        "airflow-agent-env",
        "airflow-agent-confapply",
        "airflow-agent-lifecycle",
        "airflow-agent-task-credentials.timer",
        "airflow-worker",
    ]
    assert "airflow-agent-env" not in others and "airflow-scheduler" in others
    assert "airflow-agent-task-credentials.timer" not in others  # every role's
    assert "airflow-agent-variables.timer" in others


# -- each source through the CLI ------------------------------------------------------------------


@pytest.fixture
def instance(aws, imds):
    """A moto EC2 instance whose id IMDS reports; returns (instance id, ec2 client)."""
    ec2 = boto3.client("ec2", region_name="us-east-1")
    iid = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    imds.set_paths({"meta-data/instance-id": iid})
    return iid, ec2


def role_of(run_agent, cfg, *args, env=None):
    proc = run_agent(cfg, "role", "--json", *args, env=env)
    return proc, (json.loads(proc.stdout) if proc.returncode == 0 else None)


def test_cli_flag_env_var_and_override(run_agent, make_config, instance):
    proc, out = role_of(run_agent, make_config(), "--role", "webserver")
    assert proc.returncode == 0, proc.stderr
    assert out["role"] == "webserver"
    by = {s["source"]: s for s in out["sources"]}
    assert by["$AIRFLOW_AGENT_ROLE"]["detail"] == "not set"
    assert "not exposed" in by["IMDS tag airflow:role"]["detail"]

    proc, out = role_of(run_agent, make_config(), env={"AIRFLOW_AGENT_ROLE": "worker"})
    assert (proc.returncode, out["role"]) == (0, "worker"), proc.stderr

    proc, out = role_of(run_agent, make_config({"role": {"override": "scheduler"}}))
    assert (proc.returncode, out["role"]) == (0, "scheduler"), proc.stderr


def test_imds_tag(run_agent, make_config, instance, imds):
    imds.set_tags({"airflow:role": "scheduler", "Name": "x"})
    proc, out = role_of(run_agent, make_config())
    assert proc.returncode == 0, proc.stderr
    assert out["role"] == "scheduler"
    by = {s["source"]: s for s in out["sources"]}
    assert by["IMDS tag airflow:role"]["role"] == "scheduler"


def test_describe_tags_when_metadata_tags_are_off(run_agent, make_config, instance, aws):
    iid, ec2 = instance
    ec2.create_tags(Resources=[iid], Tags=[{"Key": "airflow:role", "Value": "worker"}])
    proc, out = role_of(run_agent, make_config())
    assert proc.returncode == 0, proc.stderr
    assert out["role"] == "worker"
    assert {s["source"]: s["role"] for s in out["sources"]}["DescribeTags airflow:role"] == "worker"
    assert aws.calls("DescribeTags")


def test_custom_tag_key(run_agent, make_config, instance, imds):
    imds.set_tags({"team:airflow-role": "webserver"})
    proc, out = role_of(run_agent, make_config({"role": {"tag": "team:airflow-role"}}))
    assert (proc.returncode, out["role"]) == (0, "webserver"), proc.stderr


def test_group_map_from_asg_name(run_agent, make_config, instance):
    iid, ec2 = instance
    ec2.create_tags(
        Resources=[iid], Tags=[{"Key": "aws:autoscaling:groupName", "Value": "prod-Workers-1A2B"}]
    )
    cfg = make_config({"role": {"groups": {"*-Scheduler-*": "scheduler", "*-Workers-*": "worker"}}})
    proc, out = role_of(run_agent, cfg)
    assert (proc.returncode, out["role"]) == (0, "worker"), proc.stderr
    src = {s["source"]: s for s in out["sources"]}["role.groups[Auto Scaling group]"]
    assert "matches '*-Workers-*'" in src["detail"]


def test_group_map_from_logical_id(run_agent, make_config, instance, imds):
    imds.set_tags({"aws:cloudformation:logical-id": "WebserverGroup"})
    cfg = make_config({"role": {"groups": {"Webserver*": "webserver"}}})
    proc, out = role_of(run_agent, cfg)
    assert (proc.returncode, out["role"]) == (0, "webserver"), proc.stderr


def test_conflicting_sources_fail_with_the_list(run_agent, make_config, instance, imds):
    imds.set_tags({"airflow:role": "worker"})
    proc = run_agent(make_config(), "role", "--role", "scheduler")
    assert proc.returncode == 3
    err = proc.stderr
    assert "disagree" in err and "--role: 'scheduler'" in err
    assert "IMDS tag airflow:role: 'worker'" in err and "DescribeTags airflow:role: absent" in err


def test_tag_naming_no_role_is_refused(run_agent, make_config, instance, imds):
    imds.set_tags({"airflow:role": "gardener"})
    proc = run_agent(make_config(), "role")
    assert proc.returncode == 3
    assert "'gardener', which is not a role" in proc.stderr


def test_no_source_fails_with_every_source_listed(run_agent, make_config, instance):
    proc = run_agent(make_config(), "role", "--apply")
    assert proc.returncode == 1
    for source in (
        "--role: not given",
        "$AIRFLOW_AGENT_ROLE: not set",
        "role.override: null",
        "IMDS tag airflow:role",
        "DescribeTags airflow:role: absent",
        "role.groups[Auto Scaling group]: role.groups is empty",
    ):
        assert source in proc.stderr, proc.stderr


def test_unreachable_imds_is_reported_not_fatal_when_another_source_answers(
    run_agent, make_config, aws, imds
):
    proc = run_agent(
        make_config({"imds": {"attempts": 1, "timeout": 0.5}}),
        "role",
        "--json",
        "--role",
        "worker",
        env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9/"},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    by = {s["source"]: s for s in out["sources"]}
    assert "unreachable" in by["IMDS tag airflow:role"]["detail"]
    assert out["role"] == "worker"


# -- --apply on a real systemd --------------------------------------------------------------------


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server):
    with SystemdHost(tmp_path_factory.mktemp("role-host"), name="aea-role") as h:
        ah.prepare(h, aws_server, imds_server)
        # an env file so the Airflow stand-ins can start (no SSM needed for this test)
        h.write_file(
            "/etc/sysconfig/airflow.env",
            'AIRFLOW_HOME="/airflow"\n',
            mode=0o640,
            owner="root:airflow",
        )
        # airflow-agent-env would sync from SSM: make it a no-op here
        h.write_file(
            "/etc/systemd/system/airflow-agent-env.service.d/50-test.conf",
            "[Service]\nExecStart=\nExecStart=/bin/true\n",
        )
        h.systemctl("daemon-reload")
        yield h


ALL = sorted(
    set(ah.AIRFLOW_UNITS)
    | {
        "airflow-agent-env",
        "airflow-agent-confapply",
        "airflow-agent-lifecycle",
        "airflow-agent-variables.timer",
    }
)


def enabled(host):
    return sorted(
        u for u in ALL if host.systemctl("is-enabled", u, check=False).stdout.strip() == "enabled"
    )


def active(host):
    return sorted(
        u for u in ALL if host.systemctl("is-active", u, check=False).stdout.strip() == "active"
    )


@pytest.mark.systemd
def test_apply_leaves_exactly_the_roles_units_enabled(host, aws_server, imds_server):
    imds_server.reset()
    ah.agent(host, aws_server, imds_server, "role", "--apply", "--role", "scheduler")
    sched = sorted(
        [
            "airflow-agent-env",
            "airflow-agent-confapply",
            "airflow-agent-variables.timer",
            "airflow-scheduler",
            "airflow-dag-processor",
            "airflow-triggerer",
        ]
    )
    assert enabled(host) == sched
    assert active(host) == sched
    assert json.loads(host.read_file("/var/lib/airflow-agent/role.json"))["role"] == "scheduler"

    # the instance becomes a worker: scheduler units stopped and disabled, shared ones kept.
    # It has a revision (no worker record yet: the marker makes it "running", so it starts;
    # tests/test_boot_gate_systemd.py covers the fresh and terminating cases)
    host.write_file("/airflow/.deployed-revision", "d-1\n")
    pid = host.main_pid("airflow-agent-confapply")
    ah.agent(host, aws_server, imds_server, "role", "--apply", "--role", "worker")
    worker = sorted(
        [
            "airflow-agent-env",
            "airflow-agent-confapply",
            "airflow-agent-lifecycle",
            "airflow-worker",
        ]
    )
    assert enabled(host) == worker
    assert "airflow-scheduler" not in active(host)
    assert "airflow-worker" in active(host)
    assert host.main_pid("airflow-agent-confapply") == pid  # shared unit left running
    assert json.loads(host.read_file("/var/lib/airflow-agent/role.json"))["role"] == "worker"
    # the running confapply follows the switch: a change now restarts the worker's unit
    host.wait_active("airflow-worker")
    wpid = host.main_pid("airflow-worker")
    host.write_file(
        "/etc/sysconfig/airflow.env",
        'AIRFLOW_HOME="/airflow"\nX="after-switch"\n',
        mode=0o640,
        owner="root:airflow",
    )
    host.wait_for(
        lambda: host.main_pid("airflow-worker") not in (0, wpid),
        20,
        "confapply to restart airflow-worker after the role switch",
    )


@pytest.mark.systemd
def test_apply_with_a_conflict_enables_nothing(host, aws_server, imds_server):
    imds_server.set_tags({"airflow:role": "worker"})
    try:
        before = enabled(host)
        proc = ah.agent(
            host, aws_server, imds_server, "role", "--apply", "--role", "webserver", check=False
        )
        assert proc.returncode == 3, proc.stderr
        assert "disagree" in proc.stderr
        assert enabled(host) == before
        assert "airflow-api-server" not in active(host)
    finally:
        imds_server.reset()
