"""The worker boot gate end to end on a real systemd, the agent installed as cfn-init does
(sandbox/agent_host.py: real unit files, stand-in Airflow processes):

- a fresh worker (no CodeDeploy revision yet) is bootstrapped with airflow-worker enabled but
  not started, and only CodeDeploy's ApplicationStart (`deploy-hook ApplicationStart`, as the
  appspec hook runs it) starts it;
- an instance in a warm pool (`Warmed:*` target state) is held even with a revision on disk,
  and starts once it is InService.
"""

from __future__ import annotations

import pytest

from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

MARKER = "/airflow/.deployed-revision"


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server):
    aws_server.reset()
    imds_server.reset()
    ssm = aws_server.client("ssm")
    ah.put_params(ssm, {"FOO": "bar", "STANDIN_READY_DELAY": "0"})
    with SystemdHost(tmp_path_factory.mktemp("boot-gate-host"), name="aea-bootgate") as h:
        ah.prepare(h, aws_server, imds_server)
        yield h


def _agent(host, aws_server, imds_server, *args, env=None):
    full = ah.agent_env(aws_server, imds_server)
    full.update(env or {})
    return host.run(["airflow-agent", *args], env=full, timeout=120)


def _active(host) -> str:
    return host.unit_property("airflow-worker", "ActiveState")


def test_fresh_worker_waits_for_application_start(host, aws_server, imds_server):
    imds_server.set_paths({"meta-data/autoscaling/target-lifecycle-state": "InService"})
    host.run(["rm", "-f", MARKER])
    proc = _agent(host, aws_server, imds_server, "bootstrap", "--role", "worker")
    assert "no CodeDeploy revision yet" in proc.stderr, proc.stderr
    assert host.systemctl("is-enabled", "airflow-worker").stdout.strip() == "enabled"
    assert _active(host) == "inactive"
    # a second cfn-init run (or a reboot's bootstrap) still holds it
    _agent(host, aws_server, imds_server, "bootstrap", "--role", "worker", "--skip-env-sync")
    assert _active(host) == "inactive"
    # CodeDeploy's launch hook deploys the last good revision; ApplicationStart starts it
    proc = _agent(
        host,
        aws_server,
        imds_server,
        "deploy-hook",
        "ApplicationStart",
        env={
            "LIFECYCLE_EVENT": "ApplicationStart",
            "DEPLOYMENT_ID": "d-FIRST",
            "APPLICATION_NAME": "airflow",
            "DEPLOYMENT_GROUP_NAME": "workers",
        },
    )
    host.wait_active("airflow-worker")
    assert host.read_file(MARKER) == b"d-FIRST\n"


def test_warm_pool_instance_is_held_even_with_a_revision(host, aws_server, imds_server):
    host.systemctl("stop", "airflow-worker")
    host.write_file(MARKER, "d-OLD\n")
    imds_server.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Warmed:Running"})
    proc = _agent(host, aws_server, imds_server, "bootstrap", "--role", "worker", "--skip-env-sync")
    assert "warm pool (Warmed:Running)" in proc.stderr, proc.stderr
    assert _active(host) == "inactive"
    imds_server.set_paths({"meta-data/autoscaling/target-lifecycle-state": "InService"})
    _agent(host, aws_server, imds_server, "bootstrap", "--role", "worker", "--skip-env-sync")
    host.wait_active("airflow-worker")
