"""`airflow-agent variables watch`: the warm alternative to the variables timer.

A `Type=notify` daemon. It keeps one Airflow bridge co-process (agent/airflow/bridge_client.py)
alive, so a change costs database round trips instead of an Airflow interpreter start (~1.5 s
of `import airflow` per process). Every interval it calls GetSecretValue; the same VersionId as
last synced means no Airflow work at all (no request reaches the bridge). A new version is
synced exactly as `variables sync` does it (same lock, plan, state, verification).

The bridge is restarted when it dies (checked every second while idle, and on a failed
request, which is retried once with a new bridge), and when the env file it was started with
changes. Progress goes to STATUS=, WATCHDOG=1 is sent every second while idle and between
chunks of Airflow work. SIGTERM/SIGINT set a flag; the loop finishes the sync in progress,
ends the bridge and exits 0. A failed sync is logged and recorded, and retried at the next
poll; it does not stop the daemon.

`state_dir/variables-watch.json` records the daemon's counters for `status` and tests: polls,
syncs, bridge starts and requests, the bridge's pid.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Dict, Optional

from agent.airflow.bridge_client import BridgeError
from agent.errors import EXIT_OK, AgentError, ConfigError
from agent.jobs.variables.sync import VariablesSync, _record_failure, bridge_provider
from agent.platform.aws import AWS_ERRORS, AwsClients, describe_error
from agent.platform.notify import Notifier
from agent.state import StateStore

log = logging.getLogger(__name__)

WATCH_STATE = "variables-watch"


class Watch:
    def __init__(self, cfg, interval: float, prune: bool, notifier: Notifier, sm: Any):
        self.cfg = cfg
        self.interval = interval
        self.prune = prune
        self.notifier = notifier
        self.stop = threading.Event()
        self.bridges = bridge_provider(cfg, warm=True)
        self.sync = VariablesSync(cfg, sm, bridges=self.bridges, tick=notifier.watchdog)
        self.sync.unchanged_level = logging.DEBUG
        self.state = StateStore(cfg.state_dir)
        self.counters: Dict[str, Any] = {"polls": 0, "syncs": 0, "failures": 0}
        self.last_status = "starting"

    # -- the bridge

    def warm_up(self) -> None:
        """Start (or restart) the bridge now, so the next change finds it warm."""
        try:
            self.sync.warm_up()
        except AgentError as exc:
            # Airflow may be broken or not installed yet; the next poll tries again
            log.error("airflow bridge: %s", exc)

    def _bridge_died(self) -> bool:
        b = self.bridges.bridge
        return b is not None and not b.alive()

    # -- one poll

    def poll(self) -> str:
        self.counters["polls"] += 1
        self.warm_up()
        for attempt in (1, 2):
            t0 = time.monotonic()
            try:
                res = self.sync.run(prune=self.prune)
            except BridgeError as exc:
                # the co-process died or hung: one retry with a new one
                log.error("variables sync: %s", exc)
                if attempt == 1 and not self.stop.is_set():
                    continue  # the provider dropped it; the next acquire starts another
                return self._failed(str(exc))
            except AgentError as exc:
                log.error("variables sync: %s", exc)
                return self._failed(str(exc))
            except AWS_ERRORS as exc:
                log.error("variables sync: %s", describe_error(exc))
                return self._failed(describe_error(exc))
            if res.skipped:
                return f"secret version {res.version_id} in sync; polling every {self.interval:g} s"
            self.counters["syncs"] += 1
            # the work of one sync with the warm bridge (fetch, plan, set, verify, state)
            self.counters["last_sync_seconds"] = round(time.monotonic() - t0, 4)
            return (
                f"synced version {res.version_id}: {res.imported} imported, {res.deleted} deleted"
            )
        return self.last_status  # pragma: no cover - the loop always returns

    def _failed(self, reason: str) -> str:
        self.counters["failures"] += 1
        _record_failure(self.cfg, "failed", reason)
        return "last sync failed (see the journal); retrying at the next poll"

    def _record(self) -> None:
        b = self.bridges.bridge
        doc = dict(self.counters)
        doc.update(
            last_poll_at=time.time(),
            interval=self.interval,
            bridge_pid=b.pid if b is not None and b.alive() else None,
            bridge_starts=self.bridges.started,
            bridge_requests=b.requests if b is not None else 0,
            status=self.last_status,
        )
        try:
            self.state.save(WATCH_STATE, doc)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state.path(WATCH_STATE), exc.strerror)

    # -- the loop

    def run(self) -> int:
        ready = False
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                self.last_status = self.poll()
                self._record()
                if not ready:
                    self.notifier.ready(self.last_status)
                    ready = True
                    log.info("variables watch ready: %s", self.last_status)
                else:
                    self.notifier.status(self.last_status)
                self._idle(started + self.interval)
        finally:
            self.notifier.stopping()
            self.bridges.close()
            log.info("variables watch stopped")
        return EXIT_OK

    def _idle(self, until: float) -> None:
        while not self.stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, 1.0))
            self.notifier.watchdog()
            if self._bridge_died() and not self.stop.is_set():
                b = self.bridges.bridge
                log.warning(
                    "airflow bridge pid %s exited (status %s) while idle; starting another",
                    b.pid,
                    b.proc.poll() if b.proc else None,
                )
                self.warm_up()
                self._record()


def watch(args, cfg) -> int:
    interval = args.interval if args.interval is not None else cfg.variables.watch_interval
    if not interval > 0:
        raise ConfigError(
            f"{cfg.source}: key 'variables.watch_interval' (or --interval) must be > 0, "
            f"got {interval:g}"
        )
    if cfg.variables.method != "api":
        # the CLI method starts two Airflow processes per change: that is the timer's job
        raise ConfigError(
            f"{cfg.source}: key 'variables.method' is {cfg.variables.method!r}; variables "
            "watch keeps an Airflow interpreter warm and needs method api (use the "
            "airflow-agent-variables.timer for the CLI method)"
        )
    notifier = Notifier()
    try:
        sm = AwsClients(cfg).client("secretsmanager")
    except AWS_ERRORS as exc:
        raise AgentError(f"variables watch: {describe_error(exc)}") from None
    w = Watch(cfg, interval, args.prune, notifier, sm)

    def on_signal(signum: int, _frame: Optional[Any]) -> None:
        # the loop acts: it finishes the sync in progress, ends the bridge, exits 0
        w.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "variables watch: secret %s every %g s, method %s",
        cfg.variables.secret_id,
        interval,
        cfg.variables.method,
    )
    return w.run()
