"""Benchmark: how long can the only api-server be down before a running Airflow 3 task fails?

Run on purpose (root; boots the systemd test host with a real Airflow 3 cluster; CPU-heavy, so
under the machine's heavy lock; ~15-20 min with the defaults):

    flock /tmp/aea-heavy.lock .venv/bin/python -m bench.api_downtime [--outages 7,25,35,45,55]

Airflow 3 task processes reach the metadata only through the api-server's execution API; the
supervisor that forks each task heartbeats it there every few seconds. This bench takes the
execution API away for a chosen time while tasks run and reports what happened to them.

Same cluster as the other benches (sandbox/airflow_cluster.py: the project's units on the
systemd test host, a real `airflow celery worker` with concurrency 4, PostgreSQL and Redis on
the loopback). One DAG, `headline` (sandbox.airflow_cluster.dag_source): 4 parallel tasks that
sleep `conf.seconds`, retries=2, retry_delay 1 s. For each target outage D (one trial each, in
order):

1. trigger a run whose tasks sleep max(60, D + 45) s (--task-seconds: a fixed time, e.g. one
   that ends them inside the outage) and wait until all four have started;
2. 10 s later `systemctl stop airflow-api-server`, wait, `systemctl start airflow-api-server`.
   The start is issued at stop + D - S, where S is the api-server's last measured startup time
   (start issued until the execution API answered; --startup until the first trial measures it);
3. meanwhile a poller inside the host asks the execution API (GET /execution/health, 1 s
   timeout) every 0.2 s: the measured outage is from its first failed request to its first
   answer (any status below 500: what the task SDK's client does not retry);
4. wait for the run to end and report each task's final state and try_number, how many tries
   never reached the end of their code, and from the worker's journal the supervisors'
   heartbeat failures ("Failed to send heartbeat": how many, the most in a row per task) and
   terminations ("Too many failed heartbeats": when, counted from the outage's start).

The table goes to stdout; --json FILE also writes every trial's details, and --logs FILE the
worker's, api-server's and scheduler's journals and the task logs. Results and the prediction
from the task SDK's code: bench/API_DOWNTIME.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.airflow_cluster import WORKER, AirflowCluster, dag_source  # noqa: E402
from sandbox.aws_server import AwsServer  # noqa: E402
from sandbox.codedeploy_runner import CodeDeployRunner, host_execute, make_revision  # noqa: E402
from sandbox.imds_server import ImdsServer  # noqa: E402
from sandbox.proc import wait_for  # noqa: E402

DAG = "headline"
API = "airflow-api-server"
LEAD = 10.0  # seconds from all four tasks running to the stop
TAIL = 35.0  # seconds the tasks keep sleeping after the longest outage
POLL = 0.2
HB_FAILED = re.compile(
    r"\[(?P<pid>\d+)\]: .*Failed to send heartbeat.*failed_heartbeats=(?P<n>\d+).*"
    r"ti_id=UUID\('(?P<ti>[0-9a-f-]+)'\)"
)
HB_ENDED = re.compile(r"\[(?P<pid>\d+)\]: .*Too many failed heartbeats")

# runs inside the host: polls the execution API until it has been down and answered again
POLLER = """
import json, sys, time, urllib.error, urllib.request
url, limit, poll = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def up():
    try:
        return urllib.request.urlopen(url, timeout=1).status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except Exception:
        return False
first_down = back = None
last_up = time.time()
end = time.time() + limit
while time.time() < end:
    t = time.time()
    ok = up()
    if ok and first_down is None:
        last_up = t
    elif not ok and first_down is None:
        first_down = t
    elif ok and first_down is not None:
        back = t
        break
    time.sleep(poll)
print(json.dumps({"last_up": last_up, "first_down": first_down, "back": back}))
"""

# runs inside the host as the worker would: the settings that decide the threshold
SETTINGS = """
from airflow.configuration import conf
keys = [("workers", "min_heartbeat_interval"), ("workers", "max_failed_heartbeats"),
        ("workers", "execution_api_retries"), ("workers", "execution_api_retry_wait_min"),
        ("workers", "execution_api_retry_wait_max"), ("workers", "execution_api_timeout"),
        ("scheduler", "task_instance_heartbeat_timeout")]
