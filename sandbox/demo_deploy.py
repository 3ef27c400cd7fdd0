"""`make demo` part: a CodeDeploy deployment that drains a Celery worker with tasks in flight.

A real Airflow 3 cluster on the sandbox instance (sandbox/airflow_cluster.py: PostgreSQL,
Redis, the project's units, settings from SSM through `env sync`); the CodeDeploy agent
stand-in (sandbox/codedeploy_runner.py) runs codedeploy/appspec.yml's hooks. Shown: a DAG
run of 4 x 20 s tasks in flight, ApplicationStop draining the worker (consumer cancelled, the
tasks finish, then the unit stops), the new bundle landing, the worker consuming again, every
task `success` on try 1, and a new run executing the new bundle's code.

Run alone: `python -m sandbox.demo_deploy` (root; ~2 minutes).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from sandbox.airflow_cluster import AirflowCluster, dag_source
from sandbox.aws_server import AwsServer
from sandbox.codedeploy_runner import CodeDeployRunner, host_execute, make_revision
from sandbox.imds_server import ImdsServer
from sandbox.proc import wait_for

DAG = "headline"


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say(f"\n=== {text} " + "=" * max(3, 86 - len(text)))


def show_event(e) -> None:
    say(f"  [{e.event}] {e.script or '(files)'}: rc {e.rc} in {e.seconds:.1f}s")
    for line in e.output.strip().splitlines():
        if " agent." in line or line.startswith(("ERROR", "WARNING")):
            say("      " + line)


def task_table(c: AirflowCluster, run_id: str) -> None:
    files = c.out_files()
    say(f"  {'task':6} {'state':10} {'try':>3}  bundle code that ran")
    for ti in c.task_instances(DAG, run_id):
        lines = files.get(f"{run_id}.{ti['task_id']}.{ti['try_number']}", [])
        versions = " -> ".join(ln.split()[0] + " " + ln.split()[1] for ln in lines)
        say(f"  {ti['task_id']:6} {ti['state'] or '-':10} {ti['try_number']:>3}  {versions}")


def main() -> int:
    with AwsServer() as aws, ImdsServer() as imds:
        shared = Path(tempfile.mkdtemp(prefix="aea-demo-deploy-"))
        banner("CodeDeploy + Celery drain on a real Airflow 3 cluster")
        c = AirflowCluster(shared, aws, imds)
        try:
            c.start()
            c.start_core()
            say(f"  cluster up: {c.timings} (seconds)")
            runner = CodeDeployRunner(host_execute(c.host), shared / "cd-root", group="workers")
            banner("deployment 1: bundle v1 (no ApplicationStop on a first deployment)")
            dep = runner.deploy(
                make_revision(shared / "rev1", {"dags/headline.py": dag_source("v1")}), "d-V1"
            )
            for e in dep.events:
                show_event(e)
            if not dep.succeeded:
                say(dep.message)
                return 1
            c.wait_dag(DAG)

            banner("a run of 4 x 20 s tasks on the worker (concurrency 4)")
            c.trigger(DAG, "before", {"seconds": 20})
            wait_for(
                lambda: len([f for f in c.out_files() if f.startswith("before.")]) == 4,
                90,
                "the four tasks to start",
                interval=0.5,
            )
            task_table(c, "before")
            time.sleep(3)

            banner("deployment 2: bundle v2 while the tasks run")
            stop = threading.Event()

            def watch() -> None:  # what an operator sees meanwhile
                while not stop.wait(4):
                    states = [t["state"] for t in c.task_instances(DAG, "before")]
                    worker = c.host.unit_property("airflow-worker", "ActiveState")
                    say(f"    ... tasks {states}, airflow-worker {worker}")

            t = threading.Thread(target=watch, daemon=True)
            t.start()
            dep = runner.deploy(
                make_revision(shared / "rev2", {"dags/headline.py": dag_source("v2")}), "d-V2"
            )
            stop.set()
            t.join()
            for e in dep.events:
                show_event(e)
            if not dep.succeeded:
                say(dep.message)
                return 1
            c.wait_run(DAG, "before")
            banner("the run that was in flight")
            task_table(c, "before")

            banner("a run triggered after the deployment")
            c.trigger(DAG, "after", {"seconds": 1})
            c.wait_run(DAG, "after", timeout=120)
            task_table(c, "after")
            tis = c.task_instances(DAG, "before")
            ok = all(ti["state"] == "success" and ti["try_number"] == 1 for ti in tis)
            new = all(
                v[0].split()[1] == "v2" for k, v in c.out_files().items() if k.startswith("after.")
            )
            say(f"\n  in-flight tasks all success on try 1: {ok}; new run ran v2: {new}")
            return 0 if ok and new else 1
        finally:
            c.stop()
            shutil.rmtree(shared, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
