"""`airflow-agent status`: works with systemd and AWS unreachable; on a real systemd it shows
the role, hashes and unit states."""

from __future__ import annotations

import hashlib
import json

import pytest

from agent.state import StateStore
from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

TOP_KEYS = {
    "role",
    "role_recorded_at",
    "env_file",
    "config",
    "env",
    "variables",
    "drain",
    "lifecycle",
    "variables_watch",
    "task_credentials",
    "deploy",
    "metrics",
    "target_group",
    "worker",
    "systemd",
    "units",
    "worker_tasks",
}


def seeded_config(make_config, tmp_path, systemctl):
    cfg = make_config({"systemctl": systemctl})
    store = StateStore(str(tmp_path / "state"))
    store.save_raw("role", {"role": "worker", "decided_at": 1795000000.0})
    store.save_raw(
        "env",
        {
            "last_sync": 1795000000.0,
            "last_sync_result": "failed",
            "last_failure_reason": "SSM GetParametersByPath /x/ failed: boom",
            "file_sha256": "ab" * 32,
            "variables": 7,
        },
    )
    store.save_raw("variables", {"some_future_key": [1, 2], "last_sync": 1795000100.0})
    store.save_raw("drain", {"state": "draining", "started_at": 1795000200.0})
    env = tmp_path / "sysconfig" / "airflow.env"
    env.parent.mkdir(parents=True)
    env.write_bytes(b'A="1"\n')
    return cfg


