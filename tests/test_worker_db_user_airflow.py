"""The Celery worker's own database user (issue 12 item 5), on a real Airflow 3 cluster.

sandbox/airflow_cluster.py: PostgreSQL 15, Redis, the project's units on a systemd test host,
Airflow 3.3 (api-server, scheduler, dag-processor with the master user). The worker's user is
made as agent/jobs/worker_db/plan.py makes it (SETUP_SCRIPT run by the Airflow venv's python
as user airflow, the master URL on stdin): Celery's result tables, a login role, the grants of
`grant_statements`. The worker unit then gets that user's URL as its sql_alchemy_conn and
result backend (a second EnvironmentFile, which overrides the shared one), and:
- a DAG of real tasks runs to success, every task on try 1, with the worker's connections to
  PostgreSQL made as that user (pg_stat_activity) and Celery results written by it;
- nothing in the worker's journal says "permission denied";
- the DAG import check a deployment runs on the worker works with that user;
- that user cannot read the connection, variable or task_instance tables (what the master
  credentials would give a task), and cannot create a table;
- the real `airflow-agent worker-db-user` (root, as the template's scheduler Init runs it) updates
  the same user from its Secrets Manager secret and the env file's master URL, no password shown.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from agent.jobs.worker_db.plan import SETUP_SCRIPT, grant_statements
from sandbox.proc import wait_for

pytestmark = [pytest.mark.timeout(900)]

USER = "airflow_worker"
SECRET_ID = "airflow/test/worker-db"
PASSWORD = "wdb0secret0f00ba47"
DROPIN = """[Service]
# the worker's own database user (test: tests/test_worker_db_user_airflow.py)
EnvironmentFile=/etc/sysconfig/airflow-worker-db.env
# the boot gate is not what this test is about
ExecCondition=
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, aws_server, imds_server):
    from sandbox.airflow_cluster import AirflowCluster

    aws_server.reset()
    aws_server.client("secretsmanager").create_secret(
        Name=SECRET_ID, SecretString=json.dumps({"username": USER, "password": PASSWORD})
    )
    c = AirflowCluster(
        tmp_path_factory.mktemp("airflow-worker-db"),
        aws_server,
        imds_server,
        worker_concurrency=2,
        agent_config={"worker_db": {"secret_id": SECRET_ID}},
    )
    c.start()
    try:
        req = {
            "url": c.pg.url,
            "user": USER,
            "password": PASSWORD,
            "grants": grant_statements(USER),
        }
        out = c.host.run(
            ["runuser", "-u", "airflow", "--", "/opt/airflow/venv/bin/python", "-c", SETUP_SCRIPT],
            input=json.dumps(req),
        )
        assert f"worker database user {USER} created" in out.stdout, out.stdout + out.stderr
        # idempotent: a second run updates the role and grants again
        again = c.host.run(
            ["runuser", "-u", "airflow", "--", "/opt/airflow/venv/bin/python", "-c", SETUP_SCRIPT],
            input=json.dumps(req),
        )
        assert f"worker database user {USER} updated" in again.stdout
        url = c.pg.url.replace("//postgres@", f"//{USER}:{PASSWORD}@")
        c.host.write_file(
            "/etc/sysconfig/airflow-worker-db.env",
            f'AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="{url}"\n'
            f'AIRFLOW__CELERY__RESULT_BACKEND="db+{url}"\n',
            mode=0o640,
            owner="root:airflow",
        )
        c.host.write_file("/etc/systemd/system/airflow-worker.service.d/60-worker-db.conf", DROPIN)
        c.host.systemctl("daemon-reload")
        c.start_core()
        yield c
    finally:
        c.stop()


