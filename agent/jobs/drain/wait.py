"""The drain's wait for an idle worker, on two witnesses.

Remote control (`inspect active` / `inspect reserved`) answers through the broker; the worker
unit's task processes (agent.worker.processes, read from the unit's cgroup) do not. A silent or
reconnecting broker alone never makes the worker idle: while remote control does not answer
(a broker restart did exactly that mid-drain), the drain keeps reporting and waiting on the
running task processes, and ends when they end. When both speak, both must say idle; when the
processes cannot be counted (a pool that is not prefork), remote control decides alone, and
when neither has spoken for drain.reply_timeout the drain falls back to a warm stop.
The decisions are agent.jobs.drain.plan.witness_decision (pure).
"""

from __future__ import annotations

import logging
from typing import Optional

from agent.errors import DeadlineError
from agent.jobs.drain import plan
from agent.jobs.drain.shell import DrainShell
from agent.worker.celery_control import BrokerUnreachable, NoReply, WorkerControl
from agent.worker.processes import Snapshot

log = logging.getLogger(__name__)

# while remote control is silent, how long each poll's ping waits before the processes decide
SILENT_PING = 2.0


def _pids(snap: Snapshot) -> str:
    tree = snap.tree
    if tree is None or not tree.tasks:
        return ""
    return " (pids " + ", ".join(str(t.pid) for t in tree.tasks) + ")"


def _witnesses(busy, tasks: Optional[int]) -> str:
    control = "remote control silent" if busy is None else "remote control idle"
    procs = "processes not countable" if tasks is None else "no task process"
    return f"{control}, {procs}"


class IdleWait(DrainShell):
    """The drain shell plus the wait; needs `self.processes` (the second witness)."""

    processes = None  # set by agent.jobs.drain.drainer.Drainer

    def wait_idle(self, control: WorkerControl, state: plan.DrainState) -> Optional[float]:
        """Poll both witnesses until the worker is idle: its time, None at a deadline with stop.

        Remote control (active, reserved) and the unit's task processes are asked each poll.
        When remote control stops answering (a broker restart, a reconnecting worker) the drain
        keeps waiting on the processes and says so; it gives up on remote control (a warm stop)
        only when neither witness has spoken for drain.reply_timeout."""
        cfg = self.cfg.drain
        last = None
        heard = self.clock()  # remote control's last answer
        silent = False
        uncounted_said = False
        while True:
            busy = self._ask_busy(control, state, silent)
            now = self.clock()
            if busy is not None:
                if silent:
                    log.warning(
                        "drain %s: remote control answers again after %.0fs",
                        state.node,
                        now - heard,
                    )
                heard, silent = now, False
            elif not silent:
                silent = True
                log.warning(
                    "drain %s: remote control does not answer; waiting on the task processes "
                    "of %s meanwhile",
                    state.node,
                    self.unit,
                )
            snap = self.processes.snapshot()
            tasks = snap.count
            if tasks is None and not uncounted_said:
                uncounted_said = True
                log.info(
                    "drain %s: task processes not countable (%s); remote control alone tells idle",
                    state.node,
                    snap.error or "the pool runs tasks in its main process",
                )
            silent_for = now - heard if silent else None
            decision = plan.witness_decision(
                busy,
                tasks,
                silent_for or 0.0,
                cfg.reply_timeout,
                now,
                state.deadline,
                cfg.on_deadline,
            )
            if decision == plan.BLIND:
                raise NoReply(
                    f"{state.node} did not answer remote control for {now - heard:.0f}s and "
                    f"its task processes cannot be counted"
                )
            active, reserved = busy if busy is not None else (tasks or 0, 0)
            seen = (busy, tasks, silent)
            line = plan.status_line(
                "waiting", state.node, active, reserved, state.remaining(now), tasks, silent_for
            )
            if seen != last:
                self._record_witnesses(state, tasks, heard if silent else None)
                log.info(line + _pids(snap))
                last = seen
            self.progress(state, active, reserved, message=line)
            if decision == plan.IDLE:
                log.info(
                    "drain %s: idle after %.1fs (%s)",
                    state.node,
                    now - state.started,
                    _witnesses(busy, tasks),
                )
                return now
            if decision == plan.DEADLINE_FAIL:
                self.set_phase(
                    state, "deadline", f"{active} running, {reserved} reserved at the deadline"
                )
                raise DeadlineError(
                    f"drain deadline passed with {active} task(s) running and {reserved} reserved "
                    f"on "
                    f"{state.node}; {self.unit} left running without consumers "
                    f"(drain again to keep waiting, or undrain)"
                )
            if decision == plan.DEADLINE_STOP:
                log.warning(
                    "drain %s: deadline passed with %d task(s) running; stopping %s anyway "
                    "(drain.on_deadline=stop)",
                    state.node,
                    active,
                    self.unit,
                )
                return None
            if self.condition() == plan.UNIT_STOPPED:
                raise NoReply(f"{self.unit} stopped while draining")
            self.sleep(plan.next_sleep(cfg.poll_interval, self.clock(), state.deadline))

    def _ask_busy(
        self, control: WorkerControl, state: plan.DrainState, silent: bool
    ) -> Optional[tuple]:
        """Remote control's (active, reserved), or None when it does not answer.

        While it is silent a short ping comes first: a worker whose broker connection is being
        re-established would make every full inspect wait drain.reply_timeout, and the
        processes are counted meanwhile. A failed call on a unit that is no longer running
        raises: the unit is stopping (or stopped), which the caller finishes."""
        try:
            if silent and not control.ping(timeout=min(SILENT_PING, self.cfg.drain.reply_timeout)):
                return None
            return control.busy()
        except (BrokerUnreachable, NoReply) as exc:
            if self.condition() != plan.UNIT_RUNNING:
                raise
            if not silent:
                log.info("drain %s: remote control: %s", state.node, exc)
            return None

    def _record_witnesses(
        self, state: plan.DrainState, tasks: Optional[int], silent_since: Optional[float]
    ) -> None:
        if (state.task_processes, state.silent_since) != (tasks, silent_since):
            state.task_processes, state.silent_since = tasks, silent_since
            self.save(state)
