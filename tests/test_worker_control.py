"""Remote control of the worker: what the agent keeps of a running task, and whose reply timeout.

The worker side is Celery's own mailbox node (`app.control.mailbox.Node`, the class a Celery
worker answers remote control with) on kombu's in-memory transport, in a thread of this
process: its replies have the shape `inspect active` really has (celery.worker.request.
Request.info) and come after a chosen delay, so "the configured timeout reaches the Celery
call" is shown by what happens (a slow answer is waited for, or not), not by recording calls.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest

from agent.config import config_from_dict
from agent.jobs.drain.control import ping_waits, worker_control
from agent.jobs.drain.drainer import Drainer
from agent.jobs.drain.plan import DrainState
from agent.jobs.drain.shell import DrainShell
from agent.jobs.drain.undrain import Undrainer
from agent.jobs.lifecycle.drain import default_active_tasks, describe_tasks
from agent.state import StateStore
from agent.worker.celery_control import BrokerSettings, ControlError, NoReply, WorkerControl
from agent.worker.tasks import describe_task, safe_task
from sandbox.lifecycle import FAKE_SYSTEMCTL

NODE = "celery@memnode"
TOKEN = "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJ0aS0xIiwic2NvcGUiOiJ3b3JrbG9hZCJ9.c2lnbmF0dXJl"
# Airflow 3.3's ExecuteTask.model_dump_json() (airflow.executors.workloads.task), as the
# scheduler sends it as execute_workload's one argument (celery_executor_utils.
# send_workload_to_executor); produced with the Airflow venv, token replaced by TOKEN
WORKLOAD = json.dumps(
    {
        "token": TOKEN,
        "dag_rel_path": "etl.py",
        "bundle_info": {"name": "dags-folder", "version": None},
        "log_path": "dag_id=etl/run_id=manual__1/task_id=load/attempt=2.log",
        "ti": {
            "id": "7cc77eff-434e-4ef1-b318-c17e9025f751",
            "task_id": "load",
            "dag_id": "etl",
            "run_id": "manual__2026-11-30T10:00:00+00:00",
            "try_number": 2,
            "dag_version_id": "93afc581-b22f-4c71-aaf3-4270607e74d8",
            "map_index": -1,
            "hostname": None,
            "context_carrier": None,
            "queue": "default",
            "pool_slots": 1,
            "priority_weight": 1,
        },
        "sentry_integration": "",
        "type": "ExecuteTask",
    },
    separators=(",", ":"),
)


def active_entry(args: Any, name: str = "execute_workload") -> Dict[str, Any]:
    """One `inspect active` entry as Celery 5.6 builds it (Request.info(safe=False))."""
    return {
        "id": "c0ffee00-0000-4000-8000-000000000001",
        "name": name,
        "args": args,
        "kwargs": {"secret_kw": TOKEN},
        "type": name,
        "hostname": NODE,
        "time_start": 1795000000.5,
        "acknowledged": True,
        "delivery_info": {"exchange": "", "routing_key": "default", "redelivered": False},
        "worker_pid": 4242,
    }


# -- the safe form ----------------------------------------------------------------------------


def test_safe_task_keeps_the_airflow_identity_and_drops_the_token():
    task = safe_task(active_entry([WORKLOAD]))
    assert task == {
        "id": "c0ffee00-0000-4000-8000-000000000001",
        "name": "execute_workload",
        "started": 1795000000.5,
        "worker_pid": 4242,
        "airflow": {
            "type": "ExecuteTask",
            "dag_id": "etl",
            "task_id": "load",
            "run_id": "manual__2026-11-30T10:00:00+00:00",
            "try_number": 2,
            "map_index": -1,
        },
    }
    assert TOKEN not in json.dumps(task) and "signature" not in json.dumps(task)
    assert describe_task(task) == (
        "execute_workload[c0ffee00-0000-4000-8000-000000000001] etl.load run "
        "manual__2026-11-30T10:00:00+00:00 try 2"
    )


@pytest.mark.parametrize(
    "args",
    [
        [TOKEN],  # not JSON
        [json.dumps([TOKEN])],  # JSON, not an object
        repr((WORKLOAD,)),  # Celery's `safe` form: a repr string
        [WORKLOAD, "extra"],
        None,
    ],
)
def test_anything_but_the_known_shape_keeps_name_and_id_only(args):
    task = safe_task(active_entry(args))
    assert set(task) == {"id", "name", "started", "worker_pid"}
    assert TOKEN not in json.dumps(task)


def test_identity_fields_are_copied_only_with_their_types():
    doc = json.loads(WORKLOAD)
    doc["ti"].update(dag_id={"token": TOKEN}, try_number="2", map_index=True, task_id="x" * 900)
    task = safe_task(active_entry([json.dumps(doc)]))
    assert task["airflow"] == {
        "type": "ExecuteTask",
        "task_id": "x" * 250,
        "run_id": "manual__2026-11-30T10:00:00+00:00",
    }
    assert TOKEN not in json.dumps(task)
    # another task's args are never parsed at all
    other = safe_task(active_entry([WORKLOAD], name="record"))
    assert "airflow" not in other


def test_lifecycle_log_line_never_shows_arguments_of_an_old_record():
    old = {"id": "t1", "name": "execute_workload", "args": [WORKLOAD], "started": 1.0}
    line = describe_tasks([old, "junk"])
    assert line == "execute_workload[t1], ?"


# -- a slow worker on kombu's in-memory transport ----------------------------------------------


class SlowNode:
    """Celery's mailbox node answering ping/active/active_queues after `delay` seconds."""

    def __init__(
        self, delay: float, active: List[Dict[str, Any]], queues: Optional[List[str]] = None
    ):
        from celery import Celery

        self.delay = delay
        self.active = active
        self.queues = ["default"] if queues is None else list(queues)
        self.app = Celery("slow-node", broker="memory://", set_as_current=False)
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _handlers(self):
        def slow(value):
            def handler(state, **kwargs):
                time.sleep(self.delay)
                return value

            return handler

        def active_queues(state, **kwargs):
            time.sleep(self.delay)
            return [{"name": q, "exchange": {"name": q, "type": "direct"}} for q in self.queues]

        def add_consumer(state, queue, **kwargs):
            time.sleep(self.delay)
            self.queues.append(queue)
            return {"ok": f"add consumer {queue}"}

        def cancel_consumer(state, queue, **kwargs):
            time.sleep(self.delay)
            self.queues.remove(queue)
            return {"ok": f"no longer consuming from {queue}"}

        return {
            "ping": slow({"ok": "pong"}),
            "active": slow(self.active),
            "reserved": slow([]),
            "active_queues": active_queues,
            "add_consumer": add_consumer,
            "cancel_consumer": cancel_consumer,
        }

    def _serve(self) -> None:
        with self.app.connection_for_write() as conn:
            node = self.app.control.mailbox.Node(NODE, state=None, handlers=self._handlers())
            node.channel = conn.default_channel
            node.listen(callback=None)
            self.ready.set()
            while not self.stop.is_set():
                try:
                    conn.drain_events(timeout=0.05)
                except OSError:  # socket.timeout: nothing arrived
                    continue

    def __enter__(self) -> SlowNode:
        self.thread.start()
        assert self.ready.wait(10), "the mailbox node did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture(autouse=True)