def test_status_without_systemd_or_aws_says_so(run_agent, make_config, tmp_path):
    # the AWS/IMDS endpoints of this process point at a closed port (conftest): unreachable
    cfg = seeded_config(make_config, tmp_path, ["/nonexistent/systemctl"])
    proc = run_agent(cfg, "status")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "systemd unreachable" in out and "not found" in out
    assert out.splitlines()[0].split() == ["role", "worker"]
    assert "last_sync_result=failed" in out and "variables=7" in out
    assert "state=draining" in out  # unknown keys stay in --json (below), not the table
    assert "NOT in sync" in out  # confapply never recorded a hash here
    # aligned: every value starts in the same column, after the longest label
    head = out.splitlines()[:8]
    assert "changed since" in out  # the file is not what the last sync wrote
    assert all(line[11:13] == "  " and line[13] != " " for line in head), head

    proc = run_agent(cfg, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert set(s) == TOP_KEYS
    assert s["systemd"]["reachable"] is False and "not found" in s["systemd"]["error"]
    assert s["units"] == {}
    assert s["role"] == "worker"
    assert s["env"]["last_failure_reason"].startswith("SSM GetParametersByPath")
    assert s["variables"]["some_future_key"] == [1, 2]
    assert len(s["config"]["current_hash"]) == 64 and s["config"]["applied_hash"] is None
    assert s["env_file"]["sha256"] == hashlib.sha256(b'A="1"\n').hexdigest()
    assert s["env_file"]["synced_sha256"] == "ab" * 32


def test_status_when_systemctl_runs_but_no_systemd_answers(run_agent, make_config, tmp_path):
    cfg = seeded_config(make_config, tmp_path, ["false"])
    proc = run_agent(cfg, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["systemd"] == {"reachable": False, "error": "systemctl rc 1"}


def test_status_with_an_unreadable_state_document(run_agent, make_config, tmp_path):
    cfg = seeded_config(make_config, tmp_path, ["false"])
    (tmp_path / "state" / "lifecycle.json").mkdir()  # reading it fails with an OSError
    proc = run_agent(cfg, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Is a directory" in json.loads(proc.stdout)["lifecycle"]["unreadable"]


def test_status_with_nothing_recorded(run_agent, make_config):
    proc = run_agent(make_config({"systemctl": ["false"]}), "status")
    assert proc.returncode == 0, proc.stderr
    assert "not recorded" in proc.stdout and "no record" in proc.stdout


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server):
    aws_server.reset()
    ssm = aws_server.client("ssm")
    ah.put_params(ssm, {"FOO": "bar"})
    with SystemdHost(tmp_path_factory.mktemp("status-host"), name="aea-status") as h:
        ah.prepare(h, aws_server, imds_server)
        ah.agent(h, aws_server, imds_server, "bootstrap", "--role", "webserver")
        h.wait_active("airflow-api-server")
        yield h


@pytest.mark.systemd
def test_status_on_a_real_host(host, aws_server, imds_server):
    s = json.loads(ah.agent(host, aws_server, imds_server, "status", "--json").stdout)
    assert set(s) == TOP_KEYS
    assert s["role"] == "webserver"
    assert s["systemd"] == {"reachable": True, "error": None}
    assert sorted(s["units"]) == [
        "airflow-agent-confapply",
        "airflow-agent-env",
        "airflow-agent-task-credentials.timer",
        "airflow-api-server",
    ]
    api = s["units"]["airflow-api-server"]
    assert api["active"] == "active" and api["enabled"] == "enabled"
    assert api["main_pid"] == host.main_pid("airflow-api-server")
    assert s["config"]["in_sync"] is True
    assert s["env"]["last_sync_result"] == "ok" and s["env"]["variables"] == 2
    assert s["env_file"]["sha256"] == s["env"]["file_sha256"]

    text = ah.agent(host, aws_server, imds_server, "status").stdout
    assert "(in sync)" in text
    line = next(x for x in text.splitlines() if x.startswith("airflow-api-server"))
    assert line.split()[:2] == ["airflow-api-server", "active"]


def test_human_view_shows_the_job_fields_that_matter():
    from agent.jobs.status import render

    s = {
        "role": "worker",
        "env_file": {"path": "/e", "sha256": "a" * 64, "error": None, "synced_sha256": "a" * 64},
        "config": {
            "current_hash": "b" * 64,
            "applied_hash": "b" * 64,
            "in_sync": True,
            "last_result": "ok",
            "last_error": None,
            "hash_error": None,
        },
        "env": {"last_sync": 0, "last_sync_result": "ok"},
        "variables": {
            "version_id": "v-7",
            "synced_at": 0,
            "counts": {"imported": 1},
            "last_result": "ok",
            "secret_id": "s",
            "last_error": None,
        },
        "drain": {},
        "lifecycle": {
            "summary": "draining: 2 active",
            "phase": "draining",
            "handled": ["x"] * 50,
            "lifecycle_action": {"hook": "h", "heartbeats_sent": 4, "completed": False},
        },
        "systemd": {"reachable": False, "error": "no bus"},
        "units": {},
    }
    s["variables_watch"] = {"status": "idle", "bridge_pid": 42, "failures": 0}
    text = render(s)
    assert any(
        line.startswith("vars watch") and line.endswith("status=idle bridge_pid=42")
        for line in text.splitlines()
    )
    lines = dict(line.split(None, 1) for line in text.splitlines() if line.strip())
    assert lines["variables"].startswith("last_result=ok version_id=v-7 synced_at=1970-01-01")
    assert "secret_id" not in lines["variables"]
    assert lines["lifecycle"] == (
        "summary=draining: 2 active phase=draining heartbeats=4 completed=False"
    )
    assert "systemd unreachable: no bus" in text


# -- secrets never print --------------------------------------------------------------------

JWT = "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJ0aS0xIn0.c2lnbmF0dXJlLW9mLWEtdG9rZW4"


def test_status_never_prints_a_token_whatever_a_document_holds(tmp_path):
    """Defence in depth: a lifecycle.json written by an older agent (tasks with their
    arguments), a drain document with a token field, a JWT inside a message."""
    from agent.config import config_from_dict
    from agent.jobs import status
    from agent.platform.systemd import Systemctl

    cfg = config_from_dict(
        {"state_dir": str(tmp_path / "state"), "env": {"file": str(tmp_path / "none.env")}}
    )
    store = StateStore(str(tmp_path / "state"))
    workload = json.dumps({"token": JWT, "ti": {"dag_id": "etl"}})
    store.save_raw(
        "lifecycle",
        {
            "version": 1,
            "phase": "done",
            "summary": f"drain ended: record[{JWT}]",
            "drain": {
                "unfinished_tasks": [
                    {"id": "t1", "name": "execute_workload", "args": [workload], "kwargs": {}}
                ]
            },
        },
    )
    store.save_raw(
        "drain",
        {"phase": "stopped", "Token": "plain-secret-value", "note": f"Bearer {JWT} refused"},
    )
    out = status.collect(cfg, Systemctl(["false"], timeout=5))
    text = json.dumps(out) + status.render(out)
    assert JWT not in text and "c2lnbmF0dXJl" not in text
    assert "plain-secret-value" not in text
    task = out["lifecycle"]["drain"]["unfinished_tasks"][0]
    assert task == {"id": "t1", "name": "execute_workload", "args": "<redacted>", "kwargs": {}}
    assert out["drain"]["Token"] == "<redacted>"
    assert out["drain"]["note"] == "Bearer <redacted token> refused"
    assert out["lifecycle"]["phase"] == "done"  # everything else is shown as it is


def test_redact_leaves_ordinary_values_alone():
    from agent.jobs.status import redact

    doc = {"units": {"a": {"active": "active"}}, "count": 3, "tags": ["x.y.z", "eyJ"], "n": None}
    assert redact(doc) == doc
    assert redact({"password": None, "secret": ""}) == {"password": None, "secret": ""}


class WorkerSystemctl:
    """systemd answering for one running worker unit whose main process is `main_pid`."""

    def __init__(self, main_pid: int):
        self.main_pid = main_pid

    def manager_unreachable_reason(self):
        return None

    def unit_states(self, units):
        return {u: {"ActiveState": "active", "MainPID": "0"} for u in units}

    def show(self, unit, *props):
        if unit != "airflow-worker":
            return {}
        # no cgroup on this machine for it: status reads MainPID's descendants
        return {"ControlGroup": "", "MainPID": str(self.main_pid), "ActiveState": "active"}


def test_status_shows_the_workers_running_task_processes(tmp_path):
    """A real process tree shaped like a prefork worker running one task (see
    tests/test_processes.py): count, pid, age and the Airflow task-instance id; no title."""
    from agent.config import config_from_dict
    from agent.jobs import status
    from tests.test_processes import TI, Tree

    cfg = config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "env": {"file": str(tmp_path / "none.env")},
            "role": {"override": "worker"},
        }
    )
    StateStore(str(tmp_path / "state")).save_raw("role", {"role": "worker"})
    tree = Tree("idle", "task")
    try:
        out = status.collect(cfg, WorkerSystemctl(tree.main.pid))
        text = status.render(out)
    finally:
        tree.stop()
    w = out["worker_tasks"]
    assert (w["unit"], w["source"], w["running"], w["pool_slots"]) == (
        "airflow-worker",
        "main-pid",
        1,
        2,
    )
    (task,) = w["tasks"]
    assert (task["kind"], task["task_instance"]) == ("task", TI) and task["age"] >= 0
    line = next(x for x in text.splitlines() if x.startswith("worker tasks"))
    assert f"1 running: pid {task['pid']} " in line and f"ti {TI}" in line
    assert "celeryd" not in json.dumps(out) + text and "/bin/cat" not in text


