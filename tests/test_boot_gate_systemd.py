"""The worker boot gate end to end on a real systemd, the agent installed as cfn-init does
(sandbox/agent_host.py: real unit files, stand-in Airflow processes):

- a fresh worker (no CodeDeploy revision yet) is bootstrapped with airflow-worker enabled but
  not started, and only CodeDeploy's ApplicationStart (`deploy-hook ApplicationStart`, as the
  appspec hook runs it) starts it;
- an instance in a warm pool (`Warmed:*` target state) is held even with a revision on disk,
  lifecycle watch records it drained, and the launch hook's ApplicationStart starts it once it
  leaves the pool;
- the gate is part of the unit (`ExecCondition=airflow-agent worker-gate`, run as airflow from
  the record's public copy): a start by anyone, as a reboot's start job does, of a fresh
  (never deployed) or drained worker is skipped, the stand-in never runs;
- on a terminating (Spot-noticed) instance undrain, bootstrap and ApplicationStart refuse
  (exit 1, the worker left stopped).
"""

from __future__ import annotations

import json

import pytest

from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

MARKER = "/airflow/.deployed-revision"
STARTS = "/airflow/standin/airflow-worker.starts"
PUBLIC = "/var/lib/airflow-agent-gate/worker"
APP_START = {
    "LIFECYCLE_EVENT": "ApplicationStart",
    "DEPLOYMENT_ID": "d-FIRST",
    "APPLICATION_NAME": "airflow",
    "DEPLOYMENT_GROUP_NAME": "workers",
}


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server):
    aws_server.reset()
    imds_server.reset()
    ssm = aws_server.client("ssm")
    # sqs://: no Celery remote control, so a drain of the stand-in is the warm-stop fallback
    ah.put_params(
        ssm, {"FOO": "bar", "STANDIN_READY_DELAY": "0", "AIRFLOW__CELERY__BROKER_URL": "sqs://"}
    )
    with SystemdHost(tmp_path_factory.mktemp("boot-gate-host"), name="aea-bootgate") as h:
        ah.prepare(h, aws_server, imds_server)
        yield h


def _agent(host, aws_server, imds_server, *args, env=None):
    full = ah.agent_env(aws_server, imds_server)
    full.update(env or {})
    return host.run(["airflow-agent", *args], env=full, timeout=120)


def _active(host) -> str:
    return host.unit_property("airflow-worker", "ActiveState")


def _starts(host) -> int:
    """How many times the worker's stand-in process ran (one line per start)."""
    proc = host.run(["cat", STARTS], check=False)
    return len(proc.stdout.splitlines()) if proc.returncode == 0 else 0


def _boot_start(host) -> None:
    """What a reboot does to an enabled unit: a start job (here after a stop, as at shutdown).
    With the gate holding, systemd skips the start: the job succeeds, the unit stays inactive
    and its ExecStart never runs."""
    host.systemctl("stop", "airflow-worker")
    host.systemctl("start", "airflow-worker")
    host.wait_for(
        lambda: host.unit_property("airflow-worker", "ActiveState") in ("active", "inactive"),
        30,
        "the start job to finish",
    )


def test_fresh_worker_waits_for_application_start(host, aws_server, imds_server):
    imds_server.set_paths({"meta-data/autoscaling/target-lifecycle-state": "InService"})
    host.run(["rm", "-f", MARKER, STARTS])
    proc = _agent(host, aws_server, imds_server, "bootstrap", "--role", "worker")
    assert "no CodeDeploy revision yet" in proc.stderr, proc.stderr
    assert host.systemctl("is-enabled", "airflow-worker").stdout.strip() == "enabled"
    assert _active(host) == "inactive"
    assert b'"state": "fresh"' in host.read_file(PUBLIC)
    assert host.run(["stat", "-c", "%a %U", PUBLIC]).stdout.split() == ["644", "root"]
    # a second cfn-init run (or a reboot's bootstrap) still holds it
    _agent(host, aws_server, imds_server, "bootstrap", "--role", "worker", "--skip-env-sync")
    assert _active(host) == "inactive"
    # a reboot before the first deployment: the enabled unit's start job is skipped by the gate
    cursor = host.journal_cursor()
    _boot_start(host)
    assert _active(host) == "inactive"
    # skipped by its condition: inactive (not failed), so Restart=on-failure does not retry it
    assert host.unit_property("airflow-worker", "Result") == "exec-condition"
    assert host.unit_property("airflow-worker", "NRestarts") == "0"
    assert _starts(host) == 0  # the stand-in (Airflow) never ran: nothing consumed
    log = host.journal("airflow-worker", since_cursor=cursor)
    assert "worker gate holds the worker: worker state fresh" in log, log
    # CodeDeploy's launch hook deploys the last good revision; ApplicationStart starts it
    proc = _agent(host, aws_server, imds_server, "deploy-hook", "ApplicationStart", env=APP_START)
    host.wait_active("airflow-worker")
    assert host.read_file(MARKER) == b"d-FIRST\n"
    assert _starts(host) == 1
    # from now on a reboot starts it
    _boot_start(host)
    host.wait_active("airflow-worker")
    assert _starts(host) == 2


