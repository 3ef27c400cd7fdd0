"""The drain as `lifecycle watch` uses it: the drainer.py procedure, run in a thread.

The drain is a blocking call shared with CodeDeploy and the operator CLI (`drain(cfg,
deadline=, on_progress=)`); the watcher must keep heartbeating whatever the drain does, so
`DrainRunner` runs it beside the watch loop and hands over progress and outcome under a lock.
`EventDrain` is the loop's side: it starts the drain of an event, resumes it after an agent
restart, retries a failed one until its deadline, and records how it ended (and which tasks
were still running) in the event's `drain` record.
The `default_*` factories adapt jobs.drain.drainer and worker.celery_control (imported late: only a
worker's agent needs celery); tests inject their own callables instead.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, ContextManager, Dict, List, Optional

from agent.errors import AgentError
from agent.jobs.lifecycle.action import iso
from agent.worker.tasks import describe_task, safe_task

log = logging.getLogger(__name__)

DrainFn = Callable[..., Any]


def default_drain() -> DrainFn:
    """jobs.drain.drainer.drain, with the deadline as the only bound.

    drain() applies the earlier of `deadline` and `drain.timeout` (CodeDeploy's bound); a
    termination may be held far longer than that, so the timeout is set to reach the deadline.
    """
    # imported late: celery and the drain's own imports
    from agent.jobs.drain.drainer import drain

    def run(cfg, deadline: float, on_progress: Callable[..., None]) -> Any:
        timeout = max(1.0, deadline - time.time())
        return drain(cfg, deadline=deadline, on_progress=on_progress, timeout=timeout)

    return run


def default_stop_consuming() -> Callable[[Any], Any]:
    """Cancel every consumer of the local worker, recorded in drain.json (undrain restores)."""
    from agent.jobs.drain.drainer import stop_consuming

    return stop_consuming


def record_terminating(cfg, store, kind: str, key: str) -> None:
    """Mark the worker's record terminating (cause "spot" or "termination") before the drain:
    from then on undrain, ApplicationStart, bootstrap and `role --apply` refuse to start it.
    A record that cannot be written is logged, never a reason to skip the drain."""
    from agent.worker.state import mark_terminating
    from agent.worker.state_plan import SPOT, TERMINATION

    cause = SPOT if kind == "spot" else TERMINATION
    try:
        mark_terminating(cfg, cause, f"lifecycle event {key}", store)
    except Exception as exc:  # noqa: BLE001 - the drain must go on whatever the record does
        log.error("cannot mark the worker terminating (%s): %s", type(exc).__name__, exc)


def _control(cfg):
    from agent.jobs.drain.control import worker_control

    return worker_control(cfg)


def default_busy(cfg) -> Callable[[], int]:
    """Active + reserved task count of the local worker; 0 when its unit is not running.

    systemd is asked first: a stopped worker cannot answer, and asking it would hold the loop
    for the whole reply timeout. A running worker that does not answer in time is an unknown
    load (a loaded worker is slow), never "idle": NoReply propagates and protection is left as
    it is.
    """

    def busy() -> int:
        from agent.platform.systemd import systemctl_from_config

        state = systemctl_from_config(cfg).active_state(cfg.drain.worker_unit)
        if state not in ("active", "reloading", "activating", "deactivating"):
            return 0
        with _control(cfg) as ctl:
            active, reserved = ctl.busy()
        return active + reserved

    return busy


def default_active_tasks(cfg) -> Callable[[], List[Dict[str, Any]]]:
    """The local worker's running tasks via `inspect active`, in their safe form
    (agent.worker.tasks.safe_task: name, id, start, Airflow identity; never the arguments)."""

    def active() -> List[Dict[str, Any]]:
        with _control(cfg) as ctl:
            return ctl.active_tasks()

    return active


class DrainRunner:
    """One drain call in a daemon thread; the loop reads its progress and outcome."""

    def __init__(self, drain_fn: DrainFn, cfg, deadline: float, clock: Callable[[], float]):
        self.drain_fn = drain_fn
        self.cfg = cfg
        self.deadline = deadline
        self.clock = clock
        self.lock = threading.Lock()
        self.progress: Dict[str, Any] = {}
        self.outcome: Optional[Dict[str, Any]] = None
        self.thread = threading.Thread(target=self._run, name="drain", daemon=True)

    def start(self) -> DrainRunner:
        self.thread.start()
        return self

    def _on_progress(self, *args: Any, **kwargs: Any) -> None:
        if args and isinstance(args[0], dict):
            info = dict(args[0])
        elif args:
            info = {"message": " ".join(str(a) for a in args)}
        else:
            info = {}
        info.update(kwargs)
        info["time"] = self.clock()
        with self.lock:
            self.progress = _jsonable(info)

    def _run(self) -> None:
        try:
            result = self.drain_fn(self.cfg, deadline=self.deadline, on_progress=self._on_progress)
            at_deadline = getattr(result, "outcome", "") == "stopped-at-deadline"
            # the drain reports counts, not tasks: the watcher names them from its own
            # `inspect active` snapshot taken just before the deadline
            outcome = {
                "status": "deadline" if at_deadline else "done",
                "result": getattr(result, "outcome", None),
                "unfinished_tasks": [],
            }
        except AgentError as exc:
            outcome = {
                "status": "deadline" if exc.exit_code == 4 else "failed",
                "message": str(exc),
                "unfinished_tasks": [],
            }
        except Exception as exc:  # the drain's bug must not kill the heartbeats
            outcome = {
                "status": "failed",
                "message": f"{type(exc).__name__}: {exc}",
                "unfinished_tasks": [],
            }
        outcome["finished_at"] = self.clock()
        with self.lock:
            self.outcome = outcome

    def snapshot(self) -> tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        with self.lock:
            return dict(self.progress), (dict(self.outcome) if self.outcome else None)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if hasattr(value, "__dict__"):
        return _jsonable(vars(value))
    return str(value)


class EventDrain:
    """The loop's side of the current event's drain (its record is `state["drain"]`)."""

    def __init__(
        self,
        cfg,
        clock: Callable[[], float],
        drain_fn: Optional[DrainFn] = None,
        active_tasks_fn: Optional[Callable[[], List[Dict[str, Any]]]] = None,
        section: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    ):
        self.cfg = cfg
        self.clock = clock
        self._drain_fn = drain_fn
        self._active_tasks_fn = active_tasks_fn
        # the loop thread asks the worker inside this section (the runtime's busy declaration)
        self._section = section
        self.runner: Optional[DrainRunner] = None
        self._retry_at = 0.0

    def start(self, drain: Dict[str, Any]) -> None:
        drain["attempts"] = int(drain.get("attempts") or 0) + 1
        fn = self._drain_fn or default_drain()
        self.runner = DrainRunner(fn, self.cfg, drain["deadline"], self.clock).start()

    def forget(self) -> None:
        self.runner = None

    def advance(self, drain: Dict[str, Any], now: float) -> None:
        """Progress into the record; at its end, the outcome (or a retry of a failed drain)."""
        if drain["status"] != "running":
            return
        if self.runner is None:  # restarted agent: the drain resumes from drain.json
            log.info(
                "resuming the drain after an agent restart (deadline %s)", iso(drain["deadline"])
            )
            self.start(drain)
        progress, outcome = self.runner.snapshot()
        if progress:
            drain["progress"] = progress
        if outcome is None:
            self._snapshot_before_deadline(drain, now)
        else:
            self._finished(drain, outcome, now)

    def _finished(self, drain: Dict[str, Any], outcome: Dict[str, Any], now: float) -> None:
        if (
            outcome["status"] == "failed"
            and now + self.cfg.lifecycle.poll_interval < drain["deadline"]
        ):
            # a failed drain (broker blip, systemctl error) is retried until its deadline:
            # completing now would let Auto Scaling kill running tasks
            if now >= self._retry_at:
                log.error("drain failed (%s); retrying", outcome.get("message"))
                self._retry_at = now + max(self.cfg.lifecycle.poll_interval, 2.0)
                self.runner = None
                self.start(drain)
            return
        drain.update(
            status=outcome["status"],
            finished_at=outcome["finished_at"],
            unfinished_tasks=outcome.get("unfinished_tasks") or [],
            message=outcome.get("message"),
        )
        if outcome["status"] == "deadline" and not drain["unfinished_tasks"]:
            # with on_deadline=fail the worker still answers: ask it; otherwise use the list
            # taken just before the deadline
            drain["unfinished_tasks"] = (
                self.active_tasks() or drain.get("tasks_near_deadline") or []
            )
        unfinished = drain["unfinished_tasks"]
        if outcome["status"] == "done" and not unfinished:
            log.info("drain finished: no task running")
        elif unfinished:
            log.warning(
                "drain ended at its deadline with %d task(s) still running; Airflow "
                "will retry them: %s",
                len(unfinished),
                describe_tasks(unfinished),
            )
        else:
            log.warning("drain ended (%s): %s", outcome["status"], outcome.get("message"))

    def active_tasks(self) -> Optional[List[Dict[str, Any]]]:
        try:
            with self._section():
                return (self._active_tasks_fn or default_active_tasks(self.cfg))()
        except Exception as exc:  # noqa: BLE001 - a report, not a decision
            log.debug("cannot list the worker's active tasks: %s", exc)
            return None

    def _snapshot_before_deadline(self, drain: Dict[str, Any], now: float) -> None:
        """Shortly before the drain's deadline, note which tasks are still running.

        At the deadline the drain either leaves the worker up (on_deadline=fail) or starts its
        warm shutdown (stop), after which remote control no longer answers; a list taken a
        little before is what the log can name in that case.
        """
        lead = self.cfg.drain.poll_interval + 2.0
        if drain.get("snapshot_at") or now < drain["deadline"] - lead:
            return
        if int((drain.get("progress") or {}).get("active") or 0) <= 0:
            return
        drain["snapshot_at"] = now
        tasks = self.active_tasks()
        if tasks is not None:
            drain["tasks_near_deadline"] = tasks


def describe_tasks(tasks: List[Any]) -> str:
    """The tasks for a log line, from their safe form only (a record written by an older agent
    may hold arguments: they are not shown)."""
    return ", ".join(describe_task(t) if isinstance(t, dict) else "?" for t in tasks)


def scrub_tasks(drain: Optional[Dict[str, Any]]) -> None:
    """Tasks a record from an older agent kept with their arguments: keep only the safe form."""
    if not isinstance(drain, dict):
        return
    for key in ("unfinished_tasks", "tasks_near_deadline"):
        tasks = drain.get(key)
        if isinstance(tasks, list):
            drain[key] = [
                safe_task({"time_start": t.get("started"), **t}) if isinstance(t, dict) else {}
                for t in tasks
            ]
