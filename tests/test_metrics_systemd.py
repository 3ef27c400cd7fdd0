"""`airflow-agent metrics` from the real unit, under its shipped sandbox, on a systemd test host:
`bootstrap --role scheduler` enables and starts it (a default agent unit of the scheduler role);
its co-process runs as user airflow in the Airflow venv's python and reaches a real PostgreSQL
15 with Airflow 3.3's schema (on the machine's loopback, bridged into the host) with the env
file's URL; it publishes to the embedded AWS. READY after the first pass, STATUS= says what it
published, `airflow-agent status` shows it, and the metadata database sees the session as
`airflow-agent metrics <host>`.

Rig only (a drop-in, nothing in systemd/ changes): this machine's Python lives under
/root/.pyenv, so the unit gets `ProtectHome=no` and /root is made traversable inside the host's
overlay, as tests/test_restart_slot_systemd.py does for confapply.
"""

from __future__ import annotations

import json

import pytest

from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

UNIT = "airflow-agent-metrics.service"


@pytest.fixture(scope="module")
def rig(tmp_path_factory, aws_server, imds_server, ssm):
    from sandbox.airflow_cluster import Postgres

    pg = Postgres().start()
    try:
        aws_server.reset()
        imds_server.reset()
        ah.put_params(
            ssm,
            {
                "STANDIN_READY_DELAY": "0",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
            },
        )
        with SystemdHost(tmp_path_factory.mktemp("metrics-host"), name="aea-metrics") as h:
            ah.prepare(h, aws_server, imds_server, {"metrics": {"interval": 2.0}})
            h.bridge_port(pg.port)
            ah.give_airflow_venv(h, UNIT)
            ah.agent(h, aws_server, imds_server, "bootstrap", "--role", "scheduler")
            yield h, pg
    finally:
        pg.stop()


def test_the_scheduler_unit_publishes_from_its_sandbox(rig, aws_server, imds_server):
    host, pg = rig
    host.wait_active(UNIT)
    assert host.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    status = host.wait_for(
        lambda: (lambda s: s if s.startswith("publishing:") else None)(
            host.unit_property(UNIT, "StatusText")
        ),
        60,
        "the metrics unit to publish",
    )
    assert status == "publishing: queue default running 0 queued 0 desired 0"
    pg.psql(
        "airflow",
        "INSERT INTO dag_run (dag_id, run_id, run_type, run_after) "
        "VALUES ('unit_dag', 'r1', 'manual', now())",
    )
    pg.psql(
        "airflow",
        "INSERT INTO task_instance (id, task_id, dag_id, run_id, try_number, pool, pool_slots, "
        "state, queue) SELECT gen_random_uuid(), 't' || g, 'unit_dag', 'r1', 1, "
        "'default_pool', 1, 'queued', 'default' FROM generate_series(1, 9) g",
    )
    host.wait_for(
        lambda: (
            host.unit_property(UNIT, "StatusText")
            == "publishing: queue default running 0 queued 9 desired 3"
        ),
        10,
        "9 queued at concurrency 4 -> 3 desired",
    )
    # the co-process runs as airflow and names itself in the database
    sessions = pg.psql(
        "airflow",
        "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE "
        "'airflow-agent metrics %'",
    )
    assert sessions.startswith("airflow-agent metrics ")
    pids = host.run(["pgrep", "-u", "airflow", "-f", "pg_try_advisory_lock"]).stdout.split()
    assert len(pids) == 1
    assert aws_server.calls("PutMetricData")
    doc = json.loads(host.read_file("/var/lib/airflow-agent/metrics.json"))
    assert doc["role"] == "publisher" and doc["total"]["desired"] == 3
    assert doc["concurrency_source"] == "the env file"
    out = ah.agent(host, aws_server, imds_server, "status").stdout
    assert "role=publisher last_result=published" in out
    assert "running/queued/desired default 0/9/3" in out
    # stopping the unit ends the co-process, and with it the session (the lock)
    host.systemctl("stop", UNIT)
    host.wait_for(
        lambda: (
            not pg.psql(
                "airflow",
                "SELECT 1 FROM pg_stat_activity "
                "WHERE application_name LIKE 'airflow-agent metrics %'",
            )
        ),
        10,
        "the co-process's session to end",
    )
    assert "metrics stopped" in host.journal(UNIT)