def test_a_drained_worker_stays_stopped_across_a_reboot_until_application_start(
    host, aws_server, imds_server
):
    host.systemctl("start", "airflow-worker")
    host.wait_active("airflow-worker")
    # ApplicationStop's drain on a stand-in without remote control: the warm-stop fallback
    # stops the unit, and the record says drained
    proc = _agent(host, aws_server, imds_server, "drain", "--timeout", "30")
    assert proc.returncode == 0, proc.stderr
    assert _active(host) == "inactive"
    assert b'"state": "drained"' in host.read_file(PUBLIC)
    before = _starts(host)
    _boot_start(host)
    assert _active(host) == "inactive" and _starts(host) == before
    _agent(host, aws_server, imds_server, "bootstrap", "--role", "worker", "--skip-env-sync")
    assert _active(host) == "inactive" and _starts(host) == before
    proc = _agent(host, aws_server, imds_server, "deploy-hook", "ApplicationStart", env=APP_START)
    host.wait_active("airflow-worker")
    assert _starts(host) == before + 1


def test_a_terminating_instance_refuses_every_start(host, aws_server, imds_server):
    host.systemctl("stop", "airflow-worker")  # a stopped worker, as the drain leaves it
    # what lifecycle watch records when it sees a Spot notice (before its drain)
    host.run(
        [
            "/opt/airflow-agent/venv/bin/python",
            "-c",
            "from agent.config import load_config; from agent.worker.state import "
            "mark_terminating; mark_terminating(load_config(None), 'spot', 'test notice')",
        ]
    )
    before = _starts(host)
    for args, env in (
        (["undrain"], None),
        (["bootstrap", "--role", "worker", "--skip-env-sync"], None),
        (["deploy-hook", "ApplicationStart"], APP_START),
    ):
        full = ah.agent_env(aws_server, imds_server)
        full.update(env or {})
        proc = host.run(["airflow-agent", *args], env=full, timeout=120, check=False)
        assert proc.returncode == 1, (args, proc.stderr)
        assert "refused: the instance is terminating (a Spot interruption notice)" in (
            proc.stderr
        ), proc.stderr
    _boot_start(host)
    assert _active(host) == "inactive" and _starts(host) == before
    record = json.loads(host.read_file("/var/lib/airflow-agent/worker.json"))
    assert (record["terminating"], record["may_run"]) == ("spot", False)


def test_warm_pool_instance_is_held_even_with_a_revision(host, aws_server, imds_server):
    host.systemctl("stop", "airflow-worker")
    host.run(["rm", "-f", "/var/lib/airflow-agent/worker.json", PUBLIC])  # after the Spot test
    host.write_file(MARKER, "d-OLD\n")
    imds_server.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Warmed:Running"})
    proc = _agent(host, aws_server, imds_server, "bootstrap", "--role", "worker", "--skip-env-sync")
    assert "warm pool (Warmed:Running)" in proc.stderr, proc.stderr
    assert _active(host) == "inactive"
    # lifecycle watch (started by bootstrap) drains a warm-pool worker: stopped already, so at
    # once, and its record says drained
    host.wait_for(
        lambda: b'"state": "drained"' in host.read_file(PUBLIC),
        60,
        "lifecycle watch to drain the warm-pool worker",
    )
    # it leaves the pool: the record, not the marker, still holds it through a bootstrap; the
    # launch hook's deployment (ApplicationStart) starts it
    imds_server.set_paths({"meta-data/autoscaling/target-lifecycle-state": "InService"})
    _agent(host, aws_server, imds_server, "bootstrap", "--role", "worker", "--skip-env-sync")
    assert _active(host) == "inactive"
    _agent(host, aws_server, imds_server, "deploy-hook", "ApplicationStart", env=APP_START)
    host.wait_active("airflow-worker")
