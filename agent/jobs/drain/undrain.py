"""`undrain`: let the local Celery worker consume again after a drain (or a stop-consuming).

What to do comes from `plan.undrain_action`: start a stopped worker unit (waiting first for
one that is still stopping) and wait until it answers a ping, or re-add on a running worker
the consumers the drain cancelled (recorded in drain.json), checked with `active_queues`. The
drain document is removed after. First, under the worker's record lock (agent.worker.state),
the record moves to `running`: refused (exit 1, nothing touched) on a terminating or
Spot-noticed instance.
"""

from __future__ import annotations

import logging
from typing import Optional

from agent.errors import AgentError, DeadlineError
from agent.jobs.drain import plan
from agent.jobs.drain.broker import read_broker
from agent.jobs.drain.control import ping_waits
from agent.jobs.drain.shell import DrainShell
from agent.jobs.drain.state import DrainLock
from agent.worker.celery_control import QueueSpec
from agent.worker.state import WorkerRecord

log = logging.getLogger(__name__)


class Undrainer(DrainShell):
    def undrain(self, timeout: Optional[float] = None) -> str:
        """Let the worker consume again; returns started / consumers-added / nothing."""
        timeout = float(timeout if timeout is not None else max(self.cfg.drain.reply_timeout, 60.0))
        until = self.clock() + timeout
        lock = DrainLock(self.store)
        lock.acquire(until, self.clock, self.sleep)
        try:
            record = WorkerRecord(self.cfg, self.store, clock=self.clock, sleep=self.sleep)
            with record.hold("undrain", wait=max(1.0, until - self.clock())) as held:
                # refused on a terminating instance; else the record says running before the
                # unit starts (its ExecCondition reads it) or the consumers come back
                held.require_start("undrain")
                return self._undrain(until)
        finally:
            lock.release()

    def _undrain(self, until: float) -> str:
        state = self.store.load_doc(plan.DrainState)
        condition = self.condition()
        while condition == plan.UNIT_STARTING and self.clock() < until:
            # a start job may be in the unit's ExecCondition (the boot gate), deciding from the
            # record as it was before this undrain: see how it ends before deciding
            self.sleep(0.2)
            condition = self.condition()
        action = plan.undrain_action(state, condition)
        if action == plan.WAIT_STOPPED_THEN_START:
            if not self.wait_unit_stopped(until):
                raise DeadlineError(f"{self.unit} is still stopping; not started")
            action = plan.START_UNIT
        if action == plan.START_UNIT:
            self.systemctl.reset_failed(self.unit)
            self.systemctl.start(self.unit)
            log.info("undrain: started %s", self.unit)
            self._wait_started(until)
            done = "started"
        elif action == plan.ADD_CONSUMERS:
            assert state is not None
            self._add_consumers(state, until)
            done = "consumers-added"
        else:
            log.info("undrain: %s is running and no drain is recorded; nothing to do", self.unit)
            done = "nothing"
        self.store.delete(plan.DrainState)
        self.notifier.status(f"undrained {self.node}: {done}")
        return done

    def _wait_answer(self, control, until: float, failure: str) -> None:
        """Until the worker answers a ping; DeadlineError(failure) at `until`. A ping sent
        before a starting worker listens is lost: ping again, each wait longer (a loaded
        worker is slow), up to drain.reply_timeout, never past `until`."""
        waits = ping_waits(self.cfg.drain.reply_timeout)
        while not control.ping(timeout=max(0.1, min(next(waits), until - self.clock()))):
            if self.clock() >= until:
                raise DeadlineError(failure)

    def _wait_started(self, until: float) -> None:
        """A started worker is consuming once it answers a ping (Celery answers only after
        its consumers are up): undrain returns then, not when systemd has forked it. With a
        broker that has no remote control, the start is all there is to wait for; with a
        broker it cannot read, it says so and returns (the unit is started; a deployment's
        ValidateService pings it again and fails there)."""
        try:
            settings = read_broker(self.cfg)
        except AgentError as exc:
            log.warning(
                "undrain: started %s, but cannot ask whether it answers: %s", self.unit, exc
            )
            return
        if not settings.remote_control:
            log.info("undrain: broker %s:// has no remote control; not waiting", settings.scheme)
            return
        with self.control_factory(settings, self.node) as control:
            self._wait_answer(
                control, until, f"{self.unit} started, but {self.node} did not answer a ping "
                "before the timeout; see its journal"
            )  # fmt: skip
        log.info("undrain: %s answers", self.node)

    def _add_consumers(self, state: plan.DrainState, until: float) -> None:
        settings = read_broker(self.cfg)
        if not settings.remote_control:
            raise AgentError(
                f"broker {settings.scheme}:// has no remote control: "
                f"restart {self.unit} to consume again"
            )
        with self.control_factory(settings, state.node) as control:
            self._wait_answer(control, until, f"{state.node} did not answer remote control; "
                              "consumers not restored")  # fmt: skip
            consuming = [q.name for q in control.active_queues()]
            for q in plan.missing_queues(state.queues, consuming):
                control.add_consumer(QueueSpec.from_dict(q))
                log.info("undrain %s: consuming queue %s again", state.node, q["name"])
            left = self.settle(
                control,
                lambda names: [q["name"] for q in plan.missing_queues(state.queues, names)],
                "add_consumer",
            )
            if left:
                raise AgentError(
                    f"{state.node} still does not consume {', '.join(left)} after add_consumer"
                )