def _psql_as_worker(c, sql: str) -> subprocess.CompletedProcess:
    from sandbox.airflow_cluster import PG_BIN

    return subprocess.run(
        [
            str(PG_BIN / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(c.pg.port),
            "-U",
            USER,
            "-d",
            "airflow",
            "-At",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PGPASSWORD": PASSWORD, "PATH": "/usr/bin:/bin"},
    )


def test_a_worker_with_its_own_user_runs_real_tasks(cluster):
    from sandbox.airflow_cluster import dag_source

    c = cluster
    c.host.write_file(
        "/airflow/dags/headline.py", dag_source("wdb", tasks=3), owner="airflow:airflow"
    )
    c.wait_dag("headline", timeout=180)
    cursor = c.host.journal_cursor()
    c.host.systemctl("start", "airflow-worker.service")
    c.host.wait_active("airflow-worker", 60)
    c.trigger("headline", "worker-db", {"seconds": 2})
    state = c.wait_run("headline", "worker-db", timeout=300)
    journal = c.host.journal("airflow-worker", since_cursor=cursor)
    tis = c.task_instances("headline", "worker-db")
    assert state == "success", (tis, journal[-4000:])
    assert [(t["state"], t["try_number"]) for t in tis] == [("success", 1)] * 3
    assert "permission denied" not in journal.lower(), journal[-4000:]
    # the worker talked to PostgreSQL as its own user, and Celery's results are its writes
    users = c.pg.psql(
        "airflow", "SELECT DISTINCT usename FROM pg_stat_activity WHERE usename IS NOT NULL"
    )
    assert USER in users.split("\n"), users

    # Celery stores a result just after the task function returns, so the last may lag the run
    def results() -> int:
        done = _psql_as_worker(c, "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
        assert done.returncode == 0, done.stderr
        return int(done.stdout) >= 3

    wait_for(results, 30, "the worker's three Celery results", interval=0.5)


def test_the_deployments_dag_import_check_runs_as_the_worker_user(cluster):
    """AfterInstall on a worker runs `airflow dags list-import-errors --local` with the
    worker's settings: every DB-checking CLI command reads log_template first (a launched
    stack's first deployment failed on it: "permission denied for table log_template")."""
    c = cluster
    c.host.write_file("/airflow/dags/check.py", "x = 1\n", owner="airflow:airflow")
    script = (
        "set -a; . /etc/sysconfig/airflow.env; . /etc/sysconfig/airflow-worker-db.env; set +a; "
        "exec /opt/airflow/venv/bin/airflow dags list-import-errors --local -o json"
    )
    out = c.host.run(["runuser", "-u", "airflow", "--", "bash", "-c", script], check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "permission denied" not in (out.stdout + out.stderr).lower()


def test_the_agent_job_updates_the_user_as_the_template_runs_it(cluster):
    """`airflow-agent worker-db-user` as root (the scheduler's first boot): the master URL from
    the env file as Airflow reads it, the worker's user from its secret, the setup as airflow."""
    c = cluster
    from sandbox import agent_host as ah

    cursor = c.host.journal_cursor()
    out = ah.agent(c.host, c.aws, c.imds, "worker-db-user", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"worker database user {USER} updated" in out.stderr
    for text in (out.stdout, out.stderr, c.host.journal(since_cursor=cursor)):
        assert PASSWORD not in text
    # still what the worker can do: its result rows, nothing else
    assert _psql_as_worker(c, "SELECT count(*) FROM celery_taskmeta").returncode == 0
    assert _psql_as_worker(c, "SELECT count(*) FROM connection").returncode != 0


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM connection",
        "SELECT count(*) FROM variable",
        "SELECT count(*) FROM task_instance",
        "UPDATE dag SET is_paused = true",
        "SELECT event FROM log",
        "DELETE FROM log",
        "CREATE TABLE aea_probe (x int)",
    ],
)
def test_the_worker_user_reaches_nothing_else(cluster, sql):
    proc = _psql_as_worker(cluster, sql)
    assert proc.returncode != 0, proc.stdout
    assert "permission denied" in proc.stderr, proc.stderr