import json
print(json.dumps({"%s.%s" % k: conf.get(*k) for k in keys}))
"""


def airflow_settings(c: AirflowCluster) -> Dict[str, str]:
    """The threshold's settings as the worker's Airflow sees them (its env file and defaults)."""
    out = c.host.run(
        [
            "sh",
            "-c",
            'set -a; . /etc/sysconfig/airflow.env; exec /opt/airflow/venv/bin/python -c "$0"',
            SETTINGS,
        ],
        timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def heartbeat_lines(c: AirflowCluster, cursor: str, down: float) -> Dict[str, object]:
    """The worker supervisors' heartbeat failures since `cursor`: how many, and per task the
    most consecutive failures and when (seconds after the outage began) it was terminated."""
    text = c.host.journal(WORKER, since_cursor=cursor, output="short-unix")
    most: Dict[str, int] = {}
    ti_of_pid: Dict[str, str] = {}
    ended: Dict[str, float] = {}
    for line in text.splitlines():
        m = HB_FAILED.search(line)
        if m:
            pid, n, ti = m.group("pid"), int(m.group("n")), m.group("ti")[-6:]
            ti_of_pid[pid] = ti
            most[ti] = max(most.get(ti, 0), n)
        m = HB_ENDED.search(line)
        if m:
            ti = ti_of_pid.get(m.group("pid"), "pid" + m.group("pid"))
            ended[ti] = round(float(line.split()[0]) - down, 1)
    return {
        "failed_heartbeats": text.count("Failed to send heartbeat"),
        "terminated": text.count("Too many failed heartbeats"),
        "most_failed_in_a_row": most,
        "terminated_after_s": ended,
    }


def unit_and_task_logs(c: AirflowCluster) -> str:
    """The worker's, api-server's and scheduler's journals and every task log file."""
    journal = c.host.run(
        ["journalctl", "--no-pager", "-q", "-o", "short-unix"]
        + [x for u in (WORKER, API, "airflow-scheduler") for x in ("-u", u)],
        check=False,
    ).stdout
    tasks = c.host.run(
        ["sh", "-c", f"cd /airflow/logs/dag_id={DAG} && grep -r '' . || true"], check=False
    ).stdout
    return f"=== journal ===\n{journal}\n=== task logs ===\n{tasks}"


