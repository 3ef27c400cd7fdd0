"""`airflow-agent drain` / `undrain`: stop the local Celery worker taking tasks, wait, stop it.

The one drain procedure for every trigger (CodeDeploy ApplicationStop, ASG termination, Spot
notice, an operator):

1. read the worker's broker settings from the env file (`AIRFLOW__CELERY__BROKER_URL`,
   `AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__*`) and talk to one node, `celery@<hostname>` or
   `drain.node_name`, through a bare Celery app (worker.celery_control; Airflow is not imported);
2. ask it which queues it consumes (`inspect active_queues`) and `cancel_consumer` each one —
   every queue, never an assumed "default"; they are recorded in drain.json for `undrain`;
3. poll `inspect active` and `inspect reserved` every `drain.poll_interval` until both are
   empty; progress goes to the log and to systemd's STATUS=;
4. `systemctl stop` the worker unit (`drain.worker_unit`): an idle worker's warm shutdown.

With acks_late (Airflow's default) a message is acknowledged only after its task finished, so
nothing is lost: a prefetched message the worker had not started goes back to the broker.

A deadline (`--timeout`, `drain.timeout`, or the caller's `deadline`) bounds the wait. At the
deadline `drain.on_deadline: fail` exits 4 and leaves the worker running but not consuming (a
later drain retries, `undrain` restores it); `stop` stops it anyway (a warm shutdown: running
tasks get the unit's TimeoutStopSec, KillMode=mixed keeps systemd from signalling them).

Fallback without remote control — a broker whose transport has none (SQS, `sqs://`), a broker
the agent cannot reach, or a worker that does not answer within `drain.reply_timeout` — is a
warm shutdown through `systemctl stop`, bounded by the deadline, with a warning: Celery's warm
shutdown stops consuming and waits for running tasks, and the unit's KillMode=mixed sends
SIGTERM to the main process only, so tasks still finish.

State (`drain.json` in the state dir: phase, node, queues cancelled, started, deadline) is
saved at each phase change; a drain started again after the agent was killed resumes it with
the original deadline. Draining a stopped worker succeeds at once; so does a second drain.

Python API, for `lifecycle watch` and other callers::

    from agent.jobs.drain.drainer import drain, undrain, DrainProgress, DrainResult
    result = drain(cfg, deadline=time.time() + 600, on_progress=lambda p: heartbeat())
    queues = stop_consuming(cfg)   # consumers cancelled, nothing waited for (phase "paused")
    undrain(cfg)                   # consumers back, or the unit started

`deadline` is wall-clock epoch seconds (it is persisted); the earlier of it and
`drain.timeout` applies. `on_progress(DrainProgress)` is called at each phase change and each
poll (about once a second); it must return quickly and should not raise (an exception is
logged and ignored). `drain` returns a `DrainResult` or raises `DeadlineError` (exit code 4) or
`AgentError` (1) with a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from agent.errors import AgentError, ConfigError, DeadlineError
from agent.jobs.drain import plan
from agent.logs import register_secrets
from agent.platform.envfile import parse_env
from agent.platform.fsutil import FileLock
from agent.platform.notify import Notifier
from agent.platform.systemd import Systemctl, SystemctlError, systemctl_from_config
from agent.state import StateStore
from agent.worker.celery_control import (
    BrokerSettings,
    BrokerUnreachable,
    NoReply,
    QueueSpec,
    WorkerControl,
    broker_settings,
)

log = logging.getLogger(__name__)

STATE_NAME = "drain"


@dataclass
class DrainProgress:
    phase: str
    node: str
    active: int = 0
    reserved: int = 0
    remaining: float = 0.0
    message: str = ""


@dataclass
class DrainResult:
    # drained | already-stopped | stopped-at-deadline | warm-stopped
    outcome: str
    node: str
    method: str
    queues: List[str] = field(default_factory=list)
    started: float = 0.0
    idle_at: Optional[float] = None  # when the worker was seen with nothing to do
    stopped_at: Optional[float] = None
    message: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def node_name(cfg) -> str:
    return cfg.drain.node_name or f"celery@{socket.gethostname()}"


def read_broker(cfg) -> BrokerSettings:
    """The worker's broker settings from the env file every Airflow unit reads."""
    path = Path(cfg.env.file)
    try:
        env = parse_env(path.read_bytes())
    except FileNotFoundError:
        raise AgentError(f"{path} not found: run `airflow-agent env sync` first") from None
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise AgentError(f"{path} is not a valid env file: {exc}") from None
    settings = broker_settings(env, source=str(path))
    # the URL's password is the secret (a bare "sqs://" is not worth scrubbing from logs)
    password = urllib.parse.urlsplit(settings.url).password
    if password:
        register_secrets([settings.url, password])
    return settings


