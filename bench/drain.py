"""Benchmark: our Celery drain vs `systemctl stop` of a stock unit vs Turbine's unit.

Run on purpose (root; boots the systemd test host with a real Airflow 3 cluster, ~12 min):
`python -m bench.drain [--seconds 20,100]`.

Same cluster (sandbox/airflow_cluster.py), same DAG (4 parallel tasks, retries=2,
concurrency 4 on the one worker), same moment (3 s after all four tasks started), one
strategy at a time, for each task length (default 20 s, and 100 s: longer than the stock
unit's 90 s stop timeout). The scheduler's task heartbeat timeout is 30 s (default 300 s) so
a killed task is noticed and retried within the bench's patience:

- ours:     `airflow-agent drain` (cancel_consumer on every queue, wait until no task is active
            or reserved, then `systemctl stop`), the project's unit (KillMode=mixed);
- stock:    `systemctl stop airflow-worker` with a stock unit: systemd's defaults
            KillMode=control-group, TimeoutStopSec=90s (a drop-in over the project's unit);
- turbine:  `systemctl stop airflow-worker` with Turbine's unit settings: KillMode=mixed,
            TimeoutStopSec=24h, no consumer cancel (Celery's warm shutdown alone).

After the stop the worker is started again so that retries can run, and the run is awaited.
Counted from the task code's own start/end files and the metadata DB: killed (started, never
ended), retried (try_number > 1), lost (not success at the end), duplicated (the task's code
ran to its end more than once); overhead: from the worker's last Celery task returning to
the unit being stopped (the time a deploy waits beyond the tasks themselves).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.airflow_cluster import WORKER, AirflowCluster, dag_source  # noqa: E402
from sandbox.aws_server import AwsServer  # noqa: E402
from sandbox.imds_server import ImdsServer  # noqa: E402
from sandbox.proc import wait_for  # noqa: E402

DAG = "headline"
DROPIN = "/etc/systemd/system/airflow-worker.service.d/60-bench.conf"
STRATEGIES = {
    "ours": None,
    "stock": "[Service]\nKillMode=control-group\nTimeoutStopSec=90s\n",
    "turbine": "[Service]\nKillMode=mixed\nTimeoutStopSec=24h\n",
}


def worker_ready(c: AirflowCluster) -> None:
    c.host.wait_active(WORKER, 60)
    ping = ["airflow-agent", "undrain", "--timeout", "60"]  # no-op on a consuming worker
    c.host.run(ping, timeout=90)
    from agent.worker.celery_control import BrokerSettings, WorkerControl

    with WorkerControl(BrokerSettings(c.redis.url, {}), c.node) as w:
        wait_for(lambda: w.ping() and w.active_queues(), 60, "worker to consume", 0.5)


def one(c: AirflowCluster, name: str, seconds: float) -> dict:
    h = c.host
    dropin = STRATEGIES[name]
    if dropin:
        h.write_file(DROPIN, dropin)
    else:
        h.run(["rm", "-f", DROPIN])
    h.systemctl("daemon-reload")
    h.systemctl("restart", WORKER)
    worker_ready(c)
    run_id = f"bench-{name}-{seconds:g}"
    c.trigger(DAG, run_id, {"seconds": seconds})
    wait_for(
        lambda: len([f for f in c.out_files() if f.startswith(run_id + ".")]) == 4,
        120,
        "four tasks to start",
        interval=0.5,
    )
    time.sleep(3)
    done_before = set(c.celery_done_times())
    t0 = time.time()
    if name == "ours":
        proc = h.run(["airflow-agent", "drain", "--json"], check=False, timeout=600)
        result = json.loads(proc.stdout) if proc.returncode == 0 else {}
        stopped = result.get("stopped_at") or time.time()
    else:
        h.systemctl("stop", WORKER, timeout=600)
        stopped = time.time()
    new_done = [t for t in c.celery_done_times() if t not in done_before and t <= stopped + 1]
    overhead = stopped - max(new_done) if new_done else None
    h.systemctl("start", WORKER)  # retries (if any) run now
    state = c.wait_run(DAG, run_id, timeout=300 + 3 * seconds)
    tis = c.task_instances(DAG, run_id)
    files = {k: v for k, v in c.out_files().items() if k.startswith(run_id + ".")}
    killed = sum(1 for v in files.values() if not any(ln.startswith("end") for ln in v))
    ends = {}
    for k, v in files.items():
        task = k.split(".")[1]
        ends[task] = ends.get(task, 0) + sum(1 for ln in v if ln.startswith("end"))
    return {
        "strategy": name,
        "seconds": seconds,
        "run": state,
        "killed": killed,
        "retried": sum(1 for t in tis if t["try_number"] > 1),
        "lost": sum(1 for t in tis if t["state"] != "success"),
        "duplicated": sum(1 for n in ends.values() if n > 1),
        "stop_s": stopped - t0,
        "overhead_s": overhead,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", default="20,100", help="task lengths (default 20,100)")
    args = ap.parse_args()
    rows = []
    with AwsServer() as aws, ImdsServer() as imds:
        heartbeat = {
            "scheduler/task_instance_heartbeat_timeout": "30",
            "scheduler/task_instance_heartbeat_timeout_detection_interval": "5",
        }
        shared = Path(tempfile.mkdtemp(prefix="aea-bench-drain-"))
        c = AirflowCluster(shared, aws, imds, extra_settings=heartbeat)
        try:
            c.start()
            c.start_core()
            c.host.run(["mkdir", "-p", "/airflow/dags"])
            c.host.write_file("/airflow/dags/headline.py", dag_source("bench"))
            c.host.run(["chown", "-R", "airflow:airflow", "/airflow"])
            c.host.systemctl("start", WORKER)
            c.wait_dag(DAG)
            for seconds in [float(x) for x in args.seconds.split(",")]:
                for name in STRATEGIES:
                    rows.append(one(c, name, seconds))
                    print(f"  {name} {seconds:g}s: {rows[-1]}", file=sys.stderr, flush=True)
        finally:
            c.stop()
            shutil.rmtree(shared, ignore_errors=True)
    print(
        "\nDrain of one Airflow 3.3 Celery worker: 4 tasks in flight, stop requested 3 s "
        "after all four started"
    )
    head = (
        f"{'tasks':>5}  {'strategy':9} {'run':8} {'killed':>6} {'retried':>7} {'lost':>4} "
        f"{'duplicated':>10} {'stop took':>9} {'overhead':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ov = "-" if r["overhead_s"] is None else f"{r['overhead_s']:.1f}s"
        print(
            f"{r['seconds']:>4g}s  {r['strategy']:9} {r['run']:8} {r['killed']:>6} "
            f"{r['retried']:>7} {r['lost']:>4} {r['duplicated']:>10} {r['stop_s']:>8.1f}s "
            f"{ov:>8}"
        )
    print(
        "stop took: from the stop request to the unit stopped; overhead: from the worker's "
        "last Celery task returning to the unit stopped ('-': none returned before it)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
