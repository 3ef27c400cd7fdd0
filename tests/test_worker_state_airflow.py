"""Issue 12's reproduction, on a real Airflow 3 cluster (sandbox/airflow_cluster.py: systemd test
host, PostgreSQL, Redis, the shipped units): during a CodeDeploy ApplicationStop drain of
running tasks, an SSM change plus `env sync` (what the cfn-hup hook does) rewrites the env
file while the shipped confapply unit runs.

Before the worker's record, confapply restarted the draining worker (cancelling the drain's
stop; the worker consumed again and the deployment failed at the drain deadline). Now: the
worker keeps its MainPID until the drain stops it, confapply says why, the deployment
succeeds, every task ends `success` on try 1 with one start and one end, and the worker that
ApplicationStart starts was started after the new file was written (EnvironmentFile= is read
at each start), so the new setting is in effect.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from sandbox.codedeploy_runner import CodeDeployRunner, host_execute, make_revision
from sandbox.proc import wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, aws_server, imds_server):
    from sandbox.airflow_cluster import AirflowCluster

    aws_server.reset()
    c = AirflowCluster(tmp_path_factory.mktemp("airflow-worker-state"), aws_server, imds_server)
    c.start()
    c.start_core()
    yield c
    c.stop()


def _json(c, path: str) -> dict:
    proc = c.host.run(["cat", path], check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


@pytest.mark.timeout(900)
def test_env_change_mid_drain_with_confapply_running_restarts_nothing(cluster):
    from sandbox.airflow_cluster import DROPIN, SSM_PATH, WORKER, dag_source

    c = cluster
    runner = CodeDeployRunner(host_execute(c.host), c.shared / "cd-root", group="workers")
    first = runner.deploy(
        make_revision(c.shared / "rev1", {"dags/headline.py": dag_source("v1")}),
        deployment_id="d-W1",
    )
    assert first.succeeded, first.message
    assert _json(c, "/var/lib/airflow-agent/worker.json")["state"] == "running"
    # the shipped confapply unit, with the rig's drop-in (this machine's python is under /root)
    c.host.write_file("/etc/systemd/system/airflow-agent-confapply.service.d/50-rig.conf", DROPIN)
    c.host.systemctl("daemon-reload")
    c.host.systemctl("start", "airflow-agent-confapply")  # returns once READY (its first check)
    c.wait_dag("headline")
    c.trigger("headline", "midrain", {"seconds": 40})
    wait_for(
        lambda: len([f for f in c.out_files() if f.startswith("midrain.")]) == 4,
        120,
        "all four tasks to start on the worker",
        interval=0.5,
    )
    pid = c.host.main_pid(WORKER)
    seen = {}

    def change_mid_drain() -> None:
        try:
            wait_for(
                lambda: _json(c, "/var/lib/airflow-agent/drain.json").get("phase") == "waiting",
                120,
                "the drain to wait for the running tasks",
                interval=0.3,
            )
            seen["record"] = _json(c, "/var/lib/airflow-agent/worker.json")["state"]
            before = _json(c, "/var/lib/airflow-agent/confapply.json").get("applied_hash")
            c.aws.client("ssm").put_parameter(
                Name=SSM_PATH + "env/AEA_MID_DRAIN", Value="2", Type="String", Overwrite=True
            )
            c.host.run(["airflow-agent", "env", "sync"], env=c.agent_env())
            seen["written"] = time.monotonic()
            wait_for(
                lambda: (
                    _json(c, "/var/lib/airflow-agent/confapply.json").get("applied_hash")
                    not in (None, before)
                ),
                60,
                "confapply to handle the new env file",
                interval=0.3,
            )
            seen["confapply"] = _json(c, "/var/lib/airflow-agent/confapply.json")
            seen["pid"] = c.host.main_pid(WORKER)
            seen["status"] = c.host.unit_property("airflow-agent-confapply", "StatusText")
        except BaseException as exc:  # reported by the main thread
            seen["error"] = exc

    t = threading.Thread(target=change_mid_drain)
    t.start()
    dep = runner.deploy(
        make_revision(c.shared / "rev2", {"dags/headline.py": dag_source("v2")}),
        deployment_id="d-W2",
    )
    t.join(180)
    assert "error" not in seen, seen.get("error")
    assert dep.succeeded, dep.message
    assert seen["record"] == "draining"
    assert seen["pid"] == pid, "confapply restarted the draining worker"
    assert seen["confapply"]["last_skipped"] == [WORKER], seen["confapply"]
    assert seen["confapply"]["last_restarted"] == []
    assert f"{WORKER} not restarted: worker state draining" in seen["status"], seen["status"]
    assert c.wait_run("headline", "midrain") == "success"
    tis = c.task_instances("headline", "midrain")
    assert sorted((ti["task_id"], ti["state"], ti["try_number"]) for ti in tis) == [
        (f"t{i}", "success", 1) for i in range(4)
    ]
    files = {k: v for k, v in c.out_files().items() if k.startswith("midrain.")}
    assert sorted(files) == [f"midrain.t{i}.1" for i in range(4)], files  # no second try
    for lines in files.values():
        assert [line.split()[0] for line in lines] == ["start", "end"], lines
    # ApplicationStart started the worker after the new file was written: it runs with it
    c.host.wait_active(WORKER)
    assert c.host.main_pid(WORKER) != pid
    started = int(c.host.unit_property(WORKER, "ExecMainStartTimestampMonotonic")) / 1e6
    assert started > seen["written"]
    assert b"AEA_MID_DRAIN" in c.host.read_file("/etc/sysconfig/airflow.env")
    assert _json(c, "/var/lib/airflow-agent/worker.json")["state"] == "running"


STOP_CONSUMING = """
from agent.config import load_config
from agent.jobs.drain.drainer import stop_consuming
print(stop_consuming(load_config()))
"""


@pytest.mark.timeout(900)
def test_env_change_while_paused_restarts_nothing_until_undrain(cluster):
    """The paused state (a rebalance recommendation's stop-consuming) on the same cluster: the
    worker runs its tasks to the end on the old file, then undrain lets it consume and
    confapply's next check restarts it onto the new one."""
    from sandbox.airflow_cluster import SSM_PATH, WORKER
    from sandbox.celery_worker_host import REPO

    c = cluster
    c.host.wait_active(WORKER)
    c.trigger("headline", "paused", {"seconds": 30})
    wait_for(
        lambda: len([f for f in c.out_files() if f.startswith("paused.")]) == 4,
        120,
        "all four tasks to start on the worker",
        interval=0.5,
    )
    pid = c.host.main_pid(WORKER)
    proc = c.host.run([str(REPO / ".venv/bin/python"), "-c", STOP_CONSUMING])
    assert "default" in proc.stdout, proc.stderr
    assert _json(c, "/var/lib/airflow-agent/worker.json")["state"] == "paused"
    before = _json(c, "/var/lib/airflow-agent/confapply.json").get("applied_hash")
    c.aws.client("ssm").put_parameter(
        Name=SSM_PATH + "env/AEA_WHILE_PAUSED", Value="3", Type="String", Overwrite=True
    )
    c.host.run(["airflow-agent", "env", "sync"], env=c.agent_env())
    written = time.monotonic()
    wait_for(
        lambda: (
            _json(c, "/var/lib/airflow-agent/confapply.json").get("applied_hash")
            not in (None, before)
        ),
        60,
        "confapply to handle the new env file",
        interval=0.3,
    )
    doc = _json(c, "/var/lib/airflow-agent/confapply.json")
    assert doc["last_skipped"] == [WORKER] and doc["held_pids"] == {WORKER: pid}
    # status says so: the hash is applied, yet the worker still runs the older file
    status = json.loads(c.host.run(["airflow-agent", "status", "--json"]).stdout)["config"]
    assert status["in_sync"] and status["held"] == {WORKER: pid}, status
    text = c.host.run(["airflow-agent", "status"]).stdout
    assert f"{WORKER} still on an older config" in text, text
    assert c.wait_run("headline", "paused") == "success"
    assert c.host.main_pid(WORKER) == pid  # the tasks ran to the end on the same worker
    tis = c.task_instances("headline", "paused")
    assert sorted((ti["task_id"], ti["state"], ti["try_number"]) for ti in tis) == [
        (f"t{i}", "success", 1) for i in range(4)
    ]
    und = c.host.run(["airflow-agent", "undrain"], env=c.agent_env())
    assert "consuming queue" in und.stderr, und.stderr
    wait_for(
        lambda: c.host.main_pid(WORKER) not in (0, pid),
        120,
        "confapply's next check to restart the worker still on the old file",
        interval=1,
    )
    c.host.wait_active(WORKER)
    started = int(c.host.unit_property(WORKER, "ExecMainStartTimestampMonotonic")) / 1e6
    assert started > written
    # confapply records the release after the restart it waited for: wait for the record
    # (asserting at once raced it: a clean-clone CI saw {'airflow-worker': <old pid>})
    wait_for(
        lambda: _json(c, "/var/lib/airflow-agent/confapply.json")["held_pids"] == {},
        30,
        "confapply to record that it no longer holds the worker",
        interval=0.2,
    )
    status = json.loads(c.host.run(["airflow-agent", "status", "--json"]).stdout)["config"]
    assert status["held"] == {}, status
