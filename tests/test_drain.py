"""Drain against a real Celery worker (Airflow's delivery settings) under a real systemd.

The worker is `airflow-worker.service` in the systemd test host consuming two queues from a
real redis-server; the agent runs inside the host exactly as on an instance. Tasks leave a
`start`/`end` line per execution in a shared directory, so a killed, lost or rerun task shows.

The time bounds here (`elapsed < ...`) are what only real processes prove: no call to a real
broker, worker or systemd blocks past the drain's deadline or reply timeout. The decisions
behind them (idle, deadline-fail, deadline-stop; never sleeping past the deadline) are proven on
virtual time in tests/test_drain_plan.py (`test_poll_decision`,
`test_sleep_never_passes_the_deadline`).
"""

from __future__ import annotations

import json
import time

import pytest

from sandbox.celery_worker_host import NODE, REPO, VENV_PY, CeleryWorkerHost
from sandbox.proc import wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    w = CeleryWorkerHost(tmp_path_factory.mktemp("drain-shared")).start()
    yield w
    w.stop()


def _all_once(rig, keys):
    recs = rig.records()
    assert sorted(recs) == sorted(keys), recs
    for k, r in recs.items():
        assert r == ["start", "end"], (k, r)


def test_drain_cancels_every_queue_loses_nothing_and_undrain_restarts(rig):
    cfg = rig.fresh()
    keys = [f"d{i}" for i in range(3)] + [f"q{i}" for i in range(3)]
    for k in keys:
        rig.submit(k, 4, "default" if k[0] == "d" else "q2")
    rig.started(2)
    proc = rig.run_agent(cfg, "drain", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["outcome"] == "drained"
    assert sorted(result["queues"]) == ["default", "q2"]  # asked the worker, not assumed
    assert "cancelled consumer of queue default" in proc.stderr
    assert "cancelled consumer of queue q2" in proc.stderr
    assert rig.active_state() == "inactive"
    # the two running tasks finished; the drain saw idle only after the last one ended, and
    # noticed within a poll (+ inspect time)
    recs = rig.records()
    assert sorted(recs.values()) == [["start", "end"], ["start", "end"]], recs
    last_end = max(rig.times(k, "end")[0] for k in recs)
    assert 0 <= result["idle_at"] - last_end < 2.0, (result, last_end)
    # nothing reserved was lost: the four others are back in the broker
    assert rig.queued() == 4
    state = rig.state(cfg)
    assert state["phase"] == "stopped"
    assert [q["name"] for q in state["queues"]] == ["default", "q2"]
    assert state["deadline"] - state["started"] == pytest.approx(120, abs=1)

    # a second drain of a stopped worker: quick success
    again = rig.run_agent(cfg, "drain", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["outcome"] == "already-stopped"
    assert again.elapsed < 10

    # undrain starts it; every task then ran exactly once
    und = rig.run_agent(cfg, "undrain")
    assert und.returncode == 0, und.stderr
    assert "started airflow-worker" in und.stderr
    wait_for(
        lambda: len(rig.records()) == 6 and all(r[-1] == "end" for r in rig.records().values()),
        60,
        "all six tasks to finish",
        interval=0.3,
    )
    _all_once(rig, keys)
    assert rig.state(cfg) == {}


def test_deadline_fail_leaves_worker_up_not_consuming_then_undrain(rig):
    cfg = rig.fresh({"on_deadline": "fail"})
    rig.submit("long1", 8, "default")
    rig.submit("long2", 8, "q2")
    rig.started(2)
    proc = rig.run_agent(cfg, "drain", "--timeout", "2")
    assert proc.returncode == 4, proc.stderr
    assert "drain deadline passed with 2 task(s) running" in proc.stderr
    assert proc.elapsed < 10
    assert rig.active_state() == "active"
    assert rig.consuming() == []
    assert rig.state(cfg)["phase"] == "deadline"
    # a task submitted now is not taken
    rig.submit("later", 1, "default")
    und = rig.run_agent(cfg, "undrain")
    assert und.returncode == 0, und.stderr
    assert "consuming queue default again" in und.stderr
    assert "consuming queue q2 again" in und.stderr
    assert rig.consuming() == ["default", "q2"]
    wait_for(
        lambda: all(r[-1:] == ["end"] for r in rig.records().values()) and len(rig.records()) == 3,
        30,
        "the three tasks to finish",
        interval=0.3,
    )
    _all_once(rig, ["long1", "long2", "later"])


def test_deadline_stop_stops_anyway_with_a_warm_shutdown(rig):
    cfg = rig.fresh({"on_deadline": "stop"})
    rig.submit("s1", 6, "default")
    rig.started(1)
    proc = rig.run_agent(cfg, "drain", "--timeout", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "stopped-at-deadline"
    assert "stopping airflow-worker anyway" in proc.stderr
    assert rig.active_state() == "inactive"
    _all_once(rig, ["s1"])  # warm shutdown under KillMode=mixed let it finish


def test_agent_killed_mid_drain_resumes_with_the_same_deadline(rig):
    cfg = rig.fresh()
    rig.submit("k1", 8, "default")
    rig.submit("k2", 8, "q2")
    rig.submit("k3", 1, "q2")
    rig.started(2)
    rig.host.run(
        [
            "systemd-run",
            "--unit",
            "drain-run",
            "--collect",
            "--setenv",
            f"PYTHONPATH={REPO}",
            VENV_PY,
            "-m",
            "agent",
            "--config",
            str(cfg),
            "drain",
        ]
    )
    wait_for(lambda: rig.state(cfg).get("phase") == "waiting", 20, "drain to be waiting")
    first = rig.state(cfg)
    rig.host.systemctl("kill", "--signal=SIGKILL", "drain-run")
    wait_for(
        lambda: rig.host.unit_property("drain-run", "ActiveState") in ("inactive", "failed", ""),
        10,
        "the killed drain to be gone",
    )
    assert rig.consuming() == []  # the cancelled consumers stay cancelled
    proc = rig.run_agent(cfg, "drain", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "resuming a drain interrupted in phase waiting" in proc.stderr
    state = rig.state(cfg)
    assert state["deadline"] == first["deadline"] and state["started"] == first["started"]
    assert state["resumed"] == 1 and state["phase"] == "stopped"
    assert [q["name"] for q in state["queues"]] == ["default", "q2"]
    _all_once(rig, ["k1", "k2"])
    assert rig.queued() == 1  # k3 waits in the broker
    und = rig.run_agent(cfg, "undrain")
    assert und.returncode == 0, und.stderr
    wait_for(lambda: rig.records().get("k3") == ["start", "end"], 30, "k3 to run")


def test_unknown_node_falls_back_to_a_bounded_warm_stop(rig):
    cfg = rig.fresh({"node_name": "celery@nobody", "reply_timeout": 3})
    rig.submit("n1", 3, "default")
    rig.started(1)
    t = time.monotonic()
    proc = rig.run_agent(cfg, "drain", "--json")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t < 20
    assert "celery@nobody did not answer remote control within 3s" in proc.stderr
    assert "WARNING" in proc.stderr and "falling back to a warm shutdown" in proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "warm-stopped"
    _all_once(rig, ["n1"])


def test_unreachable_broker_is_bounded_and_clear(rig):
    cfg = rig.fresh({"on_deadline": "fail"})
    rig.write_env("redis://:s3cret-pw@127.0.0.1:1/0")  # the worker keeps its own broker
    proc = rig.run_agent(cfg, "drain", "--timeout", "30")
    assert proc.elapsed < 20
    assert "broker redis://127.0.0.1:1/0 unreachable" in proc.stderr
    assert "s3cret-pw" not in proc.stderr
    # an idle worker's warm stop is the bounded fallback
    assert proc.returncode == 0, proc.stderr
    assert rig.active_state() == "inactive"


def test_worker_that_never_replies_is_bounded_by_the_deadline(rig):
    # A frozen worker (SIGSTOP) with a task in flight answers nothing: after reply_timeout the
    # drain falls back to a warm stop (systemd sends SIGTERM then SIGCONT), which waits for
    # the task, so the deadline ends the drain with exit 4, promptly, and says why.
    cfg = rig.fresh({"reply_timeout": 2, "on_deadline": "fail"})
    rig.submit("frozen", 10, "default")
    rig.started(1)
    pid = rig.host.main_pid("airflow-worker")
    rig.host.run(["kill", "-STOP", str(pid)])
    try:
        proc = rig.run_agent(cfg, "drain", "--timeout", "6")
        assert proc.returncode == 4, proc.stderr
        assert proc.elapsed < 15
        assert f"{NODE} did not answer remote control within 2s" in proc.stderr
        assert "still stopping at the drain deadline" in proc.stderr
        assert rig.state(cfg)["phase"] == "deadline"
    finally:
        rig.host.run(["kill", "-CONT", str(pid)], check=False)
    # drain again: resumes the stop and waits for it; the task was not killed
    again = rig.run_agent(cfg, "drain", "--timeout", "60")
    assert again.returncode == 0, again.stderr
    assert rig.active_state() == "inactive"
    _all_once(rig, ["frozen"])


def test_sqs_broker_uses_the_documented_warm_stop_fallback(rig):
    cfg = rig.fresh()
    rig.submit("sq1", 3, "q2")
    rig.started(1)
    rig.write_env("sqs://", {"AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__REGION": "eu-west-1"})
    proc = rig.run_agent(cfg, "drain", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "broker sqs:// has no Celery remote control" in proc.stderr
    assert json.loads(proc.stdout)["method"] == "warm-stop"
    assert rig.active_state() == "inactive"
    _all_once(rig, ["sq1"])


def test_missing_env_file_is_a_clear_error(rig, tmp_path):
    cfg = rig.fresh()
    data = json.loads(cfg.read_text())
    data["env"]["file"] = str(rig.shared / "nope.env")
    cfg.write_text(json.dumps(data))
    proc = rig.run_agent(cfg, "drain")
    assert proc.returncode == 1
    assert "nope.env not found: run `airflow-agent env sync` first" in proc.stderr
    assert rig.active_state() == "active"


def test_stop_consuming_api_pauses_then_drain_and_undrain(rig):
    # The Python API lifecycle watch uses for a rebalance recommendation.
    from agent.config import load_config
    from agent.jobs.drain.drainer import drain, stop_consuming

    cfg_path = rig.fresh()
    cfg = load_config(str(cfg_path))
    cfg.drain.node_name = NODE  # this process runs outside the host (another hostname)
    cfg.systemctl = ["nsenter", "-t", str(rig.host.pid), "-a", "-r", "-w", "--", "systemctl"]
    rig.submit("p1", 3, "q2")
    rig.started(1)
    assert stop_consuming(cfg) == ["default", "q2"]
    assert rig.consuming() == [] and rig.state(cfg_path)["phase"] == "paused"
    assert rig.active_state() == "active"
    seen = []
    result = drain(cfg, deadline=time.time() + 60, on_progress=seen.append)
    assert result.outcome == "drained" and result.queues == ["default", "q2"]
    assert any(p.phase == "waiting" and p.active == 1 for p in seen)
    assert rig.state(cfg_path)["deadline"] <= time.time() + 60
    _all_once(rig, ["p1"])
