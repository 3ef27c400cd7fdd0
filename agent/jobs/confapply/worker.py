"""confapply and the worker's record (agent.worker.state): the Celery worker is restarted only
while its record says it is meant to run, decided and restarted under the record's lock, so a
drain that has begun, a pause, a drained or terminating worker is never restarted under the
actor that holds it. A worker left *running* on the old file (paused, or a drain that ended at
its deadline) is restarted by the first check after the record lets it run again, when it is
still the same process (`held_pids`, persisted in confapply.json). Every restart pass holds
the role's fleet-wide restart slot (`_restart_slot`, agent.airflow.restart_slot), taken before
and outside the record's lock: waiting for a slot never holds up a drain. A mixin of
agent.jobs.confapply.daemon.Confapply (its cfg, role, systemctl, runtime, store, restart).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from typing import Iterator, Optional

from agent.airflow.restart_guard import restart_guard
from agent.airflow.restart_slot_plan import REPORT_GRACE
from agent.errors import AgentError
from agent.jobs.confapply.state import ConfapplyDoc
from agent.worker.state import WorkerRecord

log = logging.getLogger("agent.jobs.confapply.daemon")

# how long past `unit_timeout` one restart may block the loop (systemctl itself, the start
# limit's reset-failed) before the watchdog stops vouching for it
RESTART_SLACK = 60.0
# _restart_worker's answer when the worker's record says it must not run now
HELD = "held by the worker's state"


class WorkerHold:
    @contextlib.contextmanager
    def _restart_slot(self) -> Iterator[None]:
        """One pass over this instance's units as every restart is done
        (agent.airflow.restart_guard): in the role's fleet-wide restart slot and, on an
        api-server behind a load balancer, out of its rotation. The watchdog is told how long
        taking (slot, deregistration) and leaving (registration, health) may block. Taken
        outside the worker record's lock, so waiting for a slot never holds up a drain."""
        tg = self.cfg.target_group
        enter = self.cfg.coordination.timeout + REPORT_GRACE + RESTART_SLACK + tg.deregister_timeout
        leave = tg.register_timeout + self.cfg.deploy.validate_timeout + RESTART_SLACK
        self.rt.status(f"waiting for a restart slot of the {self.role} role")
        guard = contextlib.ExitStack()
        with self.rt.busy(enter):
            guard.enter_context(
                restart_guard(
                    self.cfg, self.role, socket.gethostname(), stop=lambda: self.rt.stopping
                )
            )
        try:
            yield
        except BaseException:
            with self.rt.busy(leave):
                guard.__exit__(*sys.exc_info())
            raise
        with self.rt.busy(leave):
            guard.close()

    @contextlib.contextmanager
    def _worker_record(self) -> Iterator:
        """The worker's record held under its lock for one decision and its restart; the
        watchdog is told the pass may block that long (a restart, or waiting for the lock)."""
        wait = self.cfg.confapply.unit_timeout + RESTART_SLACK
        with (
            self.rt.busy(wait),
            WorkerRecord(self.cfg, self.state).hold("confapply", wait=wait) as held,
        ):
            yield held

    def _is_worker(self, unit: str) -> bool:
        def bare(name: str) -> str:
            return name[: -len(".service")] if name.endswith(".service") else name

        return self.role == "worker" and bare(unit) == bare(self.cfg.drain.worker_unit)

    def _restart_worker(self, unit: str) -> Optional[str]:
        """Restart the Celery worker only while its record says it is meant to run, deciding
        and restarting under the record's lock (agent.worker.state): a drain that has begun,
        a pause, a drained or terminating worker is left alone; it reads the new file when it
        is next started. HELD when left alone."""
        try:
            with self._worker_record() as held:
                if held.may_run:
                    return self._restart_one(unit)
                self.held_note = (
                    f"{unit} not restarted: worker state {held.describe()}; "
                    "it reads the new config when it is next started"
                )
                # a paused worker keeps running with the old file: once it may run again (and
                # is still that process), the next check restarts it (_resume_held)
                pid = self.systemctl.main_pid(unit)
                if pid:
                    self.held_pids[unit] = pid
        except AgentError as exc:  # the lock stayed held: retried like a failed restart
            return str(exc)
        log.info("%s", self.held_note)
        self.rt.status(self.held_note[:200])
        return HELD

    def _resume_held(self) -> None:
        """Restart a worker left running with an older config while its record held it (paused,
        or a drain that ended at its deadline), once the record lets it run again; not when it
        has been stopped or restarted since (a new MainPID read the new file)."""
        for unit, pid in list(self.held_pids.items()):
            try:
                with self._worker_record() as held:  # a look first: a slot only if needed
                    if not held.may_run:
                        continue
                    stale = self.systemctl.main_pid(unit) == pid
                if stale:
                    with self._restart_slot(), self._worker_record() as held:
                        if not held.may_run:
                            continue
                        if self.systemctl.main_pid(unit) == pid:
                            log.info(
                                "%s may run again and still runs the config of before its "
                                "hold (MainPID %s): restarting it",
                                unit,
                                pid,
                            )
                            why = self._restart_one(unit)
                            if why is not None:
                                log.error("restart of %s failed: %s; retrying later", unit, why)
                                continue
                            self.restarts += 1
            except AgentError as exc:
                log.warning("%s: %s; retrying later", unit, exc)
                continue
            del self.held_pids[unit]
            self.held_note = ""
        self.state.update_doc(ConfapplyDoc, held_pids=dict(self.held_pids))