def _own_node_name(monkeypatch):
    """A node name of this test's own: kombu's in-memory broker lives as long as the process,
    so a mailbox queue an earlier test bound under the same name (and its unread broadcasts)
    would still be there."""
    monkeypatch.setitem(globals(), "NODE", f"celery@mem{uuid.uuid4().hex[:10]}")


@pytest.fixture
def slow_node() -> Iterator[SlowNode]:
    with SlowNode(1.0, [active_entry([WORKLOAD])]) as node:
        yield node


def worker_cfg(tmp_path, reply_timeout: float):
    env = tmp_path / "airflow.env"
    env.write_text("AIRFLOW__CELERY__BROKER_URL=memory://\n")
    # the worker unit is "running": sandbox/lifecycle's systemctl backed by this process's PID
    pidfile = tmp_path / "worker.pid"
    pidfile.write_text(str(os.getpid()))
    return config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "env": {"file": str(env)},
            "drain": {"node_name": NODE, "reply_timeout": reply_timeout},
            "systemctl": [
                sys.executable,
                str(FAKE_SYSTEMCTL),
                "--pidfile",
                str(pidfile),
                "--log",
                str(tmp_path / "systemctl.log"),
            ],
        }
    )


@pytest.mark.slow  # waits out real reply timeouts (7-21 s): `make test`, not the fast tier
def test_configured_reply_timeout_waits_for_a_slow_worker(tmp_path, slow_node):
    cfg = worker_cfg(tmp_path, reply_timeout=8.0)
    # the one factory the drain, undrain, lifecycle and deploy hook use
    with worker_control(cfg) as control:
        assert control.ping()
        started = time.monotonic()
        assert [q.name for q in control.active_queues()] == ["default"]
        # limit=1: the call returns on the reply (1 s, plus the memory transport's 1 s
        # polling), not at the 8 s timeout
        assert time.monotonic() - started < 6.0
    # the drain's own control (drain, stop-consuming, undrain)
    shell = DrainShell(cfg)
    with shell.control_factory(BrokerSettings("memory://", {}), NODE) as control:
        assert control.busy() == (1, 0)
    # lifecycle's list of running tasks: the safe form, through the configured timeout
    tasks = default_active_tasks(cfg)()
    assert tasks == [safe_task(active_entry([WORKLOAD]))]
    assert TOKEN not in json.dumps(tasks)


