"""Benchmark: the cost of one `airflow-agent metrics` publish with 10,000 task instances in
the metadata database.

Run on purpose (root; starts PostgreSQL 15 with Airflow 3.3's migrated schema and the embedded
AWS): `python -m bench.metrics [--rounds N]`. Writes nothing; prints the table for
bench/METRICS.md.

Two databases of 10,000 task instances each (one dag run per 100 task instances):
- "typical": 9,000 finished (success/failed/skipped/up_for_retry), 600 queued, 300 running,
  100 scheduled, over 3 queues;
- "all active": 10,000 queued or running, over 3 queues (the worst case for the count).

Per database, median of N rounds:
- ours: one tick of the daemon's co-process (agent.jobs.metrics.database, SQLAlchemy text, one
  GROUP BY query on the session that holds the advisory lock), as the co-process measures it
  and as the agent sees it (round trip over the pipe); the whole pass (`Metrics.step()`: env
  file, tick, datums, ONE PutMetricData to the embedded AWS over HTTP, state document);
- Airflow's models: the same counts through `airflow.models.TaskInstance` and an ORM session
  (what "use Airflow's models" costs: its import, then each query);
- naive: one count query per (queue, state), 2 x queues queries per pass.
Queries per pass are counted by the co-process (ours) and by construction (the others);
PutMetricData requests are counted at the embedded AWS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUEUES = ("default", "gpu", "etl")

ORM_SCRIPT = r"""
import json, sys, time
t0 = time.monotonic()
from sqlalchemy import func
from airflow.models.taskinstance import TaskInstance as TI
from airflow.utils.session import create_session
t_import = time.monotonic() - t0
times = []
for _ in range(int(sys.argv[1])):
    t = time.monotonic()
    with create_session() as s:
        rows = (s.query(TI.queue, TI.state, func.count())
                .filter(TI.state.in_(["running", "queued"])).group_by(TI.queue, TI.state).all())
    times.append(time.monotonic() - t)
print(json.dumps({"import": t_import, "times": times, "rows": [list(r) for r in rows]}))
"""

NAIVE_SCRIPT = r"""
import json, sys, time
import sqlalchemy as sa
from sqlalchemy.pool import NullPool
queues = json.loads(sys.argv[2])
conn = sa.create_engine(sys.argv[3], poolclass=NullPool).connect()
times = []
for _ in range(int(sys.argv[1])):
    t = time.monotonic()
    for q in queues:
        for st in ("running", "queued"):
            conn.execute(sa.text("SELECT count(*) FROM task_instance WHERE queue = :q AND "
                                 "state = :s"), {"q": q, "s": st}).scalar()
    times.append(time.monotonic() - t)
