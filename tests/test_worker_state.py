"""The worker's state record (agent/worker/state_plan.py pure, agent/worker/state.py shell) and
every actor that obeys it, in process: the transitions, the lock, the public copy the unit's
gate reads, and confapply, drain, undrain, lifecycle, bootstrap and `role --apply` each doing
only what the record allows. The same rules end to end on a real systemd and a real Airflow
cluster are in tests/test_worker_state_systemd.py and tests/test_worker_state_airflow.py."""

from __future__ import annotations

import json
import os
import stat
import threading
from types import SimpleNamespace
from typing import List

import pytest

from agent.config import config_from_dict
from agent.errors import DeadlineError
from agent.jobs.confapply.daemon import Confapply
from agent.jobs.confapply.state import ConfapplyDoc
from agent.jobs.drain.undrain import Undrainer
from agent.jobs.lifecycle.drain import record_terminating
from agent.state import StateStore
from agent.worker import boot_gate
from agent.worker import state_plan as sp
from agent.worker.state import (
    WorkerDoc,
    WorkerRecord,
    WorkerRefused,
    gate_decision,
    gate_path,
    mark_terminating,
    note_drain_phase,
)
from tests.test_drainer import FakeSystemctl, FakeWorker, drainer, rig

# -- the pure core ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", sp.STATES)
def test_every_intent_from_every_state(state):
    assert sp.transition(state, None, sp.DRAIN).state == sp.DRAINING
    assert sp.transition(state, None, sp.PAUSE).state == sp.PAUSED
    assert sp.transition(state, None, sp.START).state == sp.RUNNING
    stopped = sp.transition(state, None, sp.STOPPED).state
    # a never-deployed worker found stopped by a drain is still waiting for its first revision
    assert stopped == (sp.FRESH if state == sp.FRESH else sp.DRAINED)
    term = sp.transition(state, None, sp.TERMINATE, cause=sp.SPOT)
    assert (term.state, term.terminating, term.changed) == (state, sp.SPOT, True)
    assert sp.transition(state, None, sp.START).changed == (state != sp.RUNNING)


@pytest.mark.parametrize("state", sp.STATES)
@pytest.mark.parametrize("cause", sp.CAUSES)
def test_nothing_starts_a_terminating_worker_and_the_flag_never_clears(state, cause):
    with pytest.raises(sp.Refused, match="terminating"):
        sp.transition(state, cause, sp.START)
    assert not sp.may_run(state, cause)
    for intent in (sp.DRAIN, sp.STOPPED, sp.PAUSE):
        assert sp.transition(state, cause, intent).terminating == cause
    # a second notice keeps the first cause and changes nothing
    other = sp.TERMINATION if cause == sp.SPOT else sp.SPOT
    again = sp.transition(state, cause, sp.TERMINATE, cause=other)
    assert (again.terminating, again.changed) == (cause, False)


def test_only_a_running_worker_may_run():
    assert [s for s in sp.STATES if sp.may_run(s, None)] == [sp.RUNNING]
    for s in sp.STATES:
        assert (sp.hold_reason(s, None) == "") == (s == sp.RUNNING)
    assert "Spot" in sp.hold_reason(sp.RUNNING, sp.SPOT)
    assert "Auto Scaling termination" in sp.hold_reason(sp.RUNNING, sp.TERMINATION)
    assert sp.describe(sp.RUNNING, None) == "running: may run"
    assert sp.describe(sp.DRAINED, None).startswith("drained: must not run, drained")


def test_bad_inputs_are_errors_not_guesses():
    with pytest.raises(ValueError):
        sp.transition("sleeping", None, sp.START)
    with pytest.raises(ValueError):
        sp.transition(sp.RUNNING, None, "reboot")
    with pytest.raises(ValueError):
        sp.transition(sp.RUNNING, None, sp.TERMINATE, cause="meteor")


def test_initial_state_and_drain_phases():
    assert sp.initial_state(boot_gate=True, marker_exists=False) == sp.FRESH
    assert sp.initial_state(boot_gate=True, marker_exists=True) == sp.RUNNING
    assert sp.initial_state(boot_gate=False, marker_exists=False) == sp.RUNNING
    assert {p: sp.drain_intent(p) for p in sp.DRAIN_PHASE_INTENTS} == {
        "cancelling": sp.DRAIN,
        "waiting": sp.DRAIN,
        "stopping": sp.DRAIN,
        "stopped": sp.STOPPED,
        "deadline": sp.PAUSE,
        "paused": sp.PAUSE,
    }
    assert sp.drain_intent("resumed") is None


