"""A worker configured the template's way drains: only `AIRFLOW__CELERY__BROKER_URL_SECRET`.

Nothing here is a hand-written copy of the template's configuration: the SSM parameters are the
template's own `AWS::SSM::Parameter` resources (names and values resolved by
sandbox/cfn_template.py), created in the embedded AWS; the agent.yaml is the worker role's file
from the template's `AWS::CloudFormation::Init` (only paths, the node name and the systemctl
stand-in changed for the rig); the env file is written by the real `airflow-agent env sync` from
those parameters; the broker URL lives in Secrets Manager under the template's `BrokerUrlSecret`
name. Only the secret's *value* is the rig's: a real redis-server with a password, and a real
Celery worker (acks_late, prefetch 1, as Airflow runs it).

Then the real CLI drains that worker with tasks in flight: the agent reads the secret through
the backend settings in the env file (one GetSecretValue of the template's secret id), the
running tasks finish, nothing is lost, and the broker password appears in no output or state.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

import pytest
import yaml

from agent.config import load_config
from agent.errors import AgentError
from agent.jobs.drain.broker import read_broker
from agent.jobs.drain.control import worker_control
from agent.platform.envfile import parse_env
from sandbox.lifecycle import FAKE_SYSTEMCTL, QUEUE, CeleryWorker, wait_until
from sandbox.redis_server import RedisServer
from tests.test_cloudformation import INIT_RESOURCE, STACK

pytestmark = pytest.mark.timeout(240)

WORKER_YAML = "/etc/airflow-agent/roles/worker.yaml"
PASSWORD = "pw-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def redis():
    r = RedisServer().start()
    r.cli("CONFIG", "SET", "requirepass", PASSWORD)
    yield r
    r.stop()


def broker_url(redis) -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0"


def template_resources(template, rtype: str):
    return {k: v for k, v in template["Resources"].items() if v["Type"] == rtype}


def seed_template_aws(aws, template, resolver, redis) -> str:
    """The template's SSM parameters and its broker URL secret (value: the rig's Redis)."""
    ssm = aws.client("ssm")
    for res in template_resources(template, "AWS::SSM::Parameter").values():
        props = resolver.resolve(res["Properties"])
        ssm.put_parameter(Name=props["Name"], Value=str(props["Value"]), Type=props["Type"])
    secret = resolver.resolve(template["Resources"]["BrokerUrlSecret"]["Properties"])
    aws.client("secretsmanager").create_secret(Name=secret["Name"], SecretString=broker_url(redis))
    return secret["Name"]


def worker_agent_yaml(template, resolver, tmp_path: Path, node: str, pidfile: Path) -> Path:
    """The worker role's agent.yaml as the template writes it, pointed at the rig."""
    init = resolver.resolve(template["Resources"][INIT_RESOURCE]["Metadata"])
    files = init["AWS::CloudFormation::Init"]["configure"]["files"]
    data = yaml.safe_load(files[WORKER_YAML]["content"])
    data["state_dir"] = str(tmp_path / "state")
    data["airflow_home"] = str(tmp_path / "airflow")
    data["env"].update(file=str(tmp_path / "sysconfig" / "airflow.env"), owner="root", group="root")
    data["systemctl"] = [sys.executable, str(FAKE_SYSTEMCTL), "--pidfile", str(pidfile)]
    data.setdefault("drain", {}).update(node_name=node, poll_interval=0.5, reply_timeout=10.0)
    data["airflow_config"] = {"command_user": "nobody"}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_drain_with_only_the_templates_secret_form(
    aws, template, resolver, redis, tmp_path, run_agent, monkeypatch
):
    secret_id = seed_template_aws(aws, template, resolver, redis)
    assert secret_id == f"airflow/{STACK}/config/broker_url"
    node = f"sf{int(time.time() * 1000) % 10**8}@testhost"
    pidfile = tmp_path / "worker.pid"
    config = worker_agent_yaml(template, resolver, tmp_path, node, pidfile)

    sync = run_agent(config, "env", "sync")
    assert sync.returncode == 0, sync.stderr
    env = parse_env((tmp_path / "sysconfig" / "airflow.env").read_bytes())
    # the template's worker env: the _SECRET form and the backend, never a plain URL
    assert "AIRFLOW__CELERY__BROKER_URL" not in env
    assert env["AIRFLOW__CELERY__BROKER_URL_SECRET"] == "broker_url"
    assert env["AIRFLOW__SECRETS__BACKEND"].endswith(".SecretsManagerBackend")
    assert json.loads(env["AIRFLOW__SECRETS__BACKEND_KWARGS"])["config_prefix"] == (
        f"airflow/{STACK}/config"
    )

    worker = CeleryWorker(broker_url(redis), node, tmp_path / "marks", tmp_path / "worker.log")
    worker.start()
    try:
        pidfile.write_text(str(worker.pid))
        # the deploy hook's and lifecycle's door: a ping through the secret form
        for k, v in aws.client_env().items():
            monkeypatch.setenv(k, v)
        aws.clear_calls()
        cfg = load_config(str(config))
        with worker_control(cfg) as control:
            assert control.ping()
        with worker_control(cfg) as control:  # lifecycle's next poll: the cached settings
            assert control.busy() == (0, 0)
        # one read (of the only secret, which holds the URL that answered), then the cache
        assert len(aws.calls("GetSecretValue")) == 1

        worker.send("t1", 3)
        worker.send("t2", 3)
        wait_until(lambda: worker.marks("t1", "start") and worker.marks("t2", "start"), 20, "tasks")
        drain = run_agent(config, "drain", "--json")
        assert drain.returncode == 0, drain.stderr
        result = json.loads(drain.stdout)
        assert result["outcome"] == "drained", result
        assert result["queues"] == [QUEUE]
        assert not worker.alive()
        for tag in ("t1", "t2"):
            assert len(worker.marks(tag, "start")) == len(worker.marks(tag, "end")) == 1
    finally:
        worker.stop()

    shown = sync.stdout + sync.stderr + drain.stdout + drain.stderr
    stored = "".join(p.read_text() for p in (tmp_path / "state").rglob("*") if p.is_file())
    assert PASSWORD not in shown + stored + (tmp_path / "sysconfig" / "airflow.env").read_text()


def test_a_secret_the_backend_cannot_find_is_an_error_naming_it(
    aws, template, resolver, redis, tmp_path, run_agent, monkeypatch
):
    secret_id = seed_template_aws(aws, template, resolver, redis)
    aws.client("secretsmanager").delete_secret(SecretId=secret_id, ForceDeleteWithoutRecovery=True)
    config = worker_agent_yaml(template, resolver, tmp_path, "none@testhost", tmp_path / "p")
    assert run_agent(config, "env", "sync").returncode == 0
    for k, v in aws.client_env().items():
        monkeypatch.setenv(k, v)
    with pytest.raises(AgentError) as err:
        read_broker(load_config(str(config)))
    assert "AIRFLOW__CELERY__BROKER_URL_SECRET" in str(err.value)
    assert secret_id in str(err.value)
