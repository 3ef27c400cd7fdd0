"""A worker instance built by the template itself (sandbox/stack/instance.py), on the link.

The stack's AWS resources are created from the template (create_in_aws), the agent package is in
the artifact bucket, the database (schema migrated and the workers' own user created, as the
scheduler group's first boot does) and the broker stand-ins run on the link, and the worker's
IMDS serves credentials of the template's worker role, whose policies the embedded AWS enforces.
Then the worker launch template's UserData runs: the sandbox's cfn-init applies the `worker`
configSet. Checked: cfn-signal 0; every file of the configSet has its resolved content, mode,
owner and group (the agent.yaml link points at the worker's file); cfn-hup is enabled and
running as the Init's services say; the role's unit is enabled (and held by the boot gate until
a deployment); the package came from the bucket with the role's credentials; no broker URL in
the env file; no AccessDenied. Then a stack update (ConfigRevision) goes through cfn-hup's hook:
the roles' files are rewritten.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from agent.jobs.worker_db.plan import SETUP_SCRIPT, grant_statements
from sandbox.airflow_cluster import AIRFLOW_VENV
from sandbox.aws_server import AwsServer
from sandbox.cfn_init import configset_files, is_symlink
from sandbox.imds_server import ImdsServer
from sandbox.stack.aws_resources import create_in_aws
from sandbox.stack.instance import Instance, agent_package
from sandbox.stack.model import StackModel
from sandbox.stack.network import GATEWAY, Switch
from sandbox.stack.standins import Broker, Postgres
from sandbox.stack.tls import SandboxCa

pytestmark = [pytest.mark.systemd, pytest.mark.airflow, pytest.mark.aws, pytest.mark.redis]


def _upload_agent_package(model: StackModel, aws: AwsServer) -> None:
    s3 = aws.client("s3")
    bucket, key = model.parameters["ArtifactBucket"], model.parameters["AgentPackageKey"]
    if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=agent_package())


def _scheduler_first_boot(model: StackModel, switch: Switch, tmp: Path) -> None:
    """What the scheduler group's first boot does to the database before any worker starts:
    `airflow db migrate`, then the workers' own user (the agent's `worker-db-user` setup
    script, with the template's WorkerDbSecret), both with the master URL, on the link."""
    url = model.properties("DbConnSecret")["SecretString"]
    master = url.replace(model.endpoint_host("Database"), GATEWAY)
    env = {
        "PATH": os.environ["PATH"],
        "AIRFLOW_HOME": str(tmp / "airflow-home"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": master,
    }
    p = subprocess.run(
        switch.argv([str(AIRFLOW_VENV / "bin" / "airflow"), "db", "migrate"]),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    if "WorkerDbSecret" not in model.resources:
        return  # a template whose workers use the master URL
    creds = json.loads(model.secret_values[model.ref("WorkerDbSecret")])
    request = {
        "url": master,
        "user": creds["username"],
        "password": creds["password"],
        "grants": grant_statements(creds["username"]),
    }
    p = subprocess.run(
        switch.argv([str(AIRFLOW_VENV / "bin" / "python"), "-c", SETUP_SCRIPT]),
        input=json.dumps(request),
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]


def _imds_for(model: StackModel, aws: AwsServer, imds: ImdsServer) -> None:
    group = model.ref(model.group_for("worker"))
    asg = aws.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[group])
    instance_id = asg["AutoScalingGroups"][0]["Instances"][0]["InstanceId"]
    role = model.instance_role_for("worker")
    imds.set_role_credentials(role, aws.issue_credentials(role, session=instance_id))
    imds.set(**{"meta-data/instance-id": instance_id})
    imds.set_tags({"aws:autoscaling:groupName": group, "airflow:role": "worker"})


def test_a_worker_built_by_the_templates_user_data(tmp_path: Path) -> None:
    model = StackModel.load(workers=1)
    ca = SandboxCa(tmp_path / "ca").create()
    with AwsServer() as aws, ImdsServer() as imds, Switch() as switch:
        create_in_aws(model, aws)
        _upload_agent_package(model, aws)
        _imds_for(model, aws, imds)
        aws_at = switch.forward(aws.port)
        with Postgres.from_model(model, switch, ca), Broker.from_model(model, switch, ca):
            _scheduler_first_boot(model, switch, tmp_path)
            with Instance("aea-worker-1", "worker", model, switch, aws_at, imds, ca) as w:
                h = w.host
                assert h is not None
                assert w.signals()[-1].split()[:2] == ["-e", "0"], w.signals()
                init = model.init_metadata("worker")
                for path, (_config, attrs) in configset_files(init, "worker").items():
                    if is_symlink(attrs):
                        assert h.run(["readlink", path]).stdout.strip() == attrs["content"]
                        continue
                    assert h.read_file(path).decode() == attrs["content"], path
                    got = h.run(["stat", "-c", "%a %U %G", path]).stdout.split()
                    want = [format(int(attrs["mode"], 8) & 0o7777, "o"), attrs["owner"],
                            attrs["group"]]  # fmt: skip
                    assert got == want, path
                assert h.systemctl("is-enabled", "cfn-hup.service").stdout.strip() == "enabled"
                assert h.systemctl("is-active", "cfn-hup.service").stdout.strip() == "active"
                # the role's unit: enabled by bootstrap, not started until a revision is
                # deployed (the boot gate: docs/design.md, "Workers start only with a
                # deployed revision")
                unit = "airflow-worker.service"
                assert h.systemctl("is-enabled", unit).stdout.strip() == "enabled"
                assert h.systemctl("is-active", unit, check=False).stdout.strip() == "inactive"
                log = w.cfn_init_log()
                for sub in ("agent from the wheelhouse", "prebuilt Airflow venv",
                            "no CodeDeploy agent download"):  # fmt: skip
                    assert f"sandbox substitution '{sub}'" in log
                assert "Command 05-agent-package rc 0" in log  # aws s3 cp, as written
                env = h.read_file("/etc/sysconfig/airflow.env").decode()
                assert "redis://" not in env and "rediss://" not in env
                assert aws.denials() == []
                # (dbus's own org.freedesktop.DBus.Error.AccessDenied at boot is not AWS's)
                assert not re.search(r"(?<!DBus\.Error\.)AccessDenied", h.journal())

                # a stack update through cfn-hup's hook
                model.parameters["ConfigRevision"] = "sandbox-2"
                result = w.apply_update(model)
                assert result["rc"] == 0
                text = h.read_file("/etc/airflow-agent/roles/worker.yaml").decode()
                assert "# config revision: sandbox-2" in text
    ca.remove()
