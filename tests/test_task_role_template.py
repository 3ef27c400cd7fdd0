"""The template's task role (issue 12 item 5), read as CloudFormation resolves it.

Airflow's processes and their tasks act as a role of their own, never as the instance: the
agent (root, instance role) assumes the role each instance's agent.yaml names
(task_credentials.role_arn) and Airflow's units, which cannot reach IMDS, read its credentials.
Checked on the template itself (sandbox/cfn_template.py Resolver, tests/test_cloudformation.py
helpers), never a hand copy:
- every role's agent.yaml names a task role of this stack, and the agent accepts the section;
- each grants only what Airflow itself needs (iam_actions.task_role_actions(): config secrets,
  remote logs), nothing of the instance roles' Auto Scaling, SSM or STS powers; the worker's
  cannot read the master database connection secret (tasks run in the worker's unit);
- none is an instance's profile, no service can assume one, sessions fit the agent's 1 h;
- each instance role may sts:AssumeRole exactly its own role's task role.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from agent.jobs.task_credentials.config import TaskCredentialsConfig, check_task_credentials
from agent.platform.iam_actions import task_role_actions
from sandbox.cfn_template import as_list, statements
from tests.test_cloudformation import (
    agent_yaml,
    resources_of_type,
)

ROLES = ("scheduler", "webserver", "worker")


def _role_arn_by_logical_id(template, resolver) -> Dict[str, str]:
    return {
        name: resolver.get_att(name, "Arn")
        for name in resources_of_type(template, "AWS::IAM::Role")
    }


@pytest.fixture(scope="module")
def task_roles(template, resolver) -> Dict[str, str]:
    """role -> logical id of the task role its agent.yaml names (an IAM role of the template)."""
    by_arn = {}
    for logical_id, arn in _role_arn_by_logical_id(template, resolver).items():
        by_arn.setdefault(arn, []).append(logical_id)
    out = {}
    for role in ROLES:
        section = agent_yaml(template, resolver, role).get("task_credentials") or {}
        assert section.get("role_arn"), f"{role}: agent.yaml names no task role"
        assert check_task_credentials(TaskCredentialsConfig(**section)) is None, role
        ids = by_arn.get(section["role_arn"], [])
        assert len(ids) == 1, f"{role}: {section['role_arn']} is not one IAM role of the template"
        out[role] = ids[0]
    return out


def _policy_statements(template, resolver, logical_id: str) -> List[Dict[str, Any]]:
    props = template["Resources"][logical_id]["Properties"]
    out = []
    for policy in props.get("Policies", []):
        out += statements(resolver.resolve(policy["PolicyDocument"]))
    assert not props.get("ManagedPolicyArns"), f"{logical_id}: managed policies are not checked"
    return out


def _instance_roles(template) -> List[str]:
    """The roles an instance profile carries."""
    out = []
    for profile in resources_of_type(template, "AWS::IAM::InstanceProfile").values():
        for ref in profile["Properties"]["Roles"]:
            out.append(ref["Ref"])
    return out


@pytest.mark.parametrize("role", ROLES)
def test_the_task_role_grants_only_what_airflow_needs(template, resolver, task_roles, role):
    task_role = task_roles[role]
    allowed = task_role_actions()
    granted = set()
    resources = set()
    for st in _policy_statements(template, resolver, task_role):
        assert st["Effect"] == "Allow"
        actions = set(as_list(st["Action"]))
        assert actions <= allowed, f"{task_role} {st.get('Sid')}: {actions - allowed}"
        assert "*" not in as_list(st["Resource"]), f"{task_role} {st.get('Sid')}: Resource *"
        granted |= actions
        if "secretsmanager:GetSecretValue" in actions:
            resources |= set(as_list(st["Resource"]))
    # the point of the role: nothing of what makes an instance an instance
    for prefix in ("autoscaling:", "ssm:", "sts:", "ec2:", "iam:", "codedeploy:"):
        assert not [a for a in granted if a.startswith(prefix)], prefix
    assert "secretsmanager:GetSecretValue" in granted  # Airflow's *_secret config options
    master = [r for r in resources if "/config/sql_alchemy_conn-" in r]
    if role == "worker":
        # tasks run in the worker's unit: its role must not reach the master connection
        assert master == [], f"{task_role} reads the master database URL"


def test_the_task_roles_are_no_instance_profile_and_no_service_assumes_them(
    template, resolver, task_roles
):
    for task_role in set(task_roles.values()):
        assert task_role not in _instance_roles(template)
        props = template["Resources"][task_role]["Properties"]
        for st in statements(resolver.resolve(props["AssumeRolePolicyDocument"])):
            assert "Service" not in st.get("Principal", {}), st
            assert as_list(st["Action"]) == ["sts:AssumeRole"]
        # role chaining caps a session at 1 h; the agent asks for task_credentials.duration
        assert props.get("MaxSessionDuration", 3600) >= TaskCredentialsConfig().duration


@pytest.mark.parametrize("role", ROLES)
def test_each_instance_role_may_assume_its_task_role_only(template, resolver, task_roles, role):
    arn = resolver.get_att(task_roles[role], "Arn")
    profile_roles = set(_instance_roles(template))
    assert len(profile_roles) == 3
    instance_roles = [r for r in profile_roles if role in r.lower()]
    assert len(instance_roles) == 1, (role, profile_roles)
    assumes = [
        st
        for st in _policy_statements(template, resolver, instance_roles[0])
        if "sts:AssumeRole" in as_list(st["Action"])
    ]
    assert len(assumes) == 1, assumes
    assert as_list(assumes[0]["Resource"]) == [arn]
    assert assumes[0]["Effect"] == "Allow" and "Condition" not in assumes[0]