def test_history_keeps_the_last_entries():
    history: List[dict] = []
    for i in range(sp.HISTORY_KEEP + 5):
        history = sp.append_history(history, sp.history_entry(i, "t", "a", "b", None, "x" * 300))
    assert len(history) == sp.HISTORY_KEEP
    assert history[0]["at"] == 5 and len(history[-1]["why"]) == 200
    assert "terminating" not in history[-1]
    assert sp.history_entry(1, "t", "a", "b", sp.SPOT, "")["terminating"] == sp.SPOT


# -- the record, its lock and its public copy -------------------------------------------------


def make_cfg(tmp_path, marker: bool = False, **extra):
    revision = tmp_path / "airflow" / ".deployed-revision"
    if marker:
        revision.parent.mkdir(exist_ok=True)
        revision.write_text("d-1\n")
    return config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "deploy": {"first_revision_marker": str(revision)},
            **extra,
        }
    )


def record(cfg) -> WorkerDoc:
    doc = StateStore(cfg.state_dir).read(WorkerDoc)
    assert doc is not None
    return doc


def public(cfg) -> dict:
    return json.loads(gate_path(cfg).read_text())


def test_a_change_is_saved_with_its_history_and_published_for_the_gate(tmp_path):
    cfg = make_cfg(tmp_path)
    assert gate_decision(cfg) == (False, f"worker state {sp.describe(sp.FRESH, None)} (record)")
    with WorkerRecord(cfg, clock=lambda: 1000.0).hold("test") as held:
        assert held.doc.state == sp.FRESH and not held.may_run
        held.require_start("first deployment")
    doc = record(cfg)
    assert (doc.state, doc.may_run, doc.changed_by, doc.reason) == (
        sp.RUNNING,
        True,
        "test",
        "first deployment",
    )
    assert doc.history == [
        {"at": 1000.0, "by": "test", "from": "fresh", "to": "running", "why": "first deployment"}
    ]
    assert public(cfg) == {
        "changed_at": 1000.0,
        "may_run": True,
        "reason": "",
        "state": "running",
        "terminating": None,
    }
    gate = gate_path(cfg)
    assert stat.S_IMODE(gate.stat().st_mode) == 0o644
    assert stat.S_IMODE(gate.parent.stat().st_mode) == 0o755
    assert gate_decision(cfg)[0] is True
    mark_terminating(cfg, sp.SPOT, "notice")
    assert public(cfg)["may_run"] is False and public(cfg)["terminating"] == "spot"
    assert record(cfg).terminating_since is not None