def one(c: AirflowCluster, target: float, startup: float, task_seconds: Optional[float]) -> dict:
    h = c.host
    seconds = task_seconds or max(60.0, target + LEAD + TAIL)
    run_id = f"down-{target:g}-{seconds:g}"
    cursor = h.journal_cursor()
    c.trigger(DAG, run_id, {"seconds": seconds})
    wait_for(
        lambda: len([f for f in c.out_files() if f.startswith(run_id + ".")]) == 4,
        180,
        "four tasks to start",
        interval=0.5,
    )
    poll: Dict[str, dict] = {}
    url = f"http://127.0.0.1:{c.api_port}/execution/health"
    limit = target + 240

    def poller() -> None:
        proc = h.run(
            ["python3", "-c", POLLER, url, str(limit), str(POLL)],
            check=False,
            timeout=limit + 30,
        )
        poll["result"] = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc}

    thread = threading.Thread(target=poller, daemon=True)
    thread.start()
    time.sleep(LEAD)
    t_stop = time.time()
    h.systemctl("stop", API, timeout=120)
    t_stopped = time.time()
    gap = max(0.0, target - startup - (t_stopped - t_stop))
    time.sleep(gap)
    t_start = time.time()
    h.systemctl("start", API, timeout=120)
    thread.join(limit + 60)
    p = poll.get("result") or {}
    if not p.get("back") or not p.get("first_down"):
        raise RuntimeError(f"the poller did not see the outage: {poll}")
    state = c.wait_run(DAG, run_id, timeout=3 * seconds + 300)
    tis = c.task_instances(DAG, run_id)
    files = {k: v for k, v in c.out_files().items() if k.startswith(run_id + ".")}
    killed = sum(1 for v in files.values() if not any(ln.startswith("end") for ln in v))
    return {
        "target_s": target,
        "task_seconds": seconds,
        "outage_s": round(p["back"] - p["first_down"], 1),
        "stop_took_s": round(t_stopped - t_stop, 1),
        "gap_s": round(gap, 1),
        "startup_s": round(p["back"] - t_start, 1),
        "run": state,
        "tasks": [(t["task_id"], t["state"], t["try_number"]) for t in tis],
        "killed_tries": killed,
        **heartbeat_lines(c, cursor, p["first_down"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outages", default="7,25,35,45,55", help="target outages, seconds")
    ap.add_argument(
        "--startup",
        type=float,
        default=8.0,
        help="the api-server's startup time assumed until the first trial measures it",
    )
    ap.add_argument(
        "--task-seconds",
        type=float,
        help="how long the tasks sleep (default: max(60, D + 45), so they outlive the outage; "
        "less than D + 10 makes them end while the api-server is down)",
    )
    ap.add_argument(
        "--logs",
        help="before the cluster goes, write the units' journals and the tasks' logs here",
    )
    ap.add_argument("--json", help="also write every trial's details to this file")
    args = ap.parse_args()
    targets = [float(x) for x in args.outages.split(",")]
    rows: List[dict] = []
    settings: Dict[str, str] = {}
    version = ""
    with AwsServer() as aws, ImdsServer() as imds:
        shared = Path(tempfile.mkdtemp(prefix="aea-bench-apidown-"))
        c = AirflowCluster(shared, aws, imds)
        try:
            c.start()
            c.start_core()
            # the product path: a CodeDeploy revision with the DAG starts the worker (its boot
            # gate holds it until the first revision)
            runner = CodeDeployRunner(host_execute(c.host), shared / "cd-root", group="workers")
            dep = runner.deploy(
                make_revision(shared / "rev1", {"dags/headline.py": dag_source("bench")}),
                deployment_id="d-B1",
            )
            if not dep.succeeded:
                raise RuntimeError(f"deployment failed: {dep.message}")
            c.host.wait_active(WORKER, 60)
            c.wait_dag(DAG)
            settings = airflow_settings(c)
            version = c.cli("version").stdout.strip()
            print(f"  Airflow {version}; {settings}", file=sys.stderr, flush=True)
            startup = args.startup
            for target in targets:
                rows.append(one(c, target, startup, args.task_seconds))
                startup = rows[-1]["startup_s"]
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
            if args.logs:
                Path(args.logs).write_text(unit_and_task_logs(c))
        finally:
            c.stop()
            shutil.rmtree(shared, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"airflow": version, "settings": settings, "trials": rows}, indent=1)
        )
    print(f"\nExecution API outage while 4 tasks run (Airflow {version}, one api-server)")
    head = (
        f"{'target':>6} {'outage':>7} {'tasks':>6} {'run':8} {'tasks (state/try)':44} "
        f"{'killed':>6} {'hb failed':>9} {'in a row':10} ended after"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        tasks = " ".join(f"{s}/{n}" for _, s, n in r["tasks"])
        row = ",".join(str(n) for n in sorted(r["most_failed_in_a_row"].values(), reverse=True))
        ended = ",".join(f"{t:g}s" for t in sorted(r["terminated_after_s"].values()))
        print(
            f"{r['target_s']:>5g}s {r['outage_s']:>6.1f}s {r['task_seconds']:>5g}s {r['run']:8} "
            f"{tasks:44} {r['killed_tries']:>6} {r['failed_heartbeats']:>9} {row or '-':10} "
            f"{ended or '-'}"
        )
    print(
        "outage: the poller's first failed request to its first answer; tasks: how long the "
        "tasks sleep (the stop comes 10 s after all four started); killed: tries whose "
        "code never reached its end; hb failed: the worker supervisors' 'Failed to send "
        "heartbeat' lines; in a row: per task that had any, the most consecutive failures; "
        "ended after: when a supervisor logged 'Too many failed heartbeats', from the outage's "
        "start"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
