"""Issue 11 acceptance: a copy of the template without one statement the stack needs (the
worker instance role's read of the broker URL secret) is launched, and it fails at the step
that needs it, with AccessDenied naming the action and the resource.

The step: a CodeDeploy deployment's worker hooks, where the agent (as root, with the instance
role's credentials) resolves the broker URL through the secrets backend to start and ping the
worker. The smallest stack that has it: one scheduler, one api-server, one worker.
"""

from __future__ import annotations

import pytest
import yaml

from sandbox.cfn_template import load_template
from sandbox.stack.launch import Stack
from sandbox.stack.model import TEMPLATE
from sandbox.stack.scenario import deploy_everywhere, revision

pytestmark = [pytest.mark.systemd, pytest.mark.airflow, pytest.mark.aws, pytest.mark.redis]


def test_without_the_workers_broker_secret_grant_the_deployment_fails_with_access_denied(
    tmp_path,
):
    template = load_template(TEMPLATE)
    policy = template["Resources"]["WorkerRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    for stmt in policy["Statement"]:
        resources = stmt.get("Resource")
        if isinstance(resources, list) and {"Ref": "BrokerUrlSecret"} in resources:
            resources.remove({"Ref": "BrokerUrlSecret"})
    copy = tmp_path / "airflow-cluster.yaml"
    copy.write_text(yaml.safe_dump(template, sort_keys=False))
    one = {"WebserverCount": "1"}
    with Stack(copy, workers=1, run_dir=tmp_path / "run", extra=one) as stack:
        deps = deploy_everywhere(stack, revision(tmp_path / "v1", "v1"), "d-V1")
        (worker,) = stack.role_members("worker")
        failed = deps[worker.name]
        assert not failed.succeeded
        secret = stack.model.ref("BrokerUrlSecret")
        role = stack.model.instance_role_for("worker")
        assert failed.failed is not None
        assert "AccessDenied" in failed.failed.output, failed.failed.output[-3000:]
        assert "secretsmanager:GetSecretValue" in failed.failed.output
        assert secret in failed.failed.output
        refusals = [(d["role"], d["action"], d["resource"]) for d in stack.aws.denials()]
        assert (role, "secretsmanager:GetSecretValue", secret) in refusals
        # every other instance deployed fine: the only refusals are of that one grant
        assert {r for r in refusals if r[0] != role or r[2] != secret} == set()
