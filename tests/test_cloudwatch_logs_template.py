"""The instances' service logs in CloudWatch Logs (issue 14 item 2), read from the template.

Checked on the template as CloudFormation resolves it (sandbox/cfn_template.py Resolver,
tests/test_cloudformation.py helpers), against the agent's own role -> units plan
(agent.jobs.role.plan_units with each role's agent.yaml from the template):
- each role's CloudWatch agent configuration ships exactly the journals of the units the
  agent enables for that role (a timer's through its service), so a unit added to a role and
  not to its logs configuration fails here;
- the log groups the configurations name are exactly the template's AWS::Logs::LogGroup
  resources, each kept CloudWatchLogRetentionDays (a parameter of CloudWatch Logs' valid
  values, distinct from the S3 bucket's LogRetentionDays);
- each instance role may write streams and events to those groups and nothing else of Logs;
- the pure reader (sandbox/stack/cloudwatch_config.py) refuses what is not such a config;
- the cfn-hup hook re-applies the CloudWatch agent only when an update changed its config.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import List

import pytest

from agent.config import DEFAULT_UNITS, ROLES, config_from_dict
from sandbox.cfn_init import configset_files
from sandbox.cfn_template import as_list, statements
from sandbox.stack import cfn_init_apply
from sandbox.stack.cloudwatch_config import (
    expected_units,
    journal_unit,
    role_config_path,
    shipped,
)
from tests.test_cloudformation import (
    LOGICAL,
    agent_yaml,
    init_file,
    init_of,
    resources_of_type,
    unit_file,
)

# RetentionInDays values CloudWatch Logs accepts (PutRetentionPolicy, AWS::Logs::LogGroup)
VALID_RETENTION = [
    1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731,
    1096, 1827, 2192, 2557, 2922, 3288, 3653,
]  # fmt: skip
FILES = {
    # cfn-init's logs (the sandbox's cfn-init writes the same two) and cfn-hup's
    cfn_init_apply.LOG,
    cfn_init_apply.CMD_LOG,
    "/var/log/cfn-hup.log",
    # the CodeDeploy agent's own log and its deployments' hook output
    "/var/log/aws/codedeploy-agent/codedeploy-agent.log",
    "/opt/codedeploy-agent/deployment-root/deployment-logs/codedeploy-agent-deployments.log",
}


def role_logs(template, resolver, role: str) -> str:
    """The role's CloudWatch agent configuration, resolved (written by the update configSet)."""
    return init_file(template, resolver, "update", role_config_path(role))


def role_cfg(template, resolver, role: str):
    return config_from_dict(agent_yaml(template, resolver, role), source=f"{role} agent.yaml")


@pytest.mark.parametrize("role", ROLES)
def test_each_role_ships_exactly_the_journals_of_the_units_the_agent_enables(
    template, resolver, role
):
    logs = shipped(role_logs(template, resolver, role), source=role)
    want = expected_units(role_cfg(template, resolver, role), role)
    assert sorted(logs.units) == sorted(want)
    assert len(set(logs.units)) == len(logs.units), "a unit shipped twice"
    # the role's Airflow units and its agent units are all there; nothing of another role's
    for unit in DEFAULT_UNITS[role]:
        assert f"{unit}.service" in logs.units
    for other in set(ROLES) - {role}:
        for unit in DEFAULT_UNITS[other]:
            assert f"{unit}.service" not in logs.units, (role, unit)
    # every unit shipped is one systemd/install-units.sh installs
    for unit in logs.units:
        assert unit_file(unit).is_file(), f"{role}: no unit file for {unit} in systemd/"
    assert set(logs.files) == FILES


@pytest.mark.parametrize("role", ROLES)
def test_a_unit_added_to_a_role_but_not_to_its_logs_is_caught(template, resolver, role):
    doc = agent_yaml(template, resolver, role)
    doc["units"] = {role: DEFAULT_UNITS[role] + ["airflow-extra"]}
    cfg = config_from_dict(doc, source="changed agent.yaml")
    logs = shipped(role_logs(template, resolver, role), source=role)
    assert set(expected_units(cfg, role)) - set(logs.units) == {"airflow-extra.service"}


def test_timers_ship_through_the_service_they_trigger():
    assert journal_unit("airflow-agent-variables.timer") == "airflow-agent-variables.service"
    assert journal_unit("airflow-worker") == "airflow-worker.service"
    # the template's timers trigger the service of their own name (no Unit= override)
    for timer in unit_file("airflow-agent-variables.timer").parent.glob("*.timer"):
        assert "\nUnit=" not in timer.read_text(encoding="utf-8"), timer.name


def test_the_log_groups_named_are_the_templates_with_the_retention_parameter(template, resolver):
    groups = resources_of_type(template, "AWS::Logs::LogGroup")
    assert groups
    named = set()
    for role in ROLES:
        named |= shipped(role_logs(template, resolver, role), source=role).groups
    assert named == {resolver.ref(rid) for rid in groups}
    for rid, res in groups.items():
        assert res["Properties"]["RetentionInDays"] == {"Ref": "CloudWatchLogRetentionDays"}, rid
    spec = template["Parameters"]["CloudWatchLogRetentionDays"]
    assert [int(v) for v in spec["AllowedValues"]] == VALID_RETENTION
    assert int(spec["Default"]) in VALID_RETENTION
    # the S3 task-log bucket keeps its own, separately described
    bucket = template["Parameters"]["LogRetentionDays"]["Description"]
    assert "S3" in bucket and "CloudWatchLogRetentionDays" in bucket
    assert "LogRetentionDays" in spec["Description"]


