"""The drain shell (agent/jobs/drain/{drainer,undrain,shell}.py) in process, on virtual time:
a fake systemctl and a fake Celery remote control stand in for the worker, so every path
(drain, deadline, resume, warm stop, undrain) runs in milliseconds. tests/test_drain.py proves
the same against a real Celery worker under real systemd."""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

import pytest

from agent.config import config_from_dict
from agent.errors import DeadlineError
from agent.jobs.drain.drainer import Drainer
from agent.jobs.drain.plan import DrainState
from agent.jobs.drain.undrain import Undrainer
from agent.state import StateStore
from agent.worker.celery_control import BrokerUnreachable, NoReply, QueueSpec
from agent.worker.processes import Snapshot
from agent.worker.processes_plan import TaskProcess, WorkerTree


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += max(seconds, 0.001)  # a zero sleep still lets virtual time move


class FakeSystemctl:
    def __init__(self, state: str = "active"):
        self.state = state
        self.calls: List[str] = []

    def active_state(self, unit: str) -> str:
        return self.state

    def stop(self, unit: str, timeout: float = 0) -> None:
        self.calls.append(f"stop {unit}")
        self.state = "inactive"

    def start(self, unit: str) -> None:
        self.calls.append(f"start {unit}")
        self.state = "active"

    def reset_failed(self, unit: str) -> None:
        self.calls.append(f"reset-failed {unit}")


class FakeWorker:
    """A worker's remote control: its queues, and what `busy` answers poll by poll."""

    def __init__(self, queues=("default", "high"), busy: Optional[List[Tuple[int, int]]] = None):
        self.consuming = [QueueSpec(q, exchange=q, routing_key=q) for q in queues]
        self.busy_answers = list(busy or [(0, 0)])
        self.calls: List[str] = []

    def __call__(self, settings, node):  # the control factory
        self.calls.append(f"connect {node} {settings.scheme}")
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def ping(self, timeout=None) -> bool:
        return True

    def active_queues(self) -> List[QueueSpec]:
        return list(self.consuming)

    def cancel_consumer(self, name: str) -> None:
        self.calls.append(f"cancel {name}")
        self.consuming = [q for q in self.consuming if q.name != name]

    def add_consumer(self, spec: QueueSpec) -> None:
        self.calls.append(f"add {spec.name}")
        self.consuming.append(spec)

    def busy(self) -> Tuple[int, int]:
        # the last answer repeats
        return self.busy_answers.pop(0) if len(self.busy_answers) > 1 else self.busy_answers[0]


class Notes:
    def __init__(self):
        self.lines: List[str] = []

    def status(self, text: str) -> None:
        self.lines.append(text)


def make_cfg(tmp_path, broker="redis://:pw@127.0.0.1:1/0", **drain):
    env = tmp_path / "airflow.env"
    env.write_text(f'AIRFLOW__CELERY__BROKER_URL="{broker}"\n')
    return config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "env": {"file": str(env)},
            "drain": {"node_name": "celery@w1", "timeout": 600, "poll_interval": 5, **drain},
        }
    )


def rig(tmp_path, systemctl=None, worker=None, broker="redis://:pw@127.0.0.1:1/0", **drain) -> Dict:
    cfg = make_cfg(tmp_path, broker, **drain)
    clock = Clock()
    parts = dict(
        systemctl=systemctl or FakeSystemctl(),
        notifier=Notes(),
        control_factory=worker or FakeWorker(),
        clock=clock,
        sleep=clock.sleep,
    )
    return {"cfg": cfg, "clock": clock, **parts}


def drainer(r, cls=Drainer, **kw):
    parts = {k: r[k] for k in ("systemctl", "notifier", "control_factory", "clock", "sleep")}
    return cls(r["cfg"], **parts, **kw)


def drain_doc(r) -> Optional[DrainState]:
    return StateStore(r["cfg"].state_dir).read(DrainState)


