"""The drain's second witness on a real Airflow 3 cluster: the broker restarts mid-drain.

Issue 12: a Redis restart in the middle of a drain broke Celery remote control, and the drain
fell back to a warm stop. Here four real 75 s Airflow tasks run on the worker; `airflow-agent
drain` cancels the consumers and waits; Redis is then killed and, once the drain has said it
waits on the task processes, kept down for three drain.reply_timeouts (the old drain gave
up after one) and started again on the same port. The drain must keep counting the
four tasks from the worker unit's process tree (its cgroup) through the silence, end only when
they end (a drain, not a warm stop), and no task may be killed or rerun (try 1, one start and
one end each). `status --json` meanwhile shows the four task processes by their Airflow
task-instance ids. A scan of the journal, every state file, the drain's output and `status`
finds no execution-API token (a JWT).
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from sandbox.proc import end_process, wait_for

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}")
DRAIN_DOC = "/var/lib/airflow-agent/drain.json"
RUN = "witness"
REPLY_TIMEOUT = 5
# the /proc and capability settings of systemd/airflow-agent-lifecycle.service
LIFECYCLE_SANDBOX = [
    "-p",
    "ProtectProc=invisible",
    "-p",
    "ProcSubset=pid",
    "-p",
    "CapabilityBoundingSet=",
    "-p",
    "ProtectControlGroups=yes",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, aws_server, imds_server):
    from sandbox.airflow_cluster import AirflowCluster

    aws_server.reset()
    c = AirflowCluster(
        tmp_path_factory.mktemp("airflow-witness"),
        aws_server,
        imds_server,
        # a short reply timeout: the old drain gave up on a silent worker after it
        agent_config={"drain": {"reply_timeout": REPLY_TIMEOUT, "poll_interval": 1}},
    )
    c.start()
    c.start_core()
    yield c
    c.stop()


def _doc(c) -> dict:
    try:
        return json.loads(c.host.read_file(DRAIN_DOC))
    except Exception:  # noqa: BLE001 - not written yet
        return {}


def _status(c) -> tuple:
    out = c.host.run(["airflow-agent", "status", "--json"], check=False).stdout
    return out, json.loads(out)


@pytest.mark.timeout(900)
def test_a_broker_restart_mid_drain_counts_the_running_tasks_and_drains(cluster):
    from sandbox.airflow_cluster import WORKER, dag_source
    from sandbox.codedeploy_runner import CodeDeployRunner, host_execute, make_revision

    c = cluster
    runner = CodeDeployRunner(host_execute(c.host), c.shared / "cd-root", group="workers")
    dep = runner.deploy(
        make_revision(c.shared / "rev1", {"dags/headline.py": dag_source("v1")}),
        deployment_id="d-W1",
    )
    assert dep.succeeded, dep.message
    c.wait_dag("headline")
    cursor = c.host.journal_cursor()
    c.trigger("headline", RUN, {"seconds": 75})
    wait_for(
        lambda: len([f for f in c.out_files() if f.startswith(RUN + ".")]) == 4,
        120,
        "all four tasks to start on the worker",
        interval=0.5,
    )
    outputs = []
    drained = {}

    def drain():
        proc = c.host.run(["airflow-agent", "drain", "--json"], check=False, timeout=600)
        drained["proc"] = proc

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    # the drain waits, and the process witness sees the four tasks in the unit's cgroup
    wait_for(
        lambda: _doc(c).get("phase") == "waiting" and _doc(c).get("task_processes") == 4,
        60,
        "the drain to wait on four task processes",
        interval=0.5,
    )
    text, status = _status(c)
    outputs.append(text)
    w = status["worker_tasks"]
    assert (w["source"], w["running"], w["main_pid"]) == ("cgroup", 4, c.host.main_pid(WORKER))
    ti_ids = c.pg.psql(
        "airflow", f"SELECT id FROM task_instance WHERE run_id='{RUN}' ORDER BY id"
    ).split()
    assert sorted(x["task_instance"] for x in w["tasks"]) == sorted(ti_ids)
    assert {x["kind"] for x in w["tasks"]} == {"task"}
    # inside the lifecycle unit's sandbox (it drains on a termination notice; ProcSubset=pid
    # hides /proc/stat, which psutil's create_time needs): the same four tasks
    sandboxed = c.host.run(
        [
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            *LIFECYCLE_SANDBOX,
            "/usr/local/bin/airflow-agent",
            "status",
            "--json",
        ],
        check=False,
    )
    outputs.append(sandboxed.stdout)
    inside = json.loads(sandboxed.stdout)["worker_tasks"]
    assert (inside["running"], inside["error"]) == (4, None), inside
    # what the witness classifies but never shows: the unit's command lines (no token today)
    argv = c.host.run(
        [
            "sh",
            "-c",
            "for p in $(cat /sys/fs/cgroup/unified/system.slice/airflow-worker.service/"
            "cgroup.procs); do tr '\\0' ' ' < /proc/$p/cmdline; echo; done",
        ],
        check=False,
    ).stdout
    assert "airflow worker -- " in argv and JWT.search(argv) is None

    # the broker goes away mid-drain
    end_process(c.redis.proc)
    silent = wait_for(
        lambda: (d := _doc(c)).get("silent_since") is not None and d,
        60,
        "the drain to notice that remote control is silent",
        interval=0.5,
    )
    assert silent["phase"] == "waiting" and silent["task_processes"] == 4
    # the outage lasts three reply timeouts: the old drain gave up after one (a warm stop)
    during = []

    def outage_over():
        during.append((_doc(c).get("phase"), t.is_alive()))
        return time.time() - silent["silent_since"] >= 3 * REPLY_TIMEOUT

    wait_for(outage_over, 60, "an outage of three reply timeouts", interval=1)
    assert set(during) == {("waiting", True)}, during  # still draining, no warm stop
    text, status = _status(c)
    outputs.append(text)
    assert status["worker_tasks"]["running"] == 4 and status["drain"]["task_processes"] == 4
    c.redis.start()  # same port: the worker and the agent reconnect

    t.join(400)
    assert not t.is_alive(), "the drain did not end"
    proc = drained["proc"]
    outputs += [proc.stdout, proc.stderr]
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert (result["outcome"], result["method"]) == ("drained", "remote-control"), result
    assert "falling back to a warm shutdown" not in proc.stderr
    assert "remote control does not answer; waiting on the task processes" in proc.stderr
    assert re.search(r"remote control silent for \d+s; 4 task process\(es\) running", proc.stderr)
    assert c.host.unit_property(WORKER, "ActiveState") == "inactive"

    # the tasks ended on their own, try 1, before the drain saw idle; nothing reran
    assert c.wait_run("headline", RUN) == "success"
    tis = c.task_instances("headline", RUN)
    assert [(ti["state"], ti["try_number"]) for ti in tis] == [("success", 1)] * 4, tis
    files = {k: v for k, v in c.out_files().items() if k.startswith(RUN + ".")}
    assert sorted(files) == [f"{RUN}.t{i}.1" for i in range(4)], files
    ends = []
    for lines in files.values():
        assert [x.split()[0] for x in lines] == ["start", "end"], lines
        ends.append(float(lines[1].split()[2]))
    assert result["idle_at"] >= max(ends), (result, ends)
    assert result["idle_at"] - max(ends) < 30, (result, ends)

    # no token anywhere the agent writes or prints
    outputs.append(_status(c)[0])
    outputs.append(c.host.run(["airflow-agent", "status"], check=False).stdout)
    found = c.host.run(["find", "/var/lib/airflow-agent", "-type", "f"], check=False)
    outputs += [c.host.read_file(p).decode("utf-8", "replace") for p in found.stdout.split()]
    c.host.run(["journalctl", "--sync"], check=False)
    journal = c.host.journal(since_cursor=cursor)
    assert "execute_workload" in journal  # the scan read the worker's log
    leaks = [m.group(0)[:24] for text in [*outputs, journal] for m in JWT.finditer(text)]
    assert leaks == [], f"{len(leaks)} token(s) found, e.g. {leaks[:3]}"