print(json.dumps({"times": times}))
"""


def seed(pg, db: str, active_only: bool) -> None:
    pg.psql("postgres", f"CREATE DATABASE {db} TEMPLATE airflow")
    pg.psql(
        db,
        "INSERT INTO dag_run (dag_id, run_id, run_type, run_after, state) "
        "SELECT 'bench', 'run' || r, 'manual', now(), 'running' FROM generate_series(0, 99) r",
    )
    if active_only:
        state = "CASE WHEN g % 4 = 0 THEN 'running' ELSE 'queued' END"
    else:
        state = (
            "CASE WHEN g % 100 < 6 THEN 'queued' WHEN g % 100 < 9 THEN 'running' "
            "WHEN g % 100 < 10 THEN 'scheduled' WHEN g % 100 < 80 THEN 'success' "
            "WHEN g % 100 < 90 THEN 'failed' WHEN g % 100 < 97 THEN 'skipped' "
            "ELSE 'up_for_retry' END"
        )
    queue = "(ARRAY['default','gpu','etl'])[1 + (g / 7) % 3]"
    pg.psql(
        db,
        "INSERT INTO task_instance (id, task_id, dag_id, run_id, try_number, pool, pool_slots, "
        f"state, queue) SELECT gen_random_uuid(), 't' || (g % 100), 'bench', 'run' || (g / 100), "
        f"1, 'default_pool', 1, {state}, {queue} FROM generate_series(0, 9999) g",
    )
    pg.psql(db, "ANALYZE task_instance")


def med(values) -> float:
    return statistics.median(values) * 1000


def bench_db(pg, aws, db: str, rounds: int, python: str, tmp: Path) -> dict:
    from agent.config import config_from_dict
    from agent.jobs.metrics.daemon import Metrics
    from agent.platform.aws import AwsClients
    from agent.runtime.daemon import DaemonRuntime

    url = pg.url.rsplit("/", 1)[0] + "/" + db
    env_file = tmp / f"{db}.env"
    env_file.write_text(f"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN={url}\n")
    cfg = config_from_dict(
        {
            "cluster": db,
            "state_dir": str(tmp / db),
            "env": {"file": str(env_file)},
            "metrics": {"python": python, "user": None, "queues": list(QUEUES)},
        }
    )
    rt = DaemonRuntime("bench", watchdog_usec=None)
    clients = AwsClients(cfg)
    daemon = Metrics(cfg, rt, lambda: clients.client("cloudwatch"))
    t = time.monotonic()
    daemon.step()  # starts the co-process, takes the lock, first publish
    first = time.monotonic() - t
    assert daemon.doc.last_result == "published", daemon.doc.last_error
    aws.clear_calls()
    passes, ticks, inner, queries = [], [], [], []
    for _ in range(rounds):
        t = time.monotonic()
        report = daemon.link.tick(30, time.monotonic)
        ticks.append(time.monotonic() - t)
        inner.append(report.took)
        queries.append(report.queries)
    for _ in range(rounds):
        t = time.monotonic()
        daemon.step()
        passes.append(time.monotonic() - t)
    puts = len(aws.calls("PutMetricData"))
    total = daemon.doc.total
    daemon.close()
    explain = pg.psql(
        db,
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) SELECT queue, state, count(*) "
        "FROM task_instance WHERE state IN ('running', 'queued') GROUP BY queue, state",
    )
    env = dict(
        os.environ,
        AIRFLOW_HOME=str(tmp / "airflow-home"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=url,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
    )
    orm = json.loads(
        subprocess.run(
            [python, "-c", ORM_SCRIPT, str(rounds)], env=env, capture_output=True, check=True
        ).stdout
    )
    naive = json.loads(
        subprocess.run(
            [python, "-c", NAIVE_SCRIPT, str(rounds), json.dumps(QUEUES), url],
            capture_output=True,
            check=True,
        ).stdout
    )
    t = time.monotonic()
    subprocess.run([python, "-c", "import sqlalchemy, psycopg2"], check=True)
    sa_import = time.monotonic() - t
    t = time.monotonic()
    subprocess.run([python, "-c", "import airflow.models.taskinstance"], env=env, check=True)
    af_import = time.monotonic() - t
    return {
        "first_pass_ms": first * 1000,
        "tick_ms": med(ticks),
        "query_ms": med(inner),
        "queries": statistics.median(queries),
        "pass_ms": med(passes),
        "puts": puts,
        "passes": rounds,
        "total": total,
        "orm_query_ms": med(orm["times"]),
        "orm_import_s": orm["import"],
        "naive_ms": med(naive["times"]),
        "naive_queries": 2 * len(QUEUES),
        "sa_start_s": sa_import,
        "af_start_s": af_import,
        "plan": [line for line in explain.splitlines() if "Scan" in line or "Execution" in line],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    from sandbox.airflow_cluster import AIRFLOW_VENV, Postgres
    from sandbox.aws_server import AwsServer

    python = str(AIRFLOW_VENV / "bin" / "python")
    pg = Postgres().start()
    aws = AwsServer().start()
    os.environ.update(aws.client_env())
    try:
        with tempfile.TemporaryDirectory(prefix="aea-bench-metrics-") as d:
            results = {}
            for name, active in (("typical", False), ("all_active", True)):
                seed(pg, name, active)
                results[name] = bench_db(pg, aws, name, args.rounds, python, Path(d))
    finally:
        aws.stop()
        pg.stop()
    print(f"median of {args.rounds} rounds, 10,000 task instances\n")
    print("| database | method | queries / pass | ms / pass (median) | PutMetricData / pass |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | ours: co-process tick (query {r['query_ms']:.2f} ms inside) | "
            f"{r['queries']:g} | {r['tick_ms']:.2f} | - |"
        )
        print(
            f"| {name} | ours: whole pass (tick + 1 PutMetricData over HTTP + state) | "
            f"{r['queries']:g} | {r['pass_ms']:.1f} | {r['puts'] / r['passes']:g} |"
        )
        print(
            f"| {name} | Airflow's models (ORM session per pass) | 1 | "
            f"{r['orm_query_ms']:.2f} | - |"
        )
        print(
            f"| {name} | naive: a count per queue and state | {r['naive_queries']} | "
            f"{r['naive_ms']:.2f} | - |"
        )
    print()
    for name, r in results.items():
        print(
            f"{name}: published total {r['total']}; first pass (co-process start, lock) "
            f"{r['first_pass_ms']:.0f} ms; interpreter start with sqlalchemy+psycopg2 "
            f"{r['sa_start_s']:.2f} s vs airflow.models {r['af_start_s']:.2f} s (in-process "
            f"import {r['orm_import_s']:.2f} s); plan: {'; '.join(r['plan'])}"
        )


if __name__ == "__main__":
    main()