def test_the_gate_reads_the_public_copy_when_the_record_is_out_of_reach(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    with WorkerRecord(cfg).hold("test") as held:
        held.require_start("deployed")
    note_drain_phase(cfg, StateStore(cfg.state_dir), "stopped")

    def denied(self, doc_type):  # what the airflow user meets in the root 0700 state dir
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(StateStore, "read", denied)
    ok, why = gate_decision(cfg)
    assert not ok and "drained" in why and "(public copy)" in why
    gate_path(cfg).write_text("{not json")
    assert gate_decision(cfg)[0] is False  # damaged: held, never opened
    gate_path(cfg).write_text('{"state": "running", "terminating": null}')
    assert gate_decision(cfg)[0] is True
    gate_path(cfg).write_text('{"state": "running", "terminating": "spot"}')
    assert gate_decision(cfg)[0] is False
    gate_path(cfg).unlink()  # before any record: the marker rule (fresh without a revision)
    assert gate_decision(cfg)[0] is False


def test_a_public_directory_others_can_write_is_not_written_and_the_record_still_is(
    tmp_path, caplog
):
    cfg = make_cfg(tmp_path)
    gate_path(cfg).parent.mkdir(mode=0o777)
    os.chmod(gate_path(cfg).parent, 0o777)
    with WorkerRecord(cfg).hold("test") as held:
        held.require_start("x")  # a drain must not fail half-way over the copy
    assert not gate_path(cfg).exists()
    assert "cannot write the worker gate file" in caplog.text
    assert record(cfg).state == sp.RUNNING


def test_a_damaged_record_holds_the_worker(tmp_path):
    cfg = make_cfg(tmp_path, marker=True)
    StateStore(cfg.state_dir).save_raw("worker", {"version": 1, "state": "sleeping"})
    assert gate_decision(cfg)[0] is False


def test_one_holder_at_a_time_and_a_waiter_names_the_holder(tmp_path):
    cfg = make_cfg(tmp_path)
    with (
        WorkerRecord(cfg).hold("confapply"),
        pytest.raises(DeadlineError, match=r"held by pid \d+ \(confapply\) since"),
        WorkerRecord(cfg).hold("drain", wait=0.3),
    ):
        pass


def test_a_drain_waits_for_a_restart_in_progress_then_records_draining(tmp_path):
    cfg = make_cfg(tmp_path, marker=True)
    order: List[str] = []
    entered = threading.Event()

    def restart() -> None:
        with WorkerRecord(cfg).hold("confapply") as held:
            entered.set()
            order.append("restart begins" if held.may_run else "held")
            threading.Event().wait(0.5)  # the restart job takes a while
            order.append("restart ends")

    t = threading.Thread(target=restart)
    t.start()
    assert entered.wait(10)
    note_drain_phase(cfg, StateStore(cfg.state_dir), "cancelling")
    order.append("draining")
    t.join()
    assert order == ["restart begins", "restart ends", "draining"]
    assert record(cfg).state == sp.DRAINING


# -- confapply ---------------------------------------------------------------------------------


class FakeRuntime:
    def __init__(self):
        self.statuses: List[str] = []
        self.stopping = False

    def now(self) -> float:
        return 0.0

    def status(self, text: str) -> None:
        self.statuses.append(text)

    def busy(self, seconds):
        import contextlib

        return contextlib.nullcontext()

    def beat(self) -> None:
        pass


class UnitSystemctl(FakeSystemctl):
    def restart(self, unit: str) -> None:
        self.calls.append(f"restart {unit}")

    def wait_active(self, unit: str, timeout: float) -> None:
        pass

    def main_pid(self, unit: str) -> int:
        return 42

    def show(self, unit: str, *props):
        return {}


def confapply(cfg, systemctl):
    return Confapply(cfg, "worker", systemctl, FakeRuntime(), StateStore(cfg.state_dir))


@pytest.mark.parametrize(
    "phase", ["cancelling", "waiting", "stopping", "deadline", "paused", "stopped"]
)
def test_confapply_never_restarts_a_worker_a_drain_holds(tmp_path, phase, caplog):
    caplog.set_level("INFO")
    cfg = make_cfg(tmp_path, marker=True)
    note_drain_phase(cfg, StateStore(cfg.state_dir), phase)
    systemctl = UnitSystemctl("active")  # up (draining, paused at a deadline) or still stopping
    c = confapply(cfg, systemctl)
    outcome = c.apply("h" * 64)
    assert systemctl.calls == [] and outcome.ok
    assert outcome.skipped == ["airflow-worker"] and outcome.restarted == []
    assert any("not restarted: worker state" in s for s in c.rt.statuses)
    assert "reads the new config when it is next started" in c._idle_text()
    assert "reads the new config when it is next started" in caplog.text


def test_confapply_restarts_a_running_worker_and_a_terminating_one_never(tmp_path):
    cfg = make_cfg(tmp_path, marker=True)
    systemctl = UnitSystemctl("active")
    assert confapply(cfg, systemctl).apply("h" * 64).restarted == ["airflow-worker"]
    assert systemctl.calls == ["restart airflow-worker"]
    mark_terminating(cfg, sp.TERMINATION, "hook wait")
    systemctl.calls.clear()
    assert confapply(cfg, systemctl).apply("i" * 64).skipped == ["airflow-worker"]
    assert systemctl.calls == []


def test_confapply_waiting_too_long_for_the_record_is_a_failed_apply_retried_later(tmp_path):
    cfg = make_cfg(tmp_path, marker=True, confapply={"unit_timeout": 0.1})
    import agent.jobs.confapply.worker as daemon

    systemctl = UnitSystemctl("active")
    old = daemon.RESTART_SLACK
    daemon.RESTART_SLACK = 0.2
    try:
        with WorkerRecord(cfg).hold("undrain"):
            outcome = confapply(cfg, systemctl).apply("h" * 64)
    finally:
        daemon.RESTART_SLACK = old
    assert not outcome.ok and "held by pid" in outcome.failed["airflow-worker"]
    assert systemctl.calls == []


def test_a_worker_held_running_on_the_old_file_is_restarted_once_it_may_run(tmp_path):
    cfg = make_cfg(tmp_path, marker=True)
    store = StateStore(cfg.state_dir)
    note_drain_phase(cfg, store, "paused")  # a rebalance: up, not consuming, old file
    systemctl = UnitSystemctl("active")
    c = confapply(cfg, systemctl)
    assert c.apply("h" * 64).skipped == ["airflow-worker"]
    c._record("h" * 64, c.apply("h" * 64))
    assert store.read(ConfapplyDoc).held_pids == {"airflow-worker": 42}
    c.check("still paused")  # nothing until the record lets it run
    assert systemctl.calls == []
    with WorkerRecord(cfg).hold("undrain") as held:
        held.require_start("undrain")
    # a restarted confapply remembers it too (confapply.json)
    c = confapply(cfg, systemctl)
    c.applied_hash = None
    c.dirty = False
    c.check("periodic re-check")
    assert systemctl.calls == ["restart airflow-worker"]
    assert store.read(ConfapplyDoc).held_pids == {}
    c.check("again")
    assert systemctl.calls == ["restart airflow-worker"]


def test_a_held_worker_that_was_stopped_meanwhile_is_not_restarted_again(tmp_path):
    cfg = make_cfg(tmp_path, marker=True)
    note_drain_phase(cfg, StateStore(cfg.state_dir), "cancelling")
    systemctl = UnitSystemctl("active")
    c = confapply(cfg, systemctl)
    c.apply("h" * 64)
    assert c.held_pids == {"airflow-worker": 42}
    with WorkerRecord(cfg).hold("undrain") as held:
        held.require_start("undrain")
    systemctl.main_pid = lambda unit: 43  # drained, stopped and started: a new process
    c._resume_held()
    assert systemctl.calls == [] and c.held_pids == {}


# -- drain, undrain, lifecycle -----------------------------------------------------------------


def test_a_drain_moves_the_record_draining_then_drained_and_undrain_back(tmp_path):
    r = rig(tmp_path, worker=FakeWorker(busy=[(1, 0), (0, 0)]))
    cfg = r["cfg"]
    seen = []
    d = drainer(r, on_progress=lambda p: seen.append(record(cfg).state))
    d.drain()
    assert sp.DRAINING in seen
    doc = record(cfg)
    assert doc.state == sp.DRAINED and not doc.may_run
    assert [h["to"] for h in doc.history][-2:] == [sp.DRAINING, sp.DRAINED]
    assert drainer(r, cls=Undrainer).undrain() == "started"
    assert record(cfg).state == sp.RUNNING


def test_stop_consuming_pauses_the_record(tmp_path):
    r = rig(tmp_path)
    drainer(r).stop_consuming()
    assert record(r["cfg"]).state == sp.PAUSED


@pytest.mark.parametrize("cause", sp.CAUSES)
def test_undrain_refuses_on_a_terminating_instance_and_touches_nothing(tmp_path, cause):
    systemctl = FakeSystemctl("inactive")
    r = rig(tmp_path, systemctl=systemctl)
    mark_terminating(r["cfg"], cause, "notice")
    with pytest.raises(WorkerRefused, match="undrain refused: the instance is terminating"):
        drainer(r, cls=Undrainer).undrain()
    assert systemctl.calls == []
    assert record(r["cfg"]).terminating == cause


def test_lifecycle_marks_terminating_and_a_failure_to_does_not_stop_the_drain(tmp_path, caplog):
    cfg = make_cfg(tmp_path, marker=True)
    store = StateStore(cfg.state_dir)
    record_terminating(cfg, store, "spot", "spot:2026-11-30T22:00:00Z")
    assert record(cfg).terminating == sp.SPOT
    record_terminating(cfg, store, "terminate", "target:Terminated")
    assert record(cfg).terminating == sp.SPOT  # the first cause stays
    (tmp_path / "b").mkdir()
    broken = make_cfg(tmp_path / "b", marker=True)
    # the record cannot be touched at all (its lock file cannot be opened): logged, not raised
    (tmp_path / "b" / "state" / "worker.lock").mkdir(parents=True)
    record_terminating(broken, StateStore(broken.state_dir), "terminate", "target:Terminated")
    assert "cannot mark the worker terminating" in caplog.text


# -- bootstrap and role --apply ----------------------------------------------------------------


def test_start_gate_holds_refuses_and_saves_the_first_record(tmp_path):
    cfg = make_cfg(tmp_path)
    with boot_gate.start_gate(cfg, "scheduler", "bootstrap") as hold:
        assert hold == []
    assert StateStore(cfg.state_dir).read(WorkerDoc) is None  # other roles have no record
    with boot_gate.start_gate(cfg, "worker", "bootstrap") as hold:
        assert hold == ["airflow-worker"]  # fresh: enabled, not started
    assert record(cfg).state == sp.FRESH and public(cfg)["state"] == "fresh"
    with WorkerRecord(cfg).hold("test") as held:
        held.require_start("deployed")
    with boot_gate.start_gate(cfg, "worker", "role --apply") as hold:
        assert hold == []
    with boot_gate.start_gate(cfg, "worker", "bootstrap", "Warmed:Running") as hold:
        assert hold == ["airflow-worker"]
    note_drain_phase(cfg, StateStore(cfg.state_dir), "stopped")
    with boot_gate.start_gate(cfg, "worker", "bootstrap") as hold:
        assert hold == ["airflow-worker"]  # drained stays drained across cfn-init runs
    mark_terminating(cfg, sp.TERMINATION, "hook")
    for actor in ("bootstrap", "role --apply"):
        with (
            pytest.raises(WorkerRefused, match=f"{actor} refused: the instance is terminating"),
            boot_gate.start_gate(cfg, "worker", actor),
        ):
            pytest.fail("entered")
        with pytest.raises(WorkerRefused):
            boot_gate.refuse_if_terminating(cfg, "worker", actor)
    boot_gate.refuse_if_terminating(cfg, "scheduler", "bootstrap")


def test_the_worker_gate_command_exit_codes(tmp_path):
    cfg = make_cfg(tmp_path)
    args = SimpleNamespace()
    assert boot_gate.run(args, cfg) == 1  # fresh
    with WorkerRecord(cfg).hold("test") as held:
        held.require_start("deployed")
    assert boot_gate.run(args, cfg) == 0
    note_drain_phase(cfg, StateStore(cfg.state_dir), "paused")
    assert boot_gate.run(args, cfg) == 1


def test_undrain_waits_out_a_start_job_the_gate_is_skipping(tmp_path):
    # at boot the unit's start job may be in its ExecCondition, which read "fresh", while
    # ApplicationStart's undrain runs: undrain sees "activating", and must start it once the
    # gate has skipped that start (inactive), not conclude that it is starting anyway
    class Skipping(FakeSystemctl):
        def __init__(self):
            super().__init__("activating")
            self.polls = 0

        def active_state(self, unit: str) -> str:
            self.polls += 1
            if self.state == "activating" and self.polls > 3:
                self.state = "inactive"  # the gate said no
            return self.state

    systemctl = Skipping()
    r = rig(tmp_path, systemctl=systemctl)
    assert drainer(r, cls=Undrainer).undrain() == "started"
    assert systemctl.calls == ["reset-failed airflow-worker", "start airflow-worker"]


def test_status_shows_the_record(tmp_path):
    from agent.jobs.status import collect, render

    class NoSystemd:
        def manager_unreachable_reason(self):
            return "no systemd here"

    cfg = make_cfg(tmp_path, marker=True)
    mark_terminating(cfg, sp.SPOT, "notice")
    out = collect(cfg, NoSystemd())
    assert out["worker"]["state"] == "running" and out["worker"]["terminating"] == "spot"
    assert out["worker"]["may_run"] is False
    line = [ln for ln in render(out).splitlines() if ln.startswith("worker state")]
    assert line and "state=running terminating=spot may_run=False" in line[0], render(out)
