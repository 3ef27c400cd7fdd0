"""The drain as `lifecycle watch` uses it: the drainer.py procedure, run in a thread.

The drain is a blocking call shared with CodeDeploy and the operator CLI (`drain(cfg,
deadline=, on_progress=)`); the watcher must keep heartbeating whatever the drain does, so
`DrainRunner` runs it beside the watch loop and hands over progress and outcome under a lock.
The `default_*` factories adapt jobs.drain.drainer and worker.celery_control (imported late: only a
worker's agent needs celery); tests inject their own callables instead.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional

from agent.errors import AgentError

DrainFn = Callable[..., Any]


def default_drain() -> DrainFn:
    """jobs.drain.drainer.drain, with the deadline as the only bound.

    drain() applies the earlier of `deadline` and `drain.timeout` (CodeDeploy's bound); a
    termination may be held far longer than that, so the timeout is set to reach the deadline.
    """
    from agent import drain  # imported late: celery and the drain's own imports

    def run(cfg, deadline: float, on_progress: Callable[..., None]) -> Any:
        timeout = max(1.0, deadline - time.time())
        return drain.drain(cfg, deadline=deadline, on_progress=on_progress, timeout=timeout)

    return run


def default_stop_consuming() -> Callable[[Any], Any]:
    """Cancel every consumer of the local worker, recorded in drain.json (undrain restores)."""
    from agent.jobs.drain.drainer import stop_consuming

    return stop_consuming


def _control(cfg):
    from agent.jobs.drain import drainer as drain
    from agent.worker import celery_control

    return celery_control.WorkerControl(drain.read_broker(cfg), drain.node_name(cfg))


def default_busy(cfg) -> Callable[[], int]:
    """Active + reserved task count of the local worker; 0 when it does not answer (stopped)."""

    def busy() -> int:
        from agent.worker.celery_control import NoReply

        with _control(cfg) as ctl:
            try:
                active, reserved = ctl.busy()
            except NoReply:
                return 0
        return active + reserved

    return busy


def default_active_tasks(cfg) -> Callable[[], List[Dict[str, Any]]]:
    """The local worker's running tasks (id, name, args) via `inspect active`."""

    def active() -> List[Dict[str, Any]]:
        with _control(cfg) as ctl:
            items = ctl.active_tasks()
        return [
            {
                "id": t.get("id"),
                "name": t.get("name"),
                "args": t.get("args"),
                "started": t.get("time_start"),
            }
            for t in items
            if isinstance(t, dict)
        ]

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