def test_a_reply_timeout_shorter_than_the_worker_is_no_reply(tmp_path, slow_node):
    cfg = worker_cfg(tmp_path, reply_timeout=0.3)
    started = time.monotonic()
    match = r"did not reply to 'active' within 0.3s"
    with worker_control(cfg) as control, pytest.raises(NoReply, match=match):
        control.active_tasks()
    assert time.monotonic() - started < 1.0  # waited the configured 0.3 s, not 1 s or 30 s
    shell = DrainShell(cfg)
    settings = BrokerSettings("memory://", {})
    with shell.control_factory(settings, NODE) as control, pytest.raises(NoReply):
        control.active_queues()


def test_reply_timeout_must_be_positive():
    with pytest.raises(ControlError, match="reply timeout must be positive"):
        WorkerControl(BrokerSettings("memory://", {}), NODE, reply_timeout=0)


@pytest.mark.slow  # waits out real reply timeouts (7-21 s): `make test`, not the fast tier
def test_stop_consuming_then_undrain_of_a_slow_worker(tmp_path):
    """A worker answering every remote-control call after 1 s (a loaded machine): with
    drain.reply_timeout 8 s, stop-consuming cancels its queue and undrain brings it back."""
    cfg = worker_cfg(tmp_path, reply_timeout=8.0)
    with SlowNode(1.0, [], queues=["default", "etl"]) as node:
        assert sorted(Drainer(cfg).stop_consuming()) == ["default", "etl"]
        assert node.queues == []
        assert Undrainer(cfg).undrain(timeout=60) == "consumers-added"
        assert sorted(node.queues) == ["default", "etl"]
    assert "start" not in (tmp_path / "systemctl.log").read_text()  # consumers, not a restart


def test_ping_waits_double_from_one_second_up_to_the_reply_timeout():
    waits = ping_waits(10.0)
    assert [next(waits) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert next(ping_waits(0.3)) == 0.3


@pytest.mark.slow  # waits out real reply timeouts (7-21 s): `make test`, not the fast tier
def test_undrain_catches_a_worker_that_starts_listening_late(tmp_path):
    """The first ping goes out before the worker's mailbox listens (a broadcast nobody gets):
    a later, separate ping is answered, long before a 30 s reply timeout."""
    cfg = worker_cfg(tmp_path, reply_timeout=30.0)
    store = StateStore(cfg.state_dir)
    now = time.time()
    queue = {"name": "etl", "exchange": "etl", "exchange_type": "direct", "routing_key": None}
    store.save_doc(DrainState("paused", NODE, now, now + 60, queues=[queue]))
    node = SlowNode(0.0, [], queues=[])
    starter = threading.Timer(1.5, node.__enter__)
    starter.start()
    try:
        started = time.monotonic()
        assert Undrainer(cfg).undrain(timeout=60) == "consumers-added"
        assert time.monotonic() - started < 15.0
        assert node.queues == ["etl"]
    finally:
        starter.join()
        node.__exit__()
