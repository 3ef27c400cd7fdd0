"""No execution-API token leaves the worker through the agent, on a real Airflow 3 cluster.

Airflow 3's Celery task `execute_workload` carries the workload JSON, token included, as its
argument. With four real tasks running, the agent's view of them (the lifecycle's list of
running tasks) must name them by their Airflow identity, and a CodeDeploy drain of those tasks
must leave no token in the journal, any state file, the hooks' output or `status`. The scan
looks for any JWT (Airflow's tokens are JWTs); that the raw `inspect active` reply holds them
is checked first, so the scan can fail.
"""

from __future__ import annotations

import json
import re

import pytest

from sandbox.celery_worker_host import REPO
from sandbox.codedeploy_runner import CodeDeployRunner, host_execute, make_revision
from sandbox.proc import wait_for

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}")

LIST_TASKS = """
import json, re, sys
from agent.config import load_config
from agent.jobs.drain.control import worker_control
from agent.jobs.lifecycle.drain import default_active_tasks
cfg = load_config()
with worker_control(cfg) as control:
    raw = json.dumps(control._inspect("active"))
jwt = re.compile(sys.argv[1])
print(json.dumps({"raw_tokens": len(jwt.findall(raw)), "tasks": default_active_tasks(cfg)()}))
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, aws_server, imds_server):
    from sandbox.airflow_cluster import AirflowCluster

    aws_server.reset()
    c = AirflowCluster(tmp_path_factory.mktemp("airflow-secrets"), aws_server, imds_server)
    c.start()
    c.start_core()
    yield c
    c.stop()


@pytest.mark.timeout(900)
def test_no_token_in_journal_state_or_status_during_a_drain_of_real_tasks(cluster):
    from sandbox.airflow_cluster import dag_source

    c = cluster
    runner = CodeDeployRunner(host_execute(c.host), c.shared / "cd-root", group="workers")
    first = runner.deploy(
        make_revision(c.shared / "rev1", {"dags/headline.py": dag_source("v1")}),
        deployment_id="d-S1",
    )
    assert first.succeeded, first.message
    c.wait_dag("headline")
    cursor = c.host.journal_cursor()
    c.trigger("headline", "secrets", {"seconds": 20})
    wait_for(
        lambda: len([f for f in c.out_files() if f.startswith("secrets.")]) == 4,
        90,
        "all four tasks to start on the worker",
        interval=0.5,
    )

    # the agent's view of the running tasks: Airflow identities, no arguments
    proc = c.host.run([str(REPO / ".venv/bin/python"), "-c", LIST_TASKS, JWT.pattern])
    seen = json.loads(proc.stdout)
    assert seen["raw_tokens"] == 4, seen  # the tokens really are in Celery's reply
    tasks = seen["tasks"]
    assert sorted(
        (t["airflow"]["dag_id"], t["airflow"]["task_id"], t["airflow"]["try_number"]) for t in tasks
    ) == [("headline", f"t{i}", 1) for i in range(4)]
    assert all(
        t["name"] == "execute_workload" and t["airflow"]["run_id"] == "secrets" for t in tasks
    )
    outputs = [proc.stdout, proc.stderr]
    outputs.append(c.host.run(["airflow-agent", "status", "--json"], check=False).stdout)

    def state_files():
        found = c.host.run(["find", "/var/lib/airflow-agent", "-type", "f"], check=False)
        return {p: c.host.read_file(p).decode("utf-8", "replace") for p in found.stdout.split()}

    after_stop = {}

    def between(event):
        if event == "ApplicationStop":  # the drain's record, before undrain removes it
            after_stop.update(state_files())
            outputs.append(c.host.run(["airflow-agent", "status", "--json"], check=False).stdout)

    # a drain of the running tasks (ApplicationStop), then the new revision starts
    dep = runner.deploy(
        make_revision(c.shared / "rev2", {"dags/headline.py": dag_source("v2")}),
        deployment_id="d-S2",
        between=between,
    )
    assert dep.succeeded, dep.message
    assert c.wait_run("headline", "secrets") == "success"
    for event in ("ApplicationStop", "ApplicationStart", "ValidateService"):
        outputs += [r.output for r in dep.event(event)]
    outputs.append(c.host.run(["airflow-agent", "status", "--json"], check=False).stdout)
    outputs.append(c.host.run(["airflow-agent", "status"], check=False).stdout)
    assert '"phase": "stopped"' in after_stop.get("/var/lib/airflow-agent/drain.json", ""), (
        after_stop
    )
    outputs += list(after_stop.values()) + list(state_files().values())
    c.host.run(["journalctl", "--sync"], check=False)  # everything logged so far is readable
    journal = c.host.journal(since_cursor=cursor)
    assert "execute_workload" in journal or "drain" in journal  # the scan read something
    leaks = [m.group(0)[:24] for text in [*outputs, journal] for m in JWT.finditer(text)]
    assert leaks == [], f"{len(leaks)} token(s) found, e.g. {leaks[:3]}"