@pytest.mark.parametrize("role", ROLES)
def test_each_instance_role_writes_to_the_log_groups_only(template, resolver, role):
    props = template["Resources"][f"{LOGICAL[role]}Role"]["Properties"]
    logs = [
        st
        for p in props["Policies"]
        for st in statements(resolver.resolve(p["PolicyDocument"]))
        if any(a.startswith("logs:") for a in as_list(st["Action"]))
    ]
    assert len(logs) == 1, logs
    (st,) = logs
    assert st["Sid"] == "ServiceLogs"
    assert sorted(as_list(st["Action"])) == [
        "logs:CreateLogStream",
        "logs:DescribeLogStreams",
        "logs:PutLogEvents",
    ]
    arns = {
        resolver.get_att(rid, "Arn") for rid in resources_of_type(template, "AWS::Logs::LogGroup")
    }
    assert set(as_list(st["Resource"])) == arns
    assert all(a.endswith(":*") and ":log-group:/airflow/" in a for a in arns)


@pytest.mark.parametrize("role", ROLES)
def test_the_role_config_starts_the_cloudwatch_agent_after_linking_agent_yaml(template, role):
    init = init_of(template)
    files = configset_files(init, role)
    # the role's file is written by the shared configure (updates rewrite it in place) ...
    assert files[role_config_path(role)][0] == "configure"
    # ... and applied by the role's config, first, once agent.yaml names the role
    first = sorted(init[role]["commands"])[0]
    assert init[role]["commands"][first]["command"] == "/usr/local/sbin/airflow-cloudwatch-agent"
    assert "amazon-cloudwatch-agent" in init["install"]["packages"]["yum"]


def test_the_reader_refuses_what_is_not_a_logs_configuration():
    good = {
        "logs": {
            "logs_collected": {
                "journald": {"collect_list": [{"log_group_name": "g", "units": ["a.service"]}]},
                "files": {"collect_list": [{"log_group_name": "h", "file_path": "/var/log/x"}]},
            }
        }
    }
    got = shipped(json.dumps(good))
    assert got.units == ["a.service"] and got.files == ["/var/log/x"] and got.groups == {"g", "h"}
    with pytest.raises(ValueError, match="cfg.json: not a CloudWatch agent logs configuration"):
        shipped("{", source="cfg.json")
    with pytest.raises(ValueError, match="not a CloudWatch agent"):
        shipped(json.dumps({"agent": {}}))
    no_group = json.loads(json.dumps(good))
    del no_group["logs"]["logs_collected"]["files"]["collect_list"][0]["log_group_name"]
    with pytest.raises(ValueError, match=r"files\.collect_list\[0\] has no log_group_name"):
        shipped(json.dumps(no_group))
    no_units = json.loads(json.dumps(good))
    no_units["logs"]["logs_collected"]["journald"]["collect_list"][0]["units"] = []
    with pytest.raises(ValueError, match="has no units"):
        shipped(json.dumps(no_units))
    other = json.loads(json.dumps(good))
    other["logs"]["logs_collected"]["windows_events"] = {}
    with pytest.raises(ValueError, match="windows_events"):
        shipped(json.dumps(other))


def test_the_cfn_hup_hook_reapplies_the_cloudwatch_agent_only_when_its_config_changed(
    template, resolver, tmp_path
):
    """The hook script as the template writes it, with stand-ins for cfn-init (which may change
    a role's CloudWatch configuration), systemctl, the agent and the apply script."""
    action = "/usr/local/sbin/airflow-agent-cfn-update"
    script = init_file(template, resolver, "update", action)
    calls = tmp_path / "calls"
    confdir = tmp_path / "airflow-roles"
    confdir.mkdir()
    (confdir / "worker.json").write_text("{}\n")
    agent_yaml_file = tmp_path / "agent.yaml"
    agent_yaml_file.write_text("cluster: a\n")
    stubs = {
        # an update that changes the worker's CloudWatch configuration, when asked to
        "/opt/aws/bin/cfn-init": '[ -z "$CHANGE_LOGS" ] || echo changed > "{dir}/worker.json"',
        "/usr/local/bin/airflow-agent": "",
        "/usr/local/sbin/airflow-cloudwatch-agent": "",
        "systemctl": "",
    }
    for real, extra in stubs.items():
        stub = tmp_path / real.rsplit("/", 1)[-1]
        body = f'#!/bin/sh\necho "{stub.name} $*" >> "{calls}"\n' + extra.replace(
            "{dir}", str(confdir)
        )
        stub.write_text(body + "\n")
        stub.chmod(0o755)
        assert real in script, real
        script = script.replace(real, str(stub))
    script = script.replace("/opt/aws/amazon-cloudwatch-agent/etc/airflow-roles", str(confdir))
    script = script.replace("/etc/airflow-agent/agent.yaml", str(agent_yaml_file))
    hook = tmp_path / "hook.sh"
    hook.write_text(script)

    def run(**env: str) -> List[str]:
        if calls.exists():
            calls.unlink()
        proc = subprocess.run(
            ["sh", str(hook)],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, **env),
        )
        assert proc.returncode == 0, proc.stderr
        return [c.split()[0] for c in calls.read_text().splitlines()]

    # nothing of the CloudWatch configuration changed: the agent is left alone
    assert run() == ["cfn-init", "airflow-agent"]
    # a role's configuration changed: re-applied, before env sync
    assert run(CHANGE_LOGS="1") == ["cfn-init", "airflow-cloudwatch-agent", "airflow-agent"]
