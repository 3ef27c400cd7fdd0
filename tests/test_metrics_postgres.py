"""`airflow-agent metrics` against a real PostgreSQL 15 with Airflow 3.3's schema (the migrated
metadata database of sandbox/airflow_cluster.Postgres), its co-process in the Airflow venv's
python, and the embedded AWS over real HTTP (sandbox/aws_server.py records every call with the
access key that signed it, so each daemon gets its own key and its calls are told apart).
Each daemon is a real `python -m agent metrics` process with a short interval:

- 40 queued task instances of queue `default`, worker_concurrency 4 -> DesiredWorkers 10 in
  CloudWatch within one interval of the insert; one PutMetricData per pass, one pass per
  interval;
- two daemons (two schedulers) -> exactly one publishes, the other says standby;
- the publisher SIGKILLed -> the other publishes within two intervals.
Each test has its own database (a copy of the migrated one) and cluster name.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from sandbox.proc import end_process, wait_for

pytestmark = [pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
INTERVAL = 2.0


@pytest.fixture(scope="module")
def pg():
    from sandbox.airflow_cluster import Postgres

    server = Postgres().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def db(pg) -> str:
    """A fresh copy of the migrated metadata database; its name."""
    name = f"m_{secrets.token_hex(4)}"
    pg.psql("postgres", f"CREATE DATABASE {name} TEMPLATE airflow")
    return name


def add_task_instances(pg, db: str, n: int, state: str, queue: str = "default") -> None:
    run = f"r_{secrets.token_hex(4)}"
    pg.psql(
        db,
        "INSERT INTO dag_run (dag_id, run_id, run_type, run_after, state) "
        f"VALUES ('metrics_dag', '{run}', 'manual', now(), 'running')",
    )
    pg.psql(
        db,
        "INSERT INTO task_instance (id, task_id, dag_id, run_id, try_number, pool, pool_slots, "
        "state, queue) SELECT gen_random_uuid(), 't' || g, 'metrics_dag', "
        f"'{run}', 1, 'default_pool', 1, '{state}', '{queue}' FROM generate_series(1, {n}) g",
    )


class Daemon:
    """One `airflow-agent metrics` process (one scheduler), signing with its own AWS key."""

    def __init__(self, tmp_path, aws, pg, db: str, cluster: str, name: str, database_url=""):
        from sandbox.airflow_cluster import AIRFLOW_VENV

        self.name = name
        self.key = f"AKIA{name.upper():0<16}"[:20]
        self.dir = tmp_path / name
        self.dir.mkdir()
        env_file = self.dir / "airflow.env"
        self.good_url = f"{pg.url.rsplit('/', 1)[0]}/{db}"
        env_file.write_text(
            f"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN={database_url or self.good_url}\n"
            "AIRFLOW__CELERY__WORKER_CONCURRENCY=4\n"
        )
        config = {
            "cluster": cluster,
            "state_dir": str(self.dir / "state"),
            "env": {"file": str(env_file)},
            "metrics": {
                "python": str(AIRFLOW_VENV / "bin" / "python"),
                "user": None,  # this rig's venv lives under /root: the tests' own user runs it
                "interval": INTERVAL,
                "query_timeout": 10.0,
            },
        }
        (self.dir / "agent.yaml").write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(aws.client_env())
        env.update(AWS_ACCESS_KEY_ID=self.key, PYTHONPATH=str(REPO))
        env.update(AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
        self.log = open(self.dir / "journal.log", "wb")  # noqa: SIM115 - the child's stderr
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "metrics", "--config", str(self.dir / "agent.yaml")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def doc(self) -> Dict:
        try:
            return json.loads((self.dir / "state" / "metrics.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def journal(self) -> str:
        return (self.dir / "journal.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            end_process(self.proc, signal.SIGINT, grace=15)
        self.log.close()


@pytest.fixture
def daemons(tmp_path, aws, pg, db):
    cluster = f"t{secrets.token_hex(4)}"
    started: List[Daemon] = []

    def start(name: str, database_url: str = "") -> Daemon:
        d = Daemon(tmp_path, aws, pg, db, cluster, name, database_url)
        started.append(d)
        return d

    start.cluster = cluster  # type: ignore[attr-defined]
    yield start
    for d in started:
        d.stop()


def put_calls(aws, key: str = "") -> List[Dict]:
    return [c for c in aws.calls("PutMetricData") if not key or c.get("key") == key]


def datapoint(aws, cluster: str, name: str, queue: str = "") -> float:
    """The largest value of `name` CloudWatch (the embedded one) holds for the last minutes."""
    dims = [{"Name": "Cluster", "Value": cluster}]
    if queue:
        dims.append({"Name": "Queue", "Value": queue})
    now = datetime.datetime.now(datetime.timezone.utc)
    points = aws.client("cloudwatch").get_metric_statistics(
        Namespace="AirflowEC2Agent",
        MetricName=name,
        Dimensions=dims,
        StartTime=now - datetime.timedelta(minutes=10),
        EndTime=now + datetime.timedelta(minutes=1),
        Period=60,
        Statistics=["Maximum"],
    )["Datapoints"]
    return max((p["Maximum"] for p in points), default=-1.0)


def test_forty_queued_with_concurrency_four_publish_ten_desired_workers(daemons, aws, pg, db):
    a = daemons("alpha")
    wait_for(lambda: a.doc().get("last_result") == "published", 60, "the first publish")
    assert a.doc()["published"]["default"] == {"running": 0, "queued": 0, "desired": 0}
    assert a.doc()["worker_concurrency"] == 4 and a.doc()["concurrency_source"] == "the env file"
    add_task_instances(pg, db, 40, "queued")
    add_task_instances(pg, db, 5, "scheduled")  # not counted (README: why)
    inserted = time.monotonic()
    wait_for(
        lambda: a.doc().get("total", {}).get("desired") == 10,
        INTERVAL + 3,  # the next pass comes within one interval (+ one pass's own work)
        "DesiredWorkers 10 in the publisher's record",
    )
    within = time.monotonic() - inserted
    doc = a.doc()
    assert doc["published"]["default"] == {"running": 0, "queued": 40, "desired": 10}
    assert doc["role"] == "publisher" and doc["last_error"] is None
    # what CloudWatch holds: per queue and the cluster-wide total
    assert datapoint(aws, daemons.cluster, "DesiredWorkers", "default") == 10.0
    assert datapoint(aws, daemons.cluster, "QueuedTasks", "default") == 40.0
    assert datapoint(aws, daemons.cluster, "DesiredWorkers") == 10.0
    # running ones count too: 2 running + 40 queued = 42 -> 11 workers of 4
    add_task_instances(pg, db, 2, "running")
    wait_for(lambda: a.doc().get("total", {}).get("desired") == 11, INTERVAL + 3, "11 desired")
    # one PutMetricData per pass, and passes one interval apart
    wait_for(lambda: a.doc().get("publishes", 0) >= 5, 6 * INTERVAL + 5, "five publishes")
    a.stop()
    calls = put_calls(aws, a.key)
    assert len(calls) == a.doc()["publishes"] == len(put_calls(aws))
    gaps = [b["time"] - c["time"] for c, b in zip(calls, calls[1:])]
    # Passes run on a fixed-rate schedule, so one late call (a loaded machine) shortens the next
    # gap; what must hold is one call per pass (a second call in one pass would come ~0 s after)
    # and one pass per interval on average.
    assert min(gaps) > 0.5 * INTERVAL, gaps
    assert abs(sum(gaps) / len(gaps) - INTERVAL) < 0.15 * INTERVAL, gaps
    print(f"desired 10 published {within:.2f} s after the insert; gaps {gaps}")


def test_two_schedulers_one_publishes_and_a_killed_publisher_is_replaced(daemons, aws, pg, db):
    add_task_instances(pg, db, 7, "queued")
    a, b = daemons("alpha"), daemons("bravo")
    both = (a, b)
    wait_for(
        lambda: {d.doc().get("role") for d in both} == {"publisher", "standby"},
        30,
        "one publisher and one standby",
    )
    publisher = next(d for d in both if d.doc()["role"] == "publisher")
    standby = next(d for d in both if d is not publisher)
    # several intervals: only the publisher calls PutMetricData, once per pass
    start = publisher.doc()["publishes"]
    wait_for(lambda: publisher.doc()["publishes"] >= start + 3, 4 * INTERVAL + 5, "3 passes")
    assert put_calls(aws, standby.key) == []
    assert standby.doc()["role"] == "standby" and standby.doc()["publishes"] == 0
    assert standby.doc()["status"] == "standby: another scheduler publishes"
    assert datapoint(aws, daemons.cluster, "DesiredWorkers") == 2.0  # ceil(7 / 4)
    # the publisher dies (SIGKILL: no goodbye; its co-process dies with it, and its session)
    publisher.proc.send_signal(signal.SIGKILL)
    publisher.proc.wait(10)
    killed = time.time()
    wait_for(lambda: put_calls(aws, standby.key), 2 * INTERVAL + 3, "the standby to publish")
    took = put_calls(aws, standby.key)[0]["time"] - killed
    assert took <= 2 * INTERVAL, took
    assert standby.doc()["role"] == "publisher"
    assert "took over from another scheduler" in standby.journal()
    print(f"the standby published {took:.2f} s after the publisher was killed")


def test_database_and_cloudwatch_errors_are_counted_recorded_and_retried(daemons, aws, pg, db):
    from sandbox.redis_server import free_port

    password = "metrics0db0secret"
    dead = f"postgresql+psycopg2://airflow:{password}@127.0.0.1:{free_port()}/airflow"
    a = daemons("alpha", database_url=dead)
    good = (a.dir / "airflow.env").read_text().replace(dead, a.good_url)
    wait_for(lambda: a.doc().get("db_errors", 0) >= 2, 30, "two failed passes")
    doc = a.doc()
    assert doc["last_result"] == "failed" and doc["role"] is None
    assert doc["last_error"].startswith("metadata database: OperationalError")
    assert doc["status"].startswith("error: metadata database: OperationalError")
    assert a.proc.poll() is None  # the loop goes on
    # the database comes back (the env file changes): the co-process is restarted on it
    (a.dir / "airflow.env").write_text(good)
    wait_for(lambda: a.doc().get("last_result") == "published", 30, "a publish")
    # CloudWatch refuses one call (not retried by botocore): counted, recorded, retried
    aws.inject("PutMetricData", code="AccessDenied", status=400, message="not allowed")
    wait_for(lambda: a.doc().get("cloudwatch_errors") == 1, 3 * INTERVAL + 5, "the refusal")
    assert "CloudWatch PutMetricData: AccessDenied" in a.doc()["last_error"]
    before = a.doc()["publishes"]
    wait_for(lambda: a.doc()["publishes"] > before, 2 * INTERVAL + 3, "the next publish")
    assert a.doc()["last_result"] == "published" and a.proc.poll() is None
    for text in (a.journal(), (a.dir / "state" / "metrics.json").read_text()):
        assert password not in text