class _DrainLock(FileLock):
    """One drain/undrain at a time per instance (deploy hook and lifecycle may race)."""

    def __init__(self, store: StateStore):
        super().__init__(store.dir / "drain.lock")

    def acquire(self, until: float, clock: Callable[[], float], sleep) -> bool:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not super().acquire(until, clock, sleep):
            raise DeadlineError(f"another drain/undrain holds {self.path}; gave up waiting")
        return True


class Drainer:
    """The I/O shell around agent.jobs.drain.plan. Collaborators are injectable for tests."""

    def __init__(
        self,
        cfg,
        systemctl: Optional[Systemctl] = None,
        store: Optional[StateStore] = None,
        notifier: Optional[Notifier] = None,
        control_factory: Optional[Callable[[BrokerSettings, str], WorkerControl]] = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        on_progress: Optional[Callable[[DrainProgress], None]] = None,
    ):
        self.cfg = cfg
        self.systemctl = systemctl or systemctl_from_config(cfg)
        self.store = store or StateStore(cfg.state_dir)
        self.notifier = notifier or Notifier()
        self.control_factory = control_factory or (lambda s, n: WorkerControl(s, n))
        self.clock = clock
        self.sleep = sleep
        self.on_progress = on_progress
        self.unit = cfg.drain.worker_unit
        self.node = node_name(cfg)

    # -- small helpers -----------------------------------------------------------------------

    def _progress(
        self, state: plan.DrainState, active: int = 0, reserved: int = 0, message: str = ""
    ) -> None:
        text = message or plan.status_line(
            state.phase, state.node, active, reserved, state.remaining(self.clock())
        )
        self.notifier.status(text)
        if self.on_progress is not None:
            try:
                self.on_progress(
                    DrainProgress(
                        state.phase,
                        state.node,
                        active,
                        reserved,
                        state.remaining(self.clock()),
                        text,
                    )
                )
            except Exception as exc:  # a caller's callback must not break the drain
                log.warning("drain progress callback failed: %s: %s", type(exc).__name__, exc)

    def _save(self, state: plan.DrainState) -> None:
        self.store.save(STATE_NAME, state.to_dict())

    def _set_phase(self, state: plan.DrainState, phase: str, note: str = "") -> None:
        state.phase = phase
        state.note = note
        self._save(state)
        log.info("drain %s: phase %s%s", state.node, phase, f" ({note})" if note else "")
        self._progress(state)

    def _condition(self) -> str:
        return plan.unit_condition(self.systemctl.active_state(self.unit))

    def _wait_unit_stopped(self, until: float) -> bool:
        """Poll the unit until it is stopped or `until` passes; True when stopped."""
        while True:
            if self._condition() == plan.UNIT_STOPPED:
                return True
            if self.clock() >= until:
                return False
            self.sleep(min(0.5, max(0.0, until - self.clock())))

    def _stop_unit(self, until: float) -> bool:
        """`systemctl stop` (a warm shutdown), bounded by `until`; True when stopped in time."""
        wait = max(1.0, until - self.clock())
        try:
            self.systemctl.stop(self.unit, timeout=wait)
        except SystemctlError as exc:
            # the systemctl client gave up waiting; systemd's stop job goes on
            log.warning("systemctl stop %s: %s", self.unit, exc)
        return self._wait_unit_stopped(until)

    # -- drain -------------------------------------------------------------------------------

    def drain(
        self, timeout: Optional[float] = None, deadline: Optional[float] = None
    ) -> DrainResult:
        timeout = float(self.cfg.drain.timeout if timeout is None else timeout)
        if timeout <= 0:
            raise ConfigError(f"drain timeout must be positive, got {timeout:g}")
        now = self.clock()
        lock = _DrainLock(self.store)
        lock.acquire(min(deadline or now + timeout, now + timeout), self.clock, self.sleep)
        try:
            previous = plan.DrainState.from_dict(self.store.load(STATE_NAME))
            state = plan.begin(previous, self.node, now, timeout, deadline)
            if state.resumed:
                log.warning(
                    "drain %s: resuming a drain interrupted in phase %s "
                    "(started %.0fs ago, %.0fs to its deadline)",
                    state.node,
                    state.phase,
                    now - state.started,
                    state.remaining(now),
                )
            return self._drain(state)
        finally:
            lock.release()

    def _drain(self, state: plan.DrainState) -> DrainResult:
        cfg = self.cfg.drain
        condition = self._condition()
        if condition == plan.UNIT_STOPPED:
            self._set_phase(state, "stopped", f"{self.unit} is not running")
            log.info("drain %s: %s is not running; nothing to drain", state.node, self.unit)
            return DrainResult(
                "already-stopped",
                state.node,
                state.method,
                state.queue_names,
                state.started,
                message=f"{self.unit} is not running",
            )
        if condition == plan.UNIT_STOPPING or state.phase == "stopping":
            # a warm shutdown is under way (remote control no longer answers then): finish it
            return self._finish_stop(state, idle_at=None, until=state.deadline)

        settings = read_broker(self.cfg)
        if not settings.remote_control:
            return self._warm_stop(
                state, f"broker {settings.scheme}:// has no Celery remote control"
            )

        with self.control_factory(settings, state.node) as control:
            try:
                self._await_reply(control, state)
            except (BrokerUnreachable, NoReply) as exc:
                return self._warm_stop(state, str(exc))
            try:
                self._cancel_consumers(control, state)
                idle_at = self._wait_idle(control, state)
            except (BrokerUnreachable, NoReply) as exc:
                if self._condition() == plan.UNIT_STOPPED:
                    return DrainResult(
                        "already-stopped",
                        state.node,
                        state.method,
                        state.queue_names,
                        state.started,
                        message=f"{self.unit} stopped during the drain",
                    )
                return self._warm_stop(state, str(exc))
        if idle_at is None:  # deadline passed with on_deadline=stop
            return self._finish_stop(
                state,
                idle_at=None,
                until=self.clock() + cfg.stop_timeout,
                outcome="stopped-at-deadline",
            )
        return self._finish_stop(state, idle_at=idle_at, until=self.clock() + cfg.stop_timeout)

    def _await_reply(self, control: WorkerControl, state: plan.DrainState) -> None:
        """The worker may still be starting: wait for a ping reply, bounded."""
        until = min(state.deadline, self.clock() + self.cfg.drain.reply_timeout)
        while not control.ping():
            if self._condition() == plan.UNIT_STOPPED:
                raise NoReply(f"{self.unit} stopped")
            if self.clock() >= until:
                raise NoReply(
                    f"{state.node} did not answer remote control within "
                    f"{self.cfg.drain.reply_timeout:g}s (is drain.node_name right?)"
                )
            log.info("drain %s: no reply to ping yet; retrying", state.node)

    def _cancel_consumers(self, control: WorkerControl, state: plan.DrainState) -> None:
        if state.phase not in ("cancelling", "waiting"):
            return
        current = control.active_queues()
        state.queues = plan.merge_queues(state.queues, [q.to_dict() for q in current])
        self._set_phase(state, "cancelling")
        for q in current:
            control.cancel_consumer(q.name)
            log.info("drain %s: cancelled consumer of queue %s", state.node, q.name)
        # Celery applies cancel_consumer "soon" (consumer.call_soon) and replies at once: only
        # active_queues coming back empty proves the worker stopped taking messages.
        left = self._settle(control, lambda names: names, "cancel_consumer")
        if left:
            raise AgentError(f"{state.node} still consumes {', '.join(left)} after cancel_consumer")
        if not state.queues:
            log.warning(
                "drain %s: the worker consumes no queue (already drained by someone else?)",
                state.node,
            )
        self._set_phase(
            state, "waiting", "consumers cancelled: " + (", ".join(state.queue_names) or "none")
        )

    def _settle(self, control: WorkerControl, pending, what: str) -> List[str]:
        """Poll active_queues until pending(consumed names) is empty (bounded); what is left."""
        until = self.clock() + min(10.0, self.cfg.drain.reply_timeout)
        while True:
            left = pending([q.name for q in control.active_queues()])
            if not left or self.clock() >= until:
                return left
            log.debug("%s not applied yet (%s); checking again", what, ", ".join(left))
            self.sleep(0.2)

    def _wait_idle(self, control: WorkerControl, state: plan.DrainState) -> Optional[float]:
        """Poll until nothing is active or reserved: its time, None at a deadline with stop."""
        last = None
        last_reply = self.clock()
        while True:
            try:
                active, reserved = control.busy()
                last_reply = self.clock()
            except NoReply:
                # one missed reply is not a dead worker; reply_timeout of silence is
                if self._condition() != plan.UNIT_RUNNING or (
                    self.clock() - last_reply >= self.cfg.drain.reply_timeout
                ):
                    raise
                log.info("drain %s: no reply to inspect; retrying", state.node)
                continue
            now = self.clock()
            decision = plan.poll_decision(
                active, reserved, now, state.deadline, self.cfg.drain.on_deadline
            )
            if (active, reserved) != last:
                log.info(
                    plan.status_line("waiting", state.node, active, reserved, state.remaining(now))
                )
                last = (active, reserved)
            self._progress(state, active, reserved)
            if decision == plan.IDLE:
                log.info("drain %s: idle after %.1fs", state.node, now - state.started)
                return now
            if decision == plan.DEADLINE_FAIL:
                self._set_phase(
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
            if self._condition() == plan.UNIT_STOPPED:
                raise NoReply(f"{self.unit} stopped while draining")
            self.sleep(plan.next_sleep(self.cfg.drain.poll_interval, self.clock(), state.deadline))

    def _finish_stop(
        self,
        state: plan.DrainState,
        idle_at: Optional[float],
        until: float,
        outcome: str = "drained",
    ) -> DrainResult:
        self._set_phase(state, "stopping")
        if not self._stop_unit(until):
            # a later drain starts a new deadline and finishes the stop (phase "deadline")
            self._set_phase(state, "deadline", "unit still stopping")
            raise DeadlineError(
                f"{self.unit} did not stop within the time allowed (still "
                f"{self.systemctl.active_state(self.unit)}); systemd's stop job continues"
            )
        stopped_at = self.clock()
        state.idle_at, state.stopped_at = idle_at, stopped_at
        self._set_phase(state, "stopped")
        log.info(
            "drain %s: %s stopped %.1fs after the drain began",
            state.node,
            self.unit,
            stopped_at - state.started,
        )
        return DrainResult(
            outcome, state.node, state.method, state.queue_names, state.started, idle_at, stopped_at
        )

    def _warm_stop(self, state: plan.DrainState, why: str) -> DrainResult:
        """No remote control: a warm shutdown through systemctl stop, bounded by the deadline."""
        log.warning(
            "drain %s: %s; falling back to a warm shutdown through systemctl stop %s "
            "(running tasks finish; bounded by the deadline, %.0fs left)",
            state.node,
            why,
            self.unit,
            state.remaining(self.clock()),
        )
        state.method = "warm-stop"
        self._set_phase(state, "stopping", why)
        if not self._stop_unit(state.deadline):
            self._set_phase(state, "deadline", "unit still stopping (warm shutdown)")
            raise DeadlineError(
                f"{self.unit} still stopping at the drain deadline (warm shutdown waits for "
                f"running tasks; the unit's TimeoutStopSec ends it)"
            )
        stopped_at = self.clock()
        state.stopped_at = stopped_at
        self._set_phase(state, "stopped")
        return DrainResult(
            "warm-stopped",
            state.node,
            state.method,
            state.queue_names,
            state.started,
            None,
            stopped_at,
            message=why,
        )

    # -- stop consuming only -------------------------------------------------------------------

    def stop_consuming(self) -> List[str]:
        """Cancel every consumer and record them (phase "paused"); do not wait or stop.

        For a rebalance recommendation: the worker finishes what it runs and takes nothing
        new. A later drain starts from here with its own deadline; undrain restores."""
        now = self.clock()
        lock = _DrainLock(self.store)
        lock.acquire(now + self.cfg.drain.reply_timeout, self.clock, self.sleep)
        try:
            previous = plan.DrainState.from_dict(self.store.load(STATE_NAME))
            if (
                previous is not None
                and previous.node == self.node
                and previous.phase in ("stopping", "stopped")
            ):
                return previous.queue_names  # already further along
            state = plan.begin(previous, self.node, now, self.cfg.drain.timeout)
            state.phase = "cancelling"
            settings = read_broker(self.cfg)
            if not settings.remote_control:
                raise AgentError(f"broker {settings.scheme}:// has no remote control")
            with self.control_factory(settings, state.node) as control:
                if not control.ping(timeout=min(5.0, self.cfg.drain.reply_timeout)):
                    raise NoReply(f"{state.node} does not answer remote control")
                self._cancel_consumers(control, state)
            self._set_phase(state, "paused", "consumers cancelled; not draining")
            return state.queue_names
        finally:
            lock.release()

    # -- undrain -----------------------------------------------------------------------------

    def undrain(self, timeout: Optional[float] = None) -> str:
        """Let the worker consume again; returns started / consumers-added / nothing."""
        timeout = float(timeout if timeout is not None else max(self.cfg.drain.reply_timeout, 60.0))
        until = self.clock() + timeout
        lock = _DrainLock(self.store)
        lock.acquire(until, self.clock, self.sleep)
        try:
            state = plan.DrainState.from_dict(self.store.load(STATE_NAME))
            action = plan.undrain_action(state, self._condition())
            if action == plan.WAIT_STOPPED_THEN_START:
                if not self._wait_unit_stopped(until):
                    raise DeadlineError(f"{self.unit} is still stopping; not started")
                action = plan.START_UNIT
            if action == plan.START_UNIT:
                self.systemctl.reset_failed(self.unit)
                self.systemctl.start(self.unit)
                log.info("undrain: started %s", self.unit)
                done = "started"
            elif action == plan.ADD_CONSUMERS:
                assert state is not None
                self._add_consumers(state, until)
                done = "consumers-added"
            else:
                log.info(
                    "undrain: %s is running and no drain is recorded; nothing to do", self.unit
                )
                done = "nothing"
            self.store.delete(STATE_NAME)
            self.notifier.status(f"undrained {self.node}: {done}")
            return done
        finally:
            lock.release()

    def _add_consumers(self, state: plan.DrainState, until: float) -> None:
        settings = read_broker(self.cfg)
        if not settings.remote_control:
            raise AgentError(
                f"broker {settings.scheme}:// has no remote control: "
                f"restart {self.unit} to consume again"
            )
        with self.control_factory(settings, state.node) as control:
            while not control.ping():
                if self.clock() >= until:
                    raise DeadlineError(
                        f"{state.node} did not answer remote control; consumers not restored"
                    )
            consuming = [q.name for q in control.active_queues()]
            for q in plan.missing_queues(state.queues, consuming):
                control.add_consumer(QueueSpec.from_dict(q))
                log.info("undrain %s: consuming queue %s again", state.node, q["name"])
            left = self._settle(
                control,
                lambda names: [q["name"] for q in plan.missing_queues(state.queues, names)],
                "add_consumer",
            )
            if left:
                raise AgentError(
                    f"{state.node} still does not consume {', '.join(left)} after add_consumer"
                )


# -- the Python API ----------------------------------------------------------------------------


def drain(
    cfg,
    deadline: Optional[float] = None,
    on_progress: Optional[Callable[[DrainProgress], None]] = None,
    timeout: Optional[float] = None,
) -> DrainResult:
    """Drain the local worker (see the module docstring). Raises DeadlineError / AgentError."""
    return Drainer(cfg, on_progress=on_progress).drain(timeout=timeout, deadline=deadline)


def stop_consuming(cfg) -> List[str]:
    """Cancel every consumer of the local worker without draining; returns the queues."""
    return Drainer(cfg).stop_consuming()


def undrain(cfg, timeout: Optional[float] = None) -> str:
    """Let the local worker consume again: re-add the drained queues, or start the unit."""
    return Drainer(cfg).undrain(timeout=timeout)


# -- the CLI -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Stop the local Celery worker consuming from every queue it consumes, wait until it "
        "has no running task, then stop its unit. Resumes an interrupted drain; exits 4 at the "
        "deadline when drain.on_deadline is fail."
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds until the deadline (default: drain.timeout)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def add_undrain_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Undo a drain: re-add the consumers a drain cancelled, or start the worker unit if it "
        "is stopped."
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="how long to wait for the worker to answer (default 60)",
    )


def run(args, cfg) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout:g}")
    result = drain(cfg, timeout=args.timeout)
    log.info(
        "drain %s: %s (%s)%s",
        result.node,
        result.outcome,
        result.method,
        f": {result.message}" if result.message else "",
    )
    if getattr(args, "json", False):
        import json

        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0


def run_undrain(args, cfg) -> int:
    done = undrain(cfg, timeout=args.timeout)
    log.info("undrain: %s", done)
    return 0