def test_a_drain_cancels_every_queue_waits_for_idle_then_stops(tmp_path):
    worker = FakeWorker(busy=[(2, 1), (1, 0), (0, 0)])
    r = rig(tmp_path, worker=worker)
    seen = []
    result = drainer(r, on_progress=lambda p: seen.append((p.phase, p.active))).drain()
    assert (result.outcome, result.method, result.queues) == (
        "drained",
        "remote-control",
        ["default", "high"],
    )
    assert worker.calls[1:] == ["cancel default", "cancel high"]
    assert r["systemctl"].calls == ["stop airflow-worker"]
    # two polls 5 s apart (poll_interval) before idle, on virtual time
    assert result.idle_at - result.started == pytest.approx(10.0, abs=0.01)
    doc = drain_doc(r)
    assert doc.phase == "stopped" and doc.queue_names == ["default", "high"]
    assert doc.stopped_at == result.stopped_at and doc.idle_at == result.idle_at
    assert ("waiting", 2) in seen and ("waiting", 1) in seen and seen[-1][0] == "stopped"
    assert any("2 task(s) running, 1 reserved" in line for line in r["notifier"].lines)


def test_at_the_deadline_the_worker_stays_up_without_consumers_and_undrain_restores(tmp_path):
    worker = FakeWorker(busy=[(1, 0)])
    r = rig(tmp_path, worker=worker)
    with pytest.raises(DeadlineError, match="1 task\\(s\\) running"):
        drainer(r).drain(timeout=30)
    doc = drain_doc(r)
    assert doc.phase == "deadline" and doc.queue_names == ["default", "high"]
    assert r["clock"].now - doc.started == pytest.approx(30.0, abs=0.01)
    assert r["systemctl"].calls == [] and worker.consuming == []

    assert drainer(r, Undrainer).undrain() == "consumers-added"
    assert sorted(q.name for q in worker.consuming) == ["default", "high"]
    assert drain_doc(r) is None  # the document is gone after an undrain


def test_on_deadline_stop_stops_the_worker_anyway(tmp_path):
    r = rig(tmp_path, worker=FakeWorker(busy=[(1, 0)]), on_deadline="stop")
    result = drainer(r).drain(timeout=20)
    assert result.outcome == "stopped-at-deadline" and result.idle_at is None
    assert r["systemctl"].calls == ["stop airflow-worker"]


def test_an_interrupted_drain_resumes_with_its_original_deadline(tmp_path):
    r = rig(tmp_path, worker=FakeWorker(queues=(), busy=[(1, 0)]))
    now = r["clock"].now
    store = StateStore(r["cfg"].state_dir)
    started, deadline = now - 100, now + 15
    queues = [{"name": "default", "exchange": "default"}]
    store.save_doc(DrainState("waiting", "celery@w1", started, deadline, queues=queues))
    with pytest.raises(DeadlineError):
        drainer(r).drain(timeout=600)  # a new timeout does not extend the recorded deadline
    doc = drain_doc(r)
    assert (doc.started, doc.deadline, doc.resumed) == (started, deadline, 1)
    assert doc.queue_names == ["default"]  # what the first run cancelled is still known
    assert r["clock"].now == pytest.approx(deadline, abs=0.01)


def test_a_drain_document_that_makes_no_sense_is_a_fresh_drain(tmp_path, caplog):
    r = rig(tmp_path)
    store = StateStore(r["cfg"].state_dir)
    store.save_raw("drain", {"phase": "waiting", "node": "celery@w1", "started": "yesterday"})
    assert drainer(r).drain().outcome == "drained"
    assert "not a drain document this agent wrote" in caplog.text
    assert drain_doc(r).resumed == 0


def test_a_stopped_worker_is_already_drained(tmp_path):
    r = rig(tmp_path, systemctl=FakeSystemctl("inactive"))
    assert drainer(r).drain().outcome == "already-stopped"
    assert r["control_factory"].calls == []  # the broker was not even asked
    assert drain_doc(r).phase == "stopped"


