"""`airflow-agent drain` / `undrain`: stop the local Celery worker taking tasks, wait, stop it.

The one drain procedure for every trigger (CodeDeploy ApplicationStop, ASG termination, Spot
notice, an operator):

1. read the worker's broker settings from the env file (`AIRFLOW__CELERY__BROKER_URL`,
   `AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__*`) and talk to one node, `celery@<hostname>` or
   `drain.node_name`, through a bare Celery app (worker.celery_control; Airflow is not imported);
2. ask it which queues it consumes (`inspect active_queues`) and `cancel_consumer` each one —
   every queue, never an assumed "default"; they are recorded in drain.json for `undrain`;
3. poll `inspect active` and `inspect reserved` every `drain.poll_interval` until both are
   empty, and count the unit's running task processes (its cgroup, agent.worker.processes)
   until none is left: idle needs both witnesses. When remote control stops answering (a
   broker restart) the drain keeps waiting on the processes; progress goes to the log and to
   systemd's STATUS= (drain.wait);
4. `systemctl stop` the worker unit (`drain.worker_unit`): an idle worker's warm shutdown.

With acks_late (Airflow's default) a message is acknowledged only after its task finished, so
nothing is lost: a prefetched message the worker had not started goes back to the broker.

A deadline (`--timeout`, `drain.timeout`, or the caller's `deadline`) bounds the wait. At the
deadline `drain.on_deadline: fail` exits 4 and leaves the worker running but not consuming (a
later drain retries, `undrain` restores it); `stop` stops it anyway (a warm shutdown: running
tasks get the unit's TimeoutStopSec, KillMode=mixed keeps systemd from signalling them).

Fallback without remote control — a broker whose transport has none (SQS, `sqs://`), a broker
the agent cannot reach before the consumers are cancelled, or a worker whose remote control and
task processes both stay silent for `drain.reply_timeout` — is a
warm shutdown through `systemctl stop`, bounded by the deadline, with a warning: Celery's warm
shutdown stops consuming and waits for running tasks, and the unit's KillMode=mixed sends
SIGTERM to the main process only, so tasks still finish.

State (`drain.json` in the state dir: phase, node, queues cancelled, started, deadline) is
saved at each phase change; a drain started again after the agent was killed resumes it with
the original deadline. Draining a stopped worker succeeds at once; so does a second drain.

Python API, for `lifecycle watch` and other callers::

    from agent.jobs.drain.drainer import drain, undrain, stop_consuming
    result = drain(cfg, deadline=time.time() + 600, on_progress=lambda p: heartbeat())
    queues = stop_consuming(cfg)   # consumers cancelled, nothing waited for (phase "paused")
    undrain(cfg)                   # consumers back, or the unit started

`deadline` is wall-clock epoch seconds (it is persisted); the earlier of it and
`drain.timeout` applies. `on_progress(DrainProgress)` is called at each phase change and each
poll (about once a second); it must return quickly and should not raise (an exception is
logged and ignored). `drain` returns a `DrainResult` or raises `DeadlineError` (exit code 4) or
`AgentError` (1) with a one-line message.

Modules: this one is the drain procedure and the Python API; drain.wait the wait on two
witnesses; drain.shell the collaborators and shared steps; drain.undrain the undo;
drain.broker the worker's node and broker settings; drain.state the document and its lock;
drain.cli the command line; drain.plan the pure core.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional

from agent.errors import AgentError, ConfigError, DeadlineError
from agent.jobs.drain import plan
from agent.jobs.drain.broker import read_broker
from agent.jobs.drain.control import ping_waits
from agent.jobs.drain.shell import DrainProgress, DrainResult
from agent.jobs.drain.state import DrainLock
from agent.jobs.drain.wait import IdleWait
from agent.worker.celery_control import BrokerUnreachable, NoReply, WorkerControl
from agent.worker.processes import WorkerProcesses

log = logging.getLogger(__name__)


class Drainer(IdleWait):
    """The drain procedure, and stop-consuming (a drain that does not wait).

    `processes` is the second witness (agent.worker.processes.WorkerProcesses of the worker
    unit by default): anything with `snapshot()`."""

    def __init__(self, cfg, *args, processes=None, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.processes = processes or WorkerProcesses(self.systemctl, self.unit, self.clock)

    # -- drain -------------------------------------------------------------------------------

    def drain(
        self, timeout: Optional[float] = None, deadline: Optional[float] = None
    ) -> DrainResult:
        timeout = float(self.cfg.drain.timeout if timeout is None else timeout)
        if timeout <= 0:
            raise ConfigError(f"drain timeout must be positive, got {timeout:g}")
        now = self.clock()
        lock = DrainLock(self.store)
        lock.acquire(min(deadline or now + timeout, now + timeout), self.clock, self.sleep)
        try:
            previous = self.store.load_doc(plan.DrainState)
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

    @staticmethod
    def _already_stopped(state: plan.DrainState, why: str) -> DrainResult:
        return DrainResult(
            "already-stopped",
            state.node,
            state.method,
            state.queue_names,
            state.started,
            message=why,
        )

    def _drain(self, state: plan.DrainState) -> DrainResult:
        cfg = self.cfg.drain
        condition = self.condition()
        if condition == plan.UNIT_STOPPED:
            self.set_phase(state, "stopped", f"{self.unit} is not running")
            log.info("drain %s: %s is not running; nothing to drain", state.node, self.unit)
            return self._already_stopped(state, f"{self.unit} is not running")
        if condition == plan.UNIT_STOPPING or state.phase == "stopping":
            # a warm shutdown is under way (remote control no longer answers then): finish it
            return self._finish_stop(state, idle_at=None, until=state.deadline)

        settings = read_broker(self.cfg)
        if not settings.remote_control:
            return self._warm_stop(
                state, f"broker {settings.scheme}:// has no Celery remote control"
            )

        with self.control_factory(settings, state.node) as control:
            answered = True
            try:
                self._await_reply(control, state)
            except (BrokerUnreachable, NoReply) as exc:
                if not self._can_wait_without_control(state, str(exc)):
                    return self._warm_stop(state, str(exc))
                answered = False
            try:
                if answered:  # else cancelled already: a resumed drain in phase waiting
                    self.cancel_consumers(control, state)
                idle_at = self.wait_idle(control, state)
            except (BrokerUnreachable, NoReply) as exc:
                if self.condition() == plan.UNIT_STOPPED:
                    return self._already_stopped(state, f"{self.unit} stopped during the drain")
                return self._warm_stop(state, str(exc))
        if idle_at is None:  # deadline passed with on_deadline=stop
            return self._finish_stop(
                state,
                idle_at=None,
                until=self.clock() + cfg.stop_timeout,
                outcome="stopped-at-deadline",
            )
        return self._finish_stop(state, idle_at=idle_at, until=self.clock() + cfg.stop_timeout)

    def _can_wait_without_control(self, state: plan.DrainState, why: str) -> bool:
        """A resumed drain whose consumers are already cancelled can wait on the processes."""
        if state.phase != "waiting" or self.condition() != plan.UNIT_RUNNING:
            return False
        if self.processes.snapshot().count is None:
            return False
        log.warning(
            "drain %s: %s; the consumers were cancelled before: waiting on the task "
            "processes of %s (remote control is asked again each poll)",
            state.node,
            why,
            self.unit,
        )
        return True

    def _await_reply(self, control: WorkerControl, state: plan.DrainState) -> None:
        """The worker may still be starting: wait for a ping reply, bounded."""
        until = min(state.deadline, self.clock() + self.cfg.drain.reply_timeout)
        # a ping sent before a starting worker listens is lost: ping again, each wait longer
        # (a loaded worker is slow), up to drain.reply_timeout and never past `until`
        waits = ping_waits(self.cfg.drain.reply_timeout)
        while not control.ping(timeout=max(0.1, min(next(waits), until - self.clock()))):
            if self.condition() == plan.UNIT_STOPPED:
                raise NoReply(f"{self.unit} stopped")
            if self.clock() >= until:
                raise NoReply(
                    f"{state.node} did not answer remote control within "
                    f"{self.cfg.drain.reply_timeout:g}s (is drain.node_name right?)"
                )
            log.info("drain %s: no reply to ping yet; retrying", state.node)

    def _finish_stop(
        self,
        state: plan.DrainState,
        idle_at: Optional[float],
        until: float,
        outcome: str = "drained",
    ) -> DrainResult:
        self.set_phase(state, "stopping")
        if not self.stop_unit(until):
            # a later drain starts a new deadline and finishes the stop (phase "deadline")
            self.set_phase(state, "deadline", "unit still stopping")
            raise DeadlineError(
                f"{self.unit} did not stop within the time allowed (still "
                f"{self.systemctl.active_state(self.unit)}); systemd's stop job continues"
            )
        stopped_at = self.clock()
        state.idle_at, state.stopped_at = idle_at, stopped_at
        self.set_phase(state, "stopped")
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
        self.set_phase(state, "stopping", why)
        if not self.stop_unit(state.deadline):
            self.set_phase(state, "deadline", "unit still stopping (warm shutdown)")
            raise DeadlineError(
                f"{self.unit} still stopping at the drain deadline (warm shutdown waits for "
                f"running tasks; the unit's TimeoutStopSec ends it)"
            )
        stopped_at = self.clock()
        state.stopped_at = stopped_at
        self.set_phase(state, "stopped")
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
        lock = DrainLock(self.store)
        lock.acquire(now + self.cfg.drain.reply_timeout, self.clock, self.sleep)
        try:
            previous = self.store.load_doc(plan.DrainState)
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
                self.cancel_consumers(control, state)
            self.set_phase(state, "paused", "consumers cancelled; not draining")
            return state.queue_names
        finally:
            lock.release()


# -- the Python API ----------------------------------------------------------------------------


def drain(
    cfg,
    deadline: Optional[float] = None,
    on_progress: Optional[Callable[[DrainProgress], None]] = None,
    timeout: Optional[float] = None,
) -> DrainResult:
    """Drain the local worker (see the module docstring). Raises DeadlineError / AgentError.
    Every trigger drains through here, so the drain's events are recorded here
    (agent.events: Drains and DrainSeconds, DrainsPastDeadline, DrainFailures)."""
    from agent.events.publish import record

    try:
        result = Drainer(cfg, on_progress=on_progress).drain(timeout=timeout, deadline=deadline)
    except DeadlineError:
        record(cfg, "DrainsPastDeadline", role="worker")
        raise
    except ConfigError:
        raise  # nothing was drained: a bad --timeout
    except AgentError:
        record(cfg, "DrainFailures", role="worker")
        raise
    if result.stopped_at is not None:  # not a no-op on a stopped worker
        record(cfg, "Drains", role="worker")
        record(cfg, "DrainSeconds", max(0.0, result.stopped_at - result.started), role="worker")
    if result.outcome == "stopped-at-deadline":
        record(cfg, "DrainsPastDeadline", role="worker")
    return result


def stop_consuming(cfg) -> List[str]:
    """Cancel every consumer of the local worker without draining; returns the queues."""
    return Drainer(cfg).stop_consuming()


def undrain(cfg, timeout: Optional[float] = None) -> str:
    """Let the local worker consume again: re-add the drained queues, or start the unit."""
    from agent.jobs.drain.undrain import Undrainer

    return Undrainer(cfg).undrain(timeout=timeout)
