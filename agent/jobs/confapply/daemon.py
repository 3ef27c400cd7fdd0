"""`airflow-agent confapply`: restart the role's Airflow units when their config *content* changes.

A `Type=notify` daemon. It watches the env file (and `confapply.watch`) with watchdog's inotify
observer on each file's parent directory (an atomic replace arrives as a *moved* event whose
dest is the file) and compares a sha256 of the files' contents with the hash it last applied,
kept in the state dir (`confapply.json`, declared in agent/jobs/confapply/state.py). So an
agent restart, a `touch` or an identical rewrite restarts nothing, and a change made while it
was down is applied by the check it does on start.

Rules (pure parts in `agent.jobs.confapply.plan`):
- a burst of events becomes one check: debounce `confapply.debounce`, at most `max_wait`;
- events arriving while units restart start a new burst, so they are applied after, not lost;
- units restart one at a time in `units_for(role)` order, each checked active before the next
  (`unit_timeout`); a unit that hit the start limit is `reset-failed` and retried once;
  a unit that is `inactive` (stopped on purpose: drained, boot gate) is left alone;
- a pass that restarts anything first takes one of the role's fleet-wide restart slots
  (agent.airflow.restart_slot: at most `coordination.slots[role]` instances of the role
  restart at once; uncoordinated, with a warning, when none can be had within
  `coordination.timeout`), held for the whole pass and taken outside the worker record's lock;
- the Celery worker is restarted only while its record (agent.worker.state) says it is meant
  to run, decided and restarted under the record's lock: a paused, draining, drained or
  terminating worker is left alone (it reads the new file when next started), and the log and
  STATUS= say so; one left *running* on the old file (paused) is restarted by the first check
  after its record lets it run again, if it is still the same process (`held_pids`);
- the hash is recorded as applied only when every restart succeeded; after an apply the files
  are hashed again and a change made meanwhile is applied at once; a failure is retried at the
  next event or after `recheck_interval` (also a safety net for a missed event), and until an
  apply succeeds even a return to the last applied content restarts the units (one of them
  already ran or failed with the newer content);
- it runs on the daemon runtime (agent/runtime/daemon.py): READY=1 only after the initial
  check; STATUS= on every step; WATCHDOG=1 only while the loop is alive (a restart counts as
  alive for `unit_timeout` + 60 s, the bound of one restart); SIGTERM/SIGINT set the stop
  event, the loop stops between units and exits 0. Without $WATCHDOG_USEC it pings every
  `confapply.watchdog_interval`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading
import time
from typing import Optional

from agent.errors import AgentError
from agent.events.publish import record
from agent.jobs.confapply.plan import (
    ApplyOutcome,
    Coalescer,
    content_hash,
    is_relevant,
    needs_apply,
    should_reset_and_retry,
    units_to_restart,
)
from agent.jobs.confapply.state import ConfapplyDoc, read_contents, watched_paths
from agent.jobs.confapply.worker import HELD, RESTART_SLACK, WorkerHold
from agent.runtime.daemon import Daemon, DaemonRuntime
from agent.state import StateStore

log = logging.getLogger(__name__)

# filesystem events that can mean new content; opened/closed-without-write are our own reads
_CONTENT_EVENTS = ("created", "modified", "moved", "deleted", "closed")


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """confapply takes no options of its own: it is the daemon."""


class Confapply(WorkerHold, Daemon):
    def __init__(self, cfg, role: str, systemctl, runtime: DaemonRuntime, state=None):
        self.cfg = cfg
        self.role = role
        self.units = cfg.units_for(role)
        self.files = watched_paths(cfg)
        self.systemctl = systemctl
        self.rt = runtime
        self.clock = runtime.now
        self.state = state or StateStore(cfg.state_dir)
        self.lock = threading.Lock()
        self.coalescer = Coalescer(cfg.confapply.debounce, cfg.confapply.max_wait)
        self.next_recheck: Optional[float] = None
        doc = self.state.load_doc(ConfapplyDoc) or ConfapplyDoc()
        self.applied_hash: Optional[str] = doc.applied_hash
        # the last apply failed part-way: apply again whatever the content (see needs_apply)
        self.dirty = doc.last_result == "failed"
        self.restarts = 0
        self.checks = 0
        self.status_text = "starting"
        self.held_note = ""  # why the last apply left the worker alone, for STATUS=
        # worker unit -> MainPID it had when a hold kept it from being restarted
        self.held_pids = dict(doc.held_pids)
        self._observer = None

    # -- events (observer thread) ----------------------------------------------------------

    def on_event(self, event) -> None:
        if event.event_type not in _CONTENT_EVENTS:
            return
        paths = [getattr(event, "src_path", None), getattr(event, "dest_path", None)]
        paths = [os.fsdecode(p) if isinstance(p, bytes) else p for p in paths]
        if not is_relevant(paths, self.files):
            return
        with self.lock:
            self.coalescer.note(self.clock())
        self.rt.nudge()

    def start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        outer = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):  # noqa: D401 - watchdog callback
                outer.on_event(event)

        observer = Observer()
        dirs = []
        for f in self.files:
            d = os.path.dirname(f)
            if d not in dirs:
                dirs.append(d)
        for d in dirs:
            if not os.path.isdir(d):
                # the periodic re-check still covers files in it; log once, do not die
                log.warning(
                    "cannot watch %s: directory missing; relying on the periodic re-check", d
                )
                continue
            observer.schedule(Handler(), d, recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    # -- applying ------------------------------------------------------------------------------

    def _restart_one(self, unit: str) -> Optional[str]:
        """Restart `unit` and wait for it to be active; None on success, else why not."""
        timeout = self.cfg.confapply.unit_timeout
        retried = False
        while True:
            try:
                with self.rt.busy(timeout + RESTART_SLACK):
                    self.systemctl.restart(unit)
                    self.systemctl.wait_active(unit, timeout)
                return None
            except AgentError as exc:
                result = self.systemctl.show(unit, "Result").get("Result", "")
                if should_reset_and_retry(result, retried):
                    log.warning(
                        "%s hit systemd's start limit; reset-failed and retrying once", unit
                    )
                    self.systemctl.reset_failed(unit)
                    retried = True
                    continue
                return f"{exc}" + (f" (Result={result})" if result else "")

    def apply(self, new_hash: str) -> ApplyOutcome:
        states = {u: self.systemctl.active_state(u) for u in self.units}
        restart, skip = units_to_restart(self.units, states)
        outcome = ApplyOutcome(hash=new_hash, skipped=skip)
        self.held_note = ""
        for u in skip:
            log.info("%s is %s: not restarted (it reads the new file when started)", u, states[u])
        # one fleet-wide slot of the role for the whole pass (agent.airflow.restart_slot)
        with self._restart_slot() if restart else contextlib.nullcontext():
            for i, unit in enumerate(restart, 1):
                if self.rt.stopping:
                    outcome.interrupted = True
                    break
                self.rt.status(f"restarting {unit} ({i}/{len(restart)}) for config {new_hash[:12]}")
                log.info("restarting %s (%d/%d) for config %.12s", unit, i, len(restart), new_hash)
                why = (
                    self._restart_worker(unit) if self._is_worker(unit) else self._restart_one(unit)
                )
                if why == HELD:
                    outcome.skipped.append(unit)
                elif why is None:
                    outcome.restarted.append(unit)
                    self.restarts += 1
                    record(self.cfg, "ConfapplyRestarts", role=self.role)
                    log.info(
                        "%s restarted and active (MainPID %s)", unit, self.systemctl.main_pid(unit)
                    )
                else:
                    outcome.failed[unit] = why
                    record(self.cfg, "ConfapplyRestartFailures", role=self.role)
                    log.error("restart of %s failed: %s", unit, why)
                    # later units keep the old config too; the whole apply is retried
                    break
        return outcome

    def _refresh_role(self) -> None:
        # `role --apply` may switch the role while this (shared) unit keeps running
        from agent.jobs.role import current_role

        role = current_role(self.cfg)
        if role and role != self.role:
            log.info(
                "role changed %s -> %s; now restarting %s",
                self.role,
                role,
                ", ".join(self.cfg.units_for(role)),
            )
            self.role, self.units = role, self.cfg.units_for(role)

    def check(self, reason: str) -> None:
        """Hash; when it differs from the applied hash, restart; repeat until stable or failed."""
        self._refresh_role()
        if self.held_pids:
            self._resume_held()
        while not self.rt.stopping:
            self.rt.beat()
            h = content_hash(read_contents(self.files))
            self.checks += 1
            if not needs_apply(self.applied_hash, h, self.dirty):
                log.debug("check (%s): content unchanged (%.12s)", reason, h)
                self.status_text = self._idle_text()
                return
            if self.applied_hash is None and not self.dirty:
                # first run on this instance: the units were started with this content
                log.info("no applied hash on record; adopting the current content %.12s", h)
                self._record(h, ApplyOutcome(hash=h))
                self.status_text = self._idle_text()
                return
            log.info(
                "config changed (%s): %.12s -> %.12s; restarting %s",
                reason,
                self.applied_hash,
                h,
                ", ".join(self.units),
            )
            outcome = self.apply(h)
            if not outcome.ok:
                self.dirty = True
                log.error(
                    "apply of %.12s incomplete: %s; retrying on the next change or in %.0fs",
                    h,
                    outcome.summary(),
                    self.cfg.confapply.recheck_interval,
                )
                self.state.update_doc(
                    ConfapplyDoc,
                    last_result="failed",
                    last_error=outcome.summary(),
                    last_attempt=time.time(),
                    pending_hash=h,
                )
                self.status_text = f"apply of {h[:12]} failed: {outcome.summary()}"[:200]
                return
            self._record(h, outcome)
            log.info("applied %.12s: %s", h, outcome.summary())
            reason = "re-check after apply"

    def _record(self, h: str, outcome: ApplyOutcome) -> None:
        self.applied_hash = h
        self.dirty = False
        self.state.save_doc(
            ConfapplyDoc(
                applied_hash=h,
                applied_at=time.time(),
                role=self.role,
                units=list(self.units),
                files=list(self.files),
                last_result="ok",
                last_restarted=list(outcome.restarted),
                last_skipped=list(outcome.skipped),
                held_pids=dict(self.held_pids),
            )
        )

    def _idle_text(self) -> str:
        return (
            f"watching {len(self.files)} file(s); applied {str(self.applied_hash)[:12]}"
            f"; {self.checks} check(s), {self.restarts} restart(s) since start"
            + (f"; {self.held_note}" if self.held_note else "")
        )

    # -- the daemon's decisions (the runtime runs the loop) --------------------------------------

    def start(self) -> None:
        self.state.ensure()
        self.start_observer()  # before the initial check, so no change slips between
        log.info(
            "role %s, units %s, files %s",
            self.role,
            ",".join(self.units),
            ",".join(self.files),
        )

    def step(self) -> float:
        recheck = self.cfg.confapply.recheck_interval
        if self.next_recheck is None:
            self.check("start-up")
            self.next_recheck = self.clock() + recheck
        else:
            now = self.clock()
            with self.lock:
                n = self.coalescer.take() if self.coalescer.due(now) else 0
            if n:
                self.check(f"{n} file event(s)")
                self.next_recheck = self.clock() + recheck
            elif now >= self.next_recheck:
                self.check("periodic re-check")
                self.next_recheck = self.clock() + recheck
        now = self.clock()
        wait = self.next_recheck - now
        with self.lock:
            due_at = self.coalescer.due_at()
        if due_at is not None:
            wait = min(wait, due_at - now)
        return max(0.0, wait)

    def status(self) -> str:
        return self.status_text

    def close(self) -> None:
        self.stop_observer()
        log.info("confapply stopped; %d restart(s) since start", self.restarts)


def resolve_role(cfg) -> str:
    from agent.jobs.role import current_role, detect_role

    role = current_role(cfg)
    if role is None:
        role = detect_role(cfg)
    return role


def run(args: argparse.Namespace, cfg) -> int:
    from agent.platform.systemd import Systemctl

    role = resolve_role(cfg)
    systemctl = Systemctl(cfg.systemctl, timeout=max(120.0, cfg.confapply.unit_timeout + 30))
    runtime = DaemonRuntime("confapply", watchdog_fallback=cfg.confapply.watchdog_interval)
    return runtime.run(Confapply(cfg, role, systemctl, runtime))
