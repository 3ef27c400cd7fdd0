"""`airflow-agent variables watch`: the warm alternative to the variables timer.

A `Type=notify` daemon on the daemon runtime (agent/runtime/daemon.py). It keeps one Airflow
bridge co-process (agent/airflow/bridge_client.py) alive, so a change costs database round
trips instead of an Airflow interpreter start (~1.5 s of `import airflow` per process). Every
interval it calls GetSecretValue; the same VersionId as last synced means no Airflow work at
all (no request reaches the bridge). A new version is synced exactly as `variables sync` does
it (same lock, plan, state, verification).

Between polls a pass runs every second to restart the bridge when it died; a failed request
is retried once with a new bridge, and the bridge is restarted when the env file it was started
with changes. Progress goes to STATUS=. WATCHDOG=1 flows while the loop waits and for
WatchdogSec/2 after each sign of life of a sync (the sync beats between chunks of Airflow
work); without $WATCHDOG_USEC it pings every second. SIGTERM/SIGINT set the stop event; the
loop finishes the sync in progress, ends the bridge and exits 0. A failed sync is logged and
recorded, and retried at the next poll; it does not stop the daemon.

`state_dir/variables-watch.json` (VariablesWatchDoc, agent/jobs/variables/state.py) records
the daemon's counters for `status` and tests: polls, syncs, bridge starts and requests, the
bridge's pid. A failed sync is recorded in `variables.json` as `variables sync` records it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

from agent.airflow.bridge_client import BridgeError, BridgeProvider
from agent.errors import AgentError, ConfigError
from agent.jobs.variables.state import VariablesDoc, VariablesWatchDoc
from agent.jobs.variables.sync import VariablesSync, bridge_provider
from agent.platform.aws import AWS_ERRORS, AwsClients, describe_error
from agent.runtime.daemon import Daemon, DaemonRuntime
from agent.runtime.runner import record_failure
from agent.state import StateStore

log = logging.getLogger(__name__)

# seconds between the idle passes that look after the bridge (and WATCHDOG_USEC's fallback)
IDLE_PASS = 1.0


class Watch(Daemon):
    def __init__(
        self,
        cfg,
        interval: float,
        prune: bool,
        runtime: DaemonRuntime,
        sm: Any,
        bridges: Optional[BridgeProvider] = None,
    ):
        self.cfg = cfg
        self.interval = interval
        self.prune = prune
        self.rt = runtime
        self.bridges = bridges or bridge_provider(cfg, warm=True)
        self.sync = VariablesSync(cfg, sm, bridges=self.bridges, tick=runtime.beat)
        self.sync.unchanged_level = logging.DEBUG
        self.state = StateStore(cfg.state_dir)
        self.counters: Dict[str, Any] = {"polls": 0, "syncs": 0, "failures": 0}
        self.last_status = "starting"
        self.next_poll: Optional[float] = None

    # -- the bridge

    def warm_up(self) -> None:
        """Start (or restart) the bridge now, so the next change finds it warm."""
        try:
            self.sync.warm_up()
        except AgentError as exc:
            # Airflow may be broken or not installed yet; the next poll tries again
            log.error("airflow bridge: %s", exc)

    def _bridge_died(self) -> bool:
        b = getattr(self.bridges, "bridge", None)
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
                if attempt == 1 and not self.rt.stopping:
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
        record_failure(self.cfg.state_dir, VariablesDoc, "failed", reason)
        return "last sync failed (see the journal); retrying at the next poll"

    def _record(self) -> None:
        b = getattr(self.bridges, "bridge", None)
        doc = VariablesWatchDoc(
            last_poll_at=time.time(),
            interval=self.interval,
            bridge_pid=b.pid if b is not None and b.alive() else None,
            bridge_starts=self.bridges.started,
            bridge_requests=b.requests if b is not None else 0,
            status=self.last_status,
            **self.counters,
        )
        try:
            self.state.save_doc(doc)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state.path(VariablesWatchDoc), exc.strerror)

    # -- the daemon's decisions (the runtime runs the loop)

    def step(self) -> float:
        now = self.rt.now()
        if self.next_poll is None or now >= self.next_poll:
            # the interval counts from the start of a poll, as a timer's would
            self.next_poll = now + self.interval
            self.last_status = self.poll()
            self._record()
        elif self._bridge_died():
            b = self.bridges.bridge
            log.warning(
                "airflow bridge pid %s exited (status %s) while idle; starting another",
                b.pid,
                b.proc.poll() if b.proc else None,
            )
            self.warm_up()
            self._record()
        return min(IDLE_PASS, max(0.0, self.next_poll - self.rt.now()))

    def status(self) -> str:
        return self.last_status

    def close(self) -> None:
        self.bridges.close()
        log.info("variables watch stopped")


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
    runtime = DaemonRuntime("variables watch", watchdog_fallback=IDLE_PASS)
    try:
        sm = AwsClients(cfg).client("secretsmanager")
    except AWS_ERRORS as exc:
        raise AgentError(f"variables watch: {describe_error(exc)}") from None
    log.info(
        "variables watch: secret %s every %g s, method %s",
        cfg.variables.secret_id,
        interval,
        cfg.variables.method,
    )
    return runtime.run(Watch(cfg, interval, args.prune, runtime, sm))
