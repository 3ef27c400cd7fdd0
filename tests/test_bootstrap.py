"""bootstrap on a real systemd: first boot, a second run that changes and restarts nothing,
the worker boot gate, and an env sync failure that touches no unit."""

from __future__ import annotations

import pytest

from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

SCHED = [
    "airflow-agent-env",
    "airflow-agent-confapply",
    "airflow-agent-variables.timer",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
]
PROPS = [
    "ActiveState",
    "SubState",
    "MainPID",
    "InvocationID",
    "NRestarts",
    "UnitFileState",
    "ActiveEnterTimestampMonotonic",
]


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server, ssm):
    aws_server.reset()
    imds_server.reset()
    ah.put_params(ssm, {"FOO": "bar", "STANDIN_READY_DELAY": "0"})
    with SystemdHost(tmp_path_factory.mktemp("bootstrap-host"), name="aea-bootstrap") as h:
        ah.prepare(h, aws_server, imds_server)
        yield h


def snapshot(host, units):
    state = {u: host.systemctl("show", u, "-p", ",".join(PROPS)).stdout for u in units}
    # env.json is left out on purpose: it records when the last sync ran
    paths = [
        "/etc/sysconfig/airflow.env",
        "/var/lib/airflow-agent/role.json",
        "/var/lib/airflow-agent/confapply.json",
    ]
    files = host.run(["stat", "-c", "%n %y %s %a %U:%G %i", *paths]).stdout
    files += host.run(["sha256sum", *paths]).stdout
    return state, files


def bootstrap(host, aws_server, imds_server, *args, check=True):
    return ah.agent(host, aws_server, imds_server, "bootstrap", *args, check=check)


def test_second_bootstrap_changes_nothing_and_restarts_nothing(host, aws_server, imds_server):
    first = bootstrap(host, aws_server, imds_server, "--role", "scheduler")
    assert "started" in first.stderr
    for u in SCHED:
        assert host.systemctl("is-enabled", u).stdout.strip() == "enabled"
        if not u.endswith(".timer") and u != "airflow-agent-env":
            host.wait_active(u)
    assert ah.standin_env(host, "airflow-scheduler")[b"FOO"] == b"bar"
    before = snapshot(host, SCHED)
    cursor = host.journal_cursor()

    second = bootstrap(host, aws_server, imds_server, "--role", "scheduler")
    assert "bootstrap as scheduler: nothing to change" in second.stderr, second.stderr
    assert "unchanged" in second.stderr  # the env sync found nothing to write
    assert snapshot(host, SCHED) == before
    journal = host.journal(since_cursor=cursor)
    for u in SCHED:
        assert f"Starting {u}" not in journal and f"Stopping {u}" not in journal, journal


def test_worker_boot_gate_enables_but_does_not_start(host, aws_server, imds_server):
    host.run(["rm", "-f", "/airflow/.deployed-revision"])
    proc = bootstrap(host, aws_server, imds_server, "--role", "worker")
    assert "boot gate holds" in proc.stderr
    assert "airflow-worker enabled but not started" in proc.stderr
    assert host.systemctl("is-enabled", "airflow-worker").stdout.strip() == "enabled"
    assert host.unit_property("airflow-worker", "ActiveState") == "inactive"
    # scheduler units were stopped and disabled: a role switch
    assert host.unit_property("airflow-scheduler", "ActiveState") == "inactive"
    assert (
        host.systemctl("is-enabled", "airflow-scheduler", check=False).stdout.strip() == "disabled"
    )
    # the worker's record says fresh from now on: a marker file written by hand (AIRFLOW_HOME
    # is the airflow user's) does not open the gate; only ApplicationStart does
    host.write_file("/airflow/.deployed-revision", "r1\n")
    proc = bootstrap(host, aws_server, imds_server, "--role", "worker")
    assert "boot gate holds" in proc.stderr
    assert host.unit_property("airflow-worker", "ActiveState") == "inactive"
    ah.agent(
        host,
        aws_server,
        imds_server,
        "deploy-hook",
        "ApplicationStart",
    )
    host.wait_active("airflow-worker")
    # once the record says running, the next run starts it (here: already running)
    bootstrap(host, aws_server, imds_server, "--role", "worker")
    host.wait_active("airflow-worker")


def test_env_sync_failure_touches_no_unit(host, aws_server, imds_server):
    units = ah.AIRFLOW_UNITS
    before = snapshot(host, units)
    aws_server.inject(
        "GetParametersByPath", code="AccessDeniedException", count=20, message="not allowed"
    )
    try:
        proc = bootstrap(host, aws_server, imds_server, "--role", "scheduler", check=False)
    finally:
        aws_server.clear_faults()
    assert proc.returncode == 1
    assert "bootstrap stopped at env sync (no unit touched)" in proc.stderr
    assert "AccessDeniedException" in proc.stderr
    assert snapshot(host, units)[0] == before[0]
