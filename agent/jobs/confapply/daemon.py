"""`airflow-agent confapply`: restart the role's Airflow units when their config *content* changes.

A `Type=notify` daemon. It watches the env file (and `confapply.watch`) with watchdog's inotify
observer on each file's parent directory (an atomic replace arrives as a *moved* event whose
dest is the file) and compares a sha256 of the files' contents with the hash it last applied,
kept in the state dir (`confapply.json`). So an agent restart, a `touch` or an identical rewrite
restarts nothing, and a change made while it was down is applied by the check it does on start.

Rules (pure parts in `agent.jobs.confapply.plan`):
- a burst of events becomes one check: debounce `confapply.debounce`, at most `max_wait`;
- events arriving while units restart start a new burst, so they are applied after, not lost;
- units restart one at a time in `units_for(role)` order, each checked active before the next
  (`unit_timeout`); a unit that hit the start limit is `reset-failed` and retried once;
  a unit that is `inactive` (stopped on purpose: drained, boot gate) is left alone;
- the hash is recorded as applied only when every restart succeeded; after an apply the files
  are hashed again and a change made meanwhile is applied at once; a failure is retried at the
  next event or after `recheck_interval` (also a safety net for a missed event), and until an
  apply succeeds even a return to the last applied content restarts the units (one of them
  already ran or failed with the newer content);
- READY=1 only after the initial check; STATUS= on every step; WATCHDOG=1 from a small thread
  that pings only while the main loop is alive (or inside a bounded restart);
- SIGTERM/SIGINT set a flag; the loop stops between units and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Callable, List, Optional

from agent.errors import EXIT_OK, AgentError
from agent.jobs.confapply.plan import (
    ApplyOutcome,
    Coalescer,
    content_hash,
    is_relevant,
    needs_apply,
    should_reset_and_retry,
    units_to_restart,
    watchdog_interval,
    watched_files,
)
from agent.state import StateStore

log = logging.getLogger(__name__)

STATE_DOC = "confapply"
# filesystem events that can mean new content; opened/closed-without-write are our own reads
_CONTENT_EVENTS = ("created", "modified", "moved", "deleted", "closed")


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--once",
        action="store_true",
        help="do the start-up check (restart if content differs from the applied hash), exit",
    )


def read_contents(files: List[str]):
    out = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                out.append((f, fh.read()))
        except FileNotFoundError:
            out.append((f, None))
    return out


def current_hash(cfg) -> str:
    """The content hash of the watched files now (also used by `status`)."""
    return content_hash(read_contents(_abs_files(cfg)))


def _abs_files(cfg) -> List[str]:
    return [os.path.abspath(f) for f in watched_files(cfg.env.file, cfg.confapply.watch)]


class Confapply:
    def __init__(
        self,
        cfg,
        role: str,
        systemctl,
        notifier,
        state: Optional[StateStore] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg = cfg
        self.role = role
        self.units = cfg.units_for(role)
        self.files = _abs_files(cfg)
        self.systemctl = systemctl
        self.notifier = notifier
        self.state = state or StateStore(cfg.state_dir)
        self.clock = clock
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.coalescer = Coalescer(cfg.confapply.debounce, cfg.confapply.max_wait)
        self.stopping = False
        self.next_recheck = 0.0
        doc = self.state.load(STATE_DOC)
        self.applied_hash: Optional[str] = doc.get("applied_hash")
        # the last apply failed part-way: apply again whatever the content (see needs_apply)
        self.dirty = doc.get("last_result") == "failed"
        self.restarts = 0
        self.checks = 0
        # watchdog pinger: main loop heartbeat, and a deadline while a restart may block it
        self._beat = clock()
        self._busy_until = 0.0
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
        self.wake.set()

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

    # -- signals and watchdog ----------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        self.stopping = True
        self.wake.set()

    def start_pinger(self) -> Optional[float]:
        interval = watchdog_interval(
            self.cfg.confapply.watchdog_interval, os.environ.get("WATCHDOG_USEC")
        )
        if interval is None:
            return None

        def ping() -> None:
            while not self.stopping:
                now = self.clock()
                # a wedged main loop must not be kept alive by this thread
                if now - self._beat < 2 * interval + 1 or now < self._busy_until:
                    self.notifier.watchdog()
                time.sleep(interval)

        threading.Thread(target=ping, name="watchdog-ping", daemon=True).start()
        return interval

    # -- applying ------------------------------------------------------------------------------

    def _restart_one(self, unit: str) -> Optional[str]:
        """Restart `unit` and wait for it to be active; None on success, else why not."""
        timeout = self.cfg.confapply.unit_timeout
        retried = False
        while True:
            self._busy_until = self.clock() + timeout + 60
            try:
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
            finally:
                self._busy_until = 0.0

    def apply(self, new_hash: str) -> ApplyOutcome:
        states = {u: self.systemctl.active_state(u) for u in self.units}
        restart, skip = units_to_restart(self.units, states)
        outcome = ApplyOutcome(hash=new_hash, skipped=skip)
        for u in skip:
            log.info("%s is %s: not restarted (it reads the new file when started)", u, states[u])
        for i, unit in enumerate(restart, 1):
            if self.stopping:
                outcome.interrupted = True
                break
            self.notifier.status(
                f"restarting {unit} ({i}/{len(restart)}) for config {new_hash[:12]}"
            )
            log.info("restarting %s (%d/%d) for config %.12s", unit, i, len(restart), new_hash)
            why = self._restart_one(unit)
            if why is None:
                outcome.restarted.append(unit)
                self.restarts += 1
                log.info(
                    "%s restarted and active (MainPID %s)", unit, self.systemctl.main_pid(unit)
                )
            else:
                outcome.failed[unit] = why
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
        while not self.stopping:
            self._beat = self.clock()
            h = content_hash(read_contents(self.files))
            self.checks += 1
            if not needs_apply(self.applied_hash, h, self.dirty):
                log.debug("check (%s): content unchanged (%.12s)", reason, h)
                self._status_idle()
                return
            if self.applied_hash is None and not self.dirty:
                # first run on this instance: the units were started with this content
                log.info("no applied hash on record; adopting the current content %.12s", h)
                self._record(h, ApplyOutcome(hash=h))
                self._status_idle()
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
                self.state.update(
                    STATE_DOC,
                    last_result="failed",
                    last_error=outcome.summary(),
                    last_attempt=time.time(),
                    pending_hash=h,
                )
                self.notifier.status(f"apply of {h[:12]} failed: {outcome.summary()}"[:200])
                return
            self._record(h, outcome)
            log.info("applied %.12s: %s", h, outcome.summary())
            reason = "re-check after apply"

    def _record(self, h: str, outcome: ApplyOutcome) -> None:
        self.applied_hash = h
        self.dirty = False
        self.state.save(
            STATE_DOC,
            {
                "applied_hash": h,
                "applied_at": time.time(),
                "role": self.role,
                "units": self.units,
                "files": self.files,
                "last_result": "ok",
                "last_restarted": outcome.restarted,
                "last_skipped": outcome.skipped,
            },
        )

    def _idle_text(self) -> str:
        return (
            f"watching {len(self.files)} file(s); applied {str(self.applied_hash)[:12]}"
            f"; {self.checks} check(s), {self.restarts} restart(s) since start"
        )

    def _status_idle(self) -> None:
        self.notifier.status(self._idle_text())

    # -- the loop --------------------------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        self.state.ensure()
        if not once:
            self.start_observer()  # before the initial check, so no change slips between
        self.check("start-up")
        if once:
            return EXIT_OK
        interval = self.start_pinger()
        self.notifier.ready(self._idle_text())
        log.info(
            "ready: role %s, units %s, files %s, watchdog %s",
            self.role,
            ",".join(self.units),
            ",".join(self.files),
            f"{interval:g}s" if interval else "off",
        )
        recheck = self.cfg.confapply.recheck_interval
        self.next_recheck = self.clock() + recheck
        tick = min(interval or 5.0, 5.0)
        while not self.stopping:
            # cleared before looking, so an event set while we work is never lost
            self.wake.clear()
            self._beat = now = self.clock()
            with self.lock:
                due_at = self.coalescer.due_at()
                if self.coalescer.due(now):
                    n = self.coalescer.take()
                    due_at = None
                else:
                    n = 0
            if n:
                self.check(f"{n} file event(s)")
                self.next_recheck = self.clock() + recheck
                continue
            if now >= self.next_recheck:
                self.check("periodic re-check")
                self.next_recheck = self.clock() + recheck
                continue
            wait = min(tick, self.next_recheck - now)
            if due_at is not None:
                wait = min(wait, due_at - now)
            self.wake.wait(max(0.0, wait))
        self.notifier.stopping()
        self.stop_observer()
        log.info("stopping on signal; %d restart(s) since start", self.restarts)
        return EXIT_OK


def resolve_role(cfg) -> str:
    from agent.jobs.role import current_role, detect_role

    role = current_role(cfg)
    if role is None:
        role = detect_role(cfg)
    return role


def run(args: argparse.Namespace, cfg) -> int:
    from agent.platform.notify import Notifier
    from agent.platform.systemd import Systemctl

    role = resolve_role(cfg)
    systemctl = Systemctl(cfg.systemctl, timeout=max(120.0, cfg.confapply.unit_timeout + 30))
    daemon = Confapply(cfg, role, systemctl, Notifier())
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    return daemon.run(once=args.once)