def test_without_remote_control_it_is_a_warm_stop(tmp_path):
    r = rig(tmp_path, broker="sqs://")
    result = drainer(r).drain()
    assert (result.outcome, result.method) == ("warm-stopped", "warm-stop")
    assert "no Celery remote control" in result.message
    assert r["control_factory"].calls == [] and r["systemctl"].calls == ["stop airflow-worker"]


def test_stop_consuming_pauses_and_undrain_of_a_stopped_worker_starts_it(tmp_path):
    worker = FakeWorker()
    r = rig(tmp_path, worker=worker)
    assert drainer(r).stop_consuming() == ["default", "high"]
    assert drain_doc(r).phase == "paused" and worker.consuming == []
    r["systemctl"].state = "failed"
    assert drainer(r, Undrainer).undrain() == "started"
    assert r["systemctl"].calls == ["reset-failed airflow-worker", "start airflow-worker"]
    assert drain_doc(r) is None


class StartingWorker(FakeWorker):
    """A worker unit just started: its pings go unanswered (each one waits its timeout, on
    virtual time) until `ready_after` seconds have passed since it was made."""

    def __init__(self, clock: Clock, ready_after: float):
        super().__init__()
        self.clock, self.ready_at = clock, clock() + ready_after
        self.pings: List[float] = []

    def ping(self, timeout=None) -> bool:
        self.pings.append(timeout)
        if self.clock() >= self.ready_at:
            return True
        self.clock.sleep(timeout)
        return False


def test_undrain_of_a_stopped_worker_returns_once_it_answers_a_ping(tmp_path):
    r = rig(tmp_path)
    r["systemctl"].state = "inactive"
    worker = StartingWorker(r["clock"], ready_after=8.0)  # Celery's start on the sandbox: ~8 s
    r["control_factory"] = worker
    started = r["clock"]()
    assert drainer(r, Undrainer).undrain(timeout=60) == "started"
    # ping_waits: 1 s, doubling up to drain.reply_timeout; the ping sent at 7 s (before the
    # worker listens) is lost and waits its 8 s; the next one, at 15 s, is answered
    assert worker.pings == [1, 2, 4, 8, 16]
    assert r["clock"]() - started == pytest.approx(15.0)
    assert drain_doc(r) is None


def test_undrain_of_a_worker_that_never_answers_fails_at_its_timeout_naming_it(tmp_path):
    r = rig(tmp_path)
    r["systemctl"].state = "inactive"
    r["control_factory"] = StartingWorker(r["clock"], ready_after=10_000)
    started = r["clock"]()
    with pytest.raises(DeadlineError, match="airflow-worker started, but celery@w1 did not answer"):
        drainer(r, Undrainer).undrain(timeout=30)
    assert r["clock"]() - started == pytest.approx(30, abs=0.2)
    assert r["systemctl"].calls[-1] == "start airflow-worker"


def test_undrain_with_no_broker_to_read_starts_the_unit_and_says_it_cannot_confirm(
    tmp_path, caplog
):
    r = rig(tmp_path, broker="")  # an env file without AIRFLOW__CELERY__BROKER_URL
    r["systemctl"].state = "inactive"
    r["control_factory"] = lambda *a: pytest.fail("no broker to ask")
    with caplog.at_level("WARNING"):
        assert drainer(r, Undrainer).undrain(timeout=30) == "started"
    assert r["systemctl"].calls[-1] == "start airflow-worker"
    assert "cannot ask whether it answers" in caplog.text


def test_undrain_without_remote_control_returns_once_started(tmp_path):
    r = rig(tmp_path, broker="sqs://")
    r["systemctl"].state = "inactive"
    r["control_factory"] = lambda *a: pytest.fail("no remote control to ask")
    assert drainer(r, Undrainer).undrain(timeout=30) == "started"


