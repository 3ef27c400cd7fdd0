"""Issue 12's "actors undo one another", reproduced and fixed on real parts: confapply runs as a
daemon (Type=notify, a transient unit) beside a real Celery worker under a real systemd
(sandbox/celery_worker_host.py: Airflow's delivery settings, real Redis), and the worker's env
file changes while the worker is draining, paused by a stop-consuming, or left up by a drain
that passed its deadline.

Before the worker's record (agent/worker/state.py), confapply decided from the unit's
ActiveState alone: it restarted the draining worker, cancelling the drain's stop, and the
worker consumed again. Now, in each state: the worker is not restarted (same MainPID), confapply
says why in its STATUS= and log, every task runs once (start, end; no rerun), and the new file
is in effect once the worker may run again: the drained worker reads it when undrain starts it;
a paused one is restarted by confapply's first check after undrain (it still ran the old file).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

from agent.config import load_config
from agent.jobs.confapply.state import current_hash
from sandbox.celery_worker_host import REPO, VENV_PY, CeleryWorkerHost
from sandbox.proc import wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    w = CeleryWorkerHost(tmp_path_factory.mktemp("worker-state")).start()
    yield w
    w.stop()


def setup_case(rig, name: str, drain: Optional[Dict] = None) -> Path:
    """A fresh worker and agent.yaml, and confapply running as a daemon in the host."""
    path = rig.fresh(drain)
    cfg = json.loads(path.read_text())
    cfg.update(
        role={"override": "worker"},
        confapply={"debounce": 0.3, "max_wait": 1.0, "recheck_interval": 2.0},
        deploy={"boot_gate": False},  # this worker counts as deployed: its record says running
        imds={"endpoint": "http://127.0.0.1:9/", "timeout": 0.2, "attempts": 1},
    )
    path.write_text(json.dumps(cfg))
    rig.host.run(
        [
            "systemd-run",
            f"--unit=aea-confapply-{name}",
            "-p",
            "Type=notify",
            "-p",
            "NotifyAccess=main",
            f"--setenv=PYTHONPATH={REPO}",
            VENV_PY,
            "-m",
            "agent",
            "--config",
            str(path),
            "confapply",
        ],
        timeout=60,
    )  # returns once confapply sent READY=1 (its initial check adopted the current file)
    return path


def confapply_doc(path: Path) -> dict:
    state_dir = Path(json.loads(path.read_text())["state_dir"])
    try:
        return json.loads((state_dir / "confapply.json").read_text())
    except FileNotFoundError:
        return {}


def worker_record(path: Path) -> dict:
    state_dir = Path(json.loads(path.read_text())["state_dir"])
    return json.loads((state_dir / "worker.json").read_text())


def change_env_and_wait_applied(rig, path: Path) -> float:
    """Write a new env file (what `env sync` does on an SSM change) and wait until confapply
    has handled that content (its applied hash is the new one); when it was written
    (CLOCK_MONOTONIC, which the test host shares with this process)."""
    rig.write_env(rig.redis.url, {"AEA_NEW_SETTING": "2"})
    written = time.monotonic()
    want = current_hash(load_config(str(path)))
    wait_for(
        lambda: confapply_doc(path).get("applied_hash") == want,
        30,
        "confapply to handle the new env file",
        interval=0.2,
    )
    return written


def on_new_file(rig, written: float) -> bool:
    """The worker's process was started after the env file got its new content, so systemd
    read the new file for it (EnvironmentFile= is read at each start). Celery's setproctitle
    blanks /proc/<pid>/environ, so the start time is the evidence."""
    started = int(rig.host.unit_property("airflow-worker", "ExecMainStartTimestampMonotonic"))
    return started / 1e6 > written


def all_once(rig, keys) -> None:
    wait_for(
        lambda: (
            sorted(rig.records()) == sorted(keys)
            and all(r[-1:] == ["end"] for r in rig.records().values())
        ),
        60,
        "every task to end",
        interval=0.3,
    )
    for k, r in rig.records().items():
        assert r == ["start", "end"], (k, r)  # not killed, not rerun


def test_confapply_does_not_restart_a_draining_worker_and_the_drain_completes(rig):
    path = setup_case(rig, "draining")
    pid = rig.host.main_pid("airflow-worker")
    rig.submit("a", 6, "default")
    rig.submit("b", 6, "q2")
    rig.started(2)
    result = {}
    t = threading.Thread(target=lambda: result.update(proc=rig.run_agent(path, "drain", "--json")))
    t.start()
    wait_for(lambda: rig.state(path).get("phase") == "waiting", 30, "the drain to wait for tasks")
    assert worker_record(path)["state"] == "draining"
    written = change_env_and_wait_applied(rig, path)
    doc = confapply_doc(path)
    assert doc["last_skipped"] == ["airflow-worker"] and doc["last_restarted"] == []
    assert rig.host.main_pid("airflow-worker") == pid  # not restarted under the drain
    status = rig.host.unit_property("aea-confapply-draining", "StatusText")
    assert "airflow-worker not restarted: worker state draining" in status, status
    t.join(120)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "drained"
    assert rig.active_state() == "inactive"
    all_once(rig, ["a", "b"])
    assert worker_record(path)["state"] == "drained"
    log = rig.host.journal("aea-confapply-draining")
    assert "reads the new config when it is next started" in log
    # ApplicationStart / undrain: the worker starts, on the new file
    und = rig.run_agent(path, "undrain")
    assert und.returncode == 0, und.stderr
    rig.wait_consuming()
    assert on_new_file(rig, written)
    new_pid = rig.host.main_pid("airflow-worker")
    # confapply forgets the stopped process and does not restart the new one
    wait_for(lambda: confapply_doc(path).get("held_pids") == {}, 30, "confapply to re-check")
    assert rig.host.main_pid("airflow-worker") == new_pid
    rig.host.systemctl("stop", "aea-confapply-draining")


@pytest.mark.parametrize("how", ["stop-consuming", "drain-deadline"])
def test_a_paused_worker_is_not_restarted_then_gets_the_new_file_after_undrain(rig, how):
    name = how.replace("-", "")
    path = setup_case(rig, name, {"on_deadline": "fail"})
    pid = rig.host.main_pid("airflow-worker")
    rig.submit("a", 8, "default")
    rig.submit("b", 8, "q2")
    rig.started(2)
    if how == "stop-consuming":  # what lifecycle watch does on a rebalance recommendation
        code = (
            "import sys; from agent.config import load_config; "
            "from agent.jobs.drain.drainer import stop_consuming; "
            "print(stop_consuming(load_config(sys.argv[1])))"
        )
        proc = rig.host.run([VENV_PY, "-c", code, str(path)], env={"PYTHONPATH": str(REPO)})
        assert "default" in proc.stdout
    else:
        proc = rig.run_agent(path, "drain", "--timeout", "2")
        assert proc.returncode == 4, proc.stderr
    assert rig.consuming() == []
    assert worker_record(path)["state"] == "paused"
    written = change_env_and_wait_applied(rig, path)
    assert rig.host.main_pid("airflow-worker") == pid  # running tasks were not interrupted
    assert confapply_doc(path)["held_pids"] == {"airflow-worker": pid}
    status = rig.host.unit_property(f"aea-confapply-{name}", "StatusText")
    assert "not restarted: worker state paused" in status, status
    all_once(rig, ["a", "b"])
    assert rig.host.main_pid("airflow-worker") == pid
    assert not on_new_file(rig, written)
    # undrain: consuming again, and confapply's next check restarts it onto the new file
    und = rig.run_agent(path, "undrain")
    assert und.returncode == 0, und.stderr
    wait_for(
        lambda: rig.host.main_pid("airflow-worker") not in (0, pid),
        60,
        "confapply to restart the worker that still ran the old file",
        interval=0.3,
    )
    rig.wait_consuming()
    assert on_new_file(rig, written)
    assert confapply_doc(path)["held_pids"] == {}
    rig.submit("c", 1, "default")
    all_once(rig, ["a", "b", "c"])
    assert rig.host.journal(f"aea-confapply-{name}").count("restarting it") == 1
    rig.host.systemctl("stop", f"aea-confapply-{name}")