def test_status_without_a_worker_unit_has_no_worker_tasks(tmp_path):
    from agent.config import config_from_dict
    from agent.jobs import status

    cfg = config_from_dict(
        {"state_dir": str(tmp_path / "state"), "env": {"file": str(tmp_path / "none.env")}}
    )
    StateStore(str(tmp_path / "state")).save_raw("role", {"role": "webserver"})
    out = status.collect(cfg, WorkerSystemctl(1))
    assert out["worker_tasks"] is None and "worker tasks" not in status.render(out)
    assert (
        status.worker_tasks_line(
            {"running": None, "error": "no cgroup", "tasks": [], "source": None}
        )
        == "not countable (no cgroup)"
    )


def test_the_drains_start_and_deadline_show_as_times_not_epoch_floats():
    from agent.jobs.status import _doc_line

    line = _doc_line({"phase": "stopped", "started": 1796133389.27, "deadline": 1796133989.27})
    assert "started=2026-12-01T13:56:29Z" in line and "deadline=2026-12-01T14:06:29Z" in line
    assert "1796133" not in line


def test_since_fields_show_as_times():
    from agent.jobs.status import _doc_line

    line = _doc_line({"last_result": "out", "out_since": 1796133389.0, "silent_since": 0.0 + 1e9})
    assert "out_since=2026-12-01T13:56:29Z" in line and "silent_since=2001-09-09T01:46:40Z" in line


def test_the_lifecycle_row_says_why_its_last_poll_or_pass_failed():
    """A watcher that cannot read IMDS sees no termination notice: the row must say so."""
    from agent.jobs.lifecycle.state import status_detail

    quiet = {"phase": "idle", "last_poll_error": None, "last_pass_error": None}
    assert status_detail(quiet) == ""
    failing = dict(quiet, last_poll_error="spot/instance-action: HTTP 401 from IMDS")
    assert status_detail(failing) == "; last poll failed: spot/instance-action: HTTP 401 from IMDS"
    both = dict(failing, last_pass_error="OSError: disk full")
    assert status_detail(both).endswith("; last pass failed: OSError: disk full")