def test_the_drain_document_on_disk(tmp_path):
    r = rig(tmp_path)
    drainer(r).drain()
    on_disk = json.loads((tmp_path / "state" / "drain.json").read_text())
    assert on_disk["version"] == 1 and on_disk["phase"] == "stopped"
    assert on_disk["node"] == "celery@w1"


# -- the second witness: the worker unit's task processes (issue 12) ---------------------------


class SilentBroker(FakeWorker):
    """A worker whose remote control goes silent: each `busy` answer is a count pair or an
    exception (NoReply, BrokerUnreachable) raised in its place; the last answer repeats."""

    def __init__(self, answers, queues=("default",)):
        super().__init__(queues=queues)
        self.answers = list(answers)
        self.pings: List[float] = []

    def _next(self, pop: bool):
        answer = self.answers[0]
        if pop and len(self.answers) > 1:
            self.answers.pop(0)
        return answer

    clock: Optional[Clock] = None  # a silent ping waits its timeout (virtual time)

    def ping(self, timeout=None) -> bool:
        """Like WorkerControl.ping: an unreachable broker raises, no reply is False after the
        wait; either consumes one answer (one poll of silence)."""
        self.pings.append(timeout)
        answer = self._next(pop=False)
        if not isinstance(answer, Exception):
            return True
        self._next(pop=True)
        if isinstance(answer, BrokerUnreachable):
            raise answer
        if self.clock is not None:
            self.clock.sleep(timeout or 1.0)
        return False

    def busy(self):
        answer = self._next(pop=True)
        if isinstance(answer, Exception):
            raise answer
        return answer


class Processes:
    """The second witness: the count of task processes each snapshot sees (last repeats);
    None is "cannot be counted"."""

    def __init__(self, counts, clock):
        self.counts = list(counts)
        self.clock = clock
        self.taken: List[float] = []

    def snapshot(self) -> Snapshot:
        n = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        self.taken.append(self.clock.now)
        if n is None:
            return Snapshot("airflow-worker", None, "", "no cgroup", self.clock.now)
        tasks = [TaskProcess(100 + i, "task", self.clock.now - 60) for i in range(n)]
        tree = WorkerTree(main_pid=10, processes=5 + n, pool_slots=[11, 12, 13, 14], tasks=tasks)
        return Snapshot("airflow-worker", tree, "cgroup", "", self.clock.now)


def witnessed(r, counts, **kw):
    r["control_factory"].clock = r["clock"]
    return drainer(r, processes=Processes(counts, r["clock"]), **kw)


def test_a_broker_restart_mid_drain_waits_on_the_task_processes_and_drains(tmp_path, caplog):
    caplog.set_level("INFO")
    lost = BrokerUnreachable("inspect active to celery@w1 via redis://127.0.0.1:1/0 failed")
    worker = SilentBroker([(2, 0), lost, NoReply("no reply"), lost])
    r = rig(tmp_path, worker=worker)
    worker.clock = r["clock"]
    # two tasks run through 6 polls (5 s apart), then one, then none
    procs = Processes([2, 2, 2, 2, 2, 2, 1, 1, 0], r["clock"])
    seen = []
    d = drainer(r, processes=procs, on_progress=lambda p: seen.append((p.active, p.message)))
    result = d.drain()
    # not a warm stop: the drain kept counting and ended when the processes ended
    assert (result.outcome, result.method) == ("drained", "remote-control")
    assert r["systemctl"].calls == ["stop airflow-worker"]
    assert result.idle_at == procs.taken[8]
    # 8 polls 5 s apart, plus the 2 s one silent ping waited (NoReply)
    assert result.idle_at - result.started == pytest.approx(42.0, abs=0.1)
    assert "remote control does not answer; waiting on the task processes" in caplog.text
    assert "falling back to a warm shutdown" not in caplog.text
    assert "remote control silent, no task process" in caplog.text
    silent = [m for _, m in seen if "remote control silent" in m]
    assert any("2 task process(es) running" in m for m in silent)
    assert any("1 task process(es) running" in m for m in silent)
    assert (
        2,
        "draining celery@w1: 2 task(s) running, 0 reserved, 2 task process(es), 600s to deadline",
    ) in seen
    # while silent each poll pings briefly instead of waiting the full reply timeout
    assert worker.pings[1:] and all(t == 2.0 for t in worker.pings[1:])
    doc = drain_doc(r)
    assert doc.phase == "stopped" and doc.task_processes == 0
    # silent since remote control's last answer, the first poll
    assert doc.silent_since == pytest.approx(result.started, abs=0.1)


def test_silence_longer_than_the_reply_timeout_is_no_reason_to_stop_while_tasks_run(tmp_path):
    worker = SilentBroker([(1, 0), NoReply("no reply")])
    r = rig(tmp_path, worker=worker, reply_timeout=10)
    procs = Processes([1] * 40 + [0], r["clock"])  # 200 s of silence, far past 10 s
    result = drainer(r, processes=procs).drain()
    assert result.outcome == "drained" and result.idle_at - result.started >= 195


def test_remote_control_idle_is_not_idle_while_a_task_process_runs(tmp_path):
    r = rig(tmp_path, worker=FakeWorker(busy=[(1, 0), (0, 0)]))
    procs = Processes([1, 1, 1, 0], r["clock"])  # e.g. a runner whose supervisor died
    result = drainer(r, processes=procs).drain()
    assert result.outcome == "drained"
    assert result.idle_at == procs.taken[3] and result.idle_at - result.started == (
        pytest.approx(15.0, abs=0.1)
    )


def test_task_processes_at_the_deadline_fail_the_drain_with_the_worker_running(tmp_path):
    r = rig(tmp_path, worker=SilentBroker([(1, 0), NoReply("no reply")]))
    with pytest.raises(DeadlineError, match="1 task\\(s\\) running"):
        witnessed(r, [1]).drain(timeout=30)
    assert r["systemctl"].calls == [] and drain_doc(r).phase == "deadline"


def test_neither_witness_for_the_reply_timeout_is_still_a_warm_stop(tmp_path, caplog):
    caplog.set_level("INFO")
    r = rig(tmp_path, worker=SilentBroker([(1, 0), NoReply("no reply")]), reply_timeout=12)
    result = witnessed(r, [None]).drain()
    assert (result.outcome, result.method) == ("warm-stopped", "warm-stop")
    assert "task processes cannot be counted" in result.message
    assert "remote control alone tells idle" in caplog.text


def test_remote_control_coming_back_is_heard_again(tmp_path, caplog):
    worker = SilentBroker([(1, 0), NoReply("x"), NoReply("x"), (1, 0), (0, 0)])
    r = rig(tmp_path, worker=worker)
    result = witnessed(r, [1, 1, 1, 1, 0]).drain()
    assert result.outcome == "drained"
    assert "remote control answers again" in caplog.text
    assert drain_doc(r).silent_since is None


def test_a_resumed_drain_with_the_broker_down_waits_on_the_processes(tmp_path):
    down = BrokerUnreachable("broker redis://127.0.0.1:1/0 unreachable")
    worker = SilentBroker([down])
    r = rig(tmp_path, worker=worker)
    now = r["clock"].now
    queues = [{"name": "default", "exchange": "default"}]
    StateStore(r["cfg"].state_dir).save_doc(
        DrainState("waiting", "celery@w1", now - 50, now + 550, queues=queues)
    )
    result = witnessed(r, [2, 2, 1, 0]).drain()
    assert (result.outcome, result.queues) == ("drained", ["default"])
    assert not any(c.startswith("cancel") for c in worker.calls)  # nothing it could reach
    # a fresh drain (consumers not cancelled yet) with the broker down is still a warm stop
    (tmp_path / "fresh").mkdir()
    r2 = rig(tmp_path / "fresh", worker=SilentBroker([down]))
    assert witnessed(r2, [2, 0]).drain().outcome == "warm-stopped"
