"""The drain state machine, pure: what to do next given the persisted state and what we see.

No I/O here. `drainer` feeds in the persisted `drain.json`, the worker unit's ActiveState,
the worker's queues and its active/reserved task counts, and the clock; these functions say
which phase to be in and what to do, so every branch (resume after a restart, deadline,
already stopped, undrain) is testable without a broker or systemd.

Phases, persisted in drain.json:

    cancelling -> waiting -> stopping -> stopped        (the normal path)
    waiting    -> deadline                              (on_deadline=fail: worker up, not consuming)
    paused                                              (stop_consuming: consumers cancelled only)
    deadline / paused -> cancelling (a later drain, with a new deadline)
    any        -> (undrain) state removed

`cancelling`, `waiting` and `stopping` are *in progress*: an agent restarted in one of them
resumes it with the original start time and deadline, so a restart never extends a deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

IN_PROGRESS = ("cancelling", "waiting", "stopping")
# deadline: a drain gave up at its deadline; paused: stop_consuming() (e.g. a rebalance
# recommendation) cancelled the consumers without draining. Both: worker up, not consuming.
PHASES = IN_PROGRESS + ("stopped", "deadline", "paused")

# systemd ActiveState -> what it means for a drain
UNIT_RUNNING = "running"
UNIT_STOPPED = "stopped"
UNIT_STOPPING = "stopping"
UNIT_STARTING = "starting"


def unit_condition(active_state: str) -> str:
    if active_state in ("active", "reloading"):
        return UNIT_RUNNING
    if active_state == "deactivating":
        return UNIT_STOPPING
    if active_state == "activating":
        return UNIT_STARTING
    # inactive, failed, maintenance, unknown (no such unit): nothing runs there
    return UNIT_STOPPED


@dataclass
class DrainState:
    phase: str
    node: str
    started: float
    deadline: float
    method: str = "remote-control"  # or "warm-stop" (no remote control: SQS, no reply)
    queues: List[Dict[str, Any]] = field(default_factory=list)
    resumed: int = 0
    note: str = ""
    idle_at: Optional[float] = None  # when the worker was seen with nothing to do
    stopped_at: Optional[float] = None  # when the unit was seen stopped
    # the second witness: task processes last counted in the unit (None: not countable), and
    # since when remote control has not answered (None: it answers)
    task_processes: Optional[int] = None
    silent_since: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "phase": self.phase,
            "node": self.node,
            "started": self.started,
            "deadline": self.deadline,
            "method": self.method,
            "queues": list(self.queues),
            "resumed": self.resumed,
            "note": self.note,
            "idle_at": self.idle_at,
            "stopped_at": self.stopped_at,
            "task_processes": self.task_processes,
            "silent_since": self.silent_since,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Optional[DrainState]:
        """The persisted state, or None when it is absent or not a drain state we wrote."""
        try:
            phase = data["phase"]
            if phase not in PHASES:
                return None
            queues = [
                dict(q) for q in data.get("queues") or [] if isinstance(q, dict) and q.get("name")
            ]
            return cls(
                phase=phase,
                node=str(data["node"]),
                started=float(data["started"]),
                deadline=float(data["deadline"]),
                method=str(data.get("method") or "remote-control"),
                queues=queues,
                resumed=int(data.get("resumed") or 0),
                note=str(data.get("note") or ""),
                idle_at=_opt_float(data.get("idle_at")),
                stopped_at=_opt_float(data.get("stopped_at")),
                task_processes=_opt_int(data.get("task_processes")),
                silent_since=_opt_float(data.get("silent_since")),
            )
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def queue_names(self) -> List[str]:
        return [q["name"] for q in self.queues]

    def remaining(self, now: float) -> float:
        return self.deadline - now


def _opt_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _opt_int(value: Any) -> Optional[int]:
    return None if value is None else int(value)


def begin(
    previous: Optional[DrainState],
    node: str,
    now: float,
    timeout: float,
    deadline: Optional[float] = None,
) -> DrainState:
    """The state a drain starts from.

    An in-progress drain of the same node is resumed: same start, same deadline (an earlier
    `deadline` passed by the caller still wins: a Spot notice does not wait for a deploy).
    A drain that failed at its deadline is retried with a new deadline, keeping the queues it
    cancelled (the worker still does not consume them). Anything else starts afresh.
    """
    wanted = now + timeout if deadline is None else min(deadline, now + timeout)
    if previous is not None and previous.node == node:
        if previous.phase in IN_PROGRESS:
            return DrainState(
                phase=previous.phase,
                node=node,
                started=previous.started,
                deadline=min(previous.deadline, deadline)
                if deadline is not None
                else previous.deadline,
                method=previous.method,
                queues=list(previous.queues),
                resumed=previous.resumed + 1,
            )
        if previous.phase in ("deadline", "paused"):
            return DrainState(
                phase="cancelling",
                node=node,
                started=now,
                deadline=wanted,
                method=previous.method,
                queues=list(previous.queues),
            )
    return DrainState(phase="cancelling", node=node, started=now, deadline=wanted)


def merge_queues(
    recorded: List[Dict[str, Any]], current: List[Dict[str, Any]]
) -> List[Dict[str, Any]]:
    """Recorded queues plus any the worker consumes now (first spec of a name wins)."""
    out: List[Dict[str, Any]] = []
    seen = set()
    for q in list(recorded) + list(current):
        if q["name"] not in seen:
            seen.add(q["name"])
            out.append(dict(q))
    return out


# what to do on one poll while waiting for the worker to become idle
WAIT = "wait"
IDLE = "idle"
DEADLINE_FAIL = "deadline-fail"
DEADLINE_STOP = "deadline-stop"


def poll_decision(
    active: int,
    reserved: int,
    now: float,
    deadline: float,
    on_deadline: str,
    tasks: Optional[int] = None,
) -> str:
    """Idle (nothing active or reserved, and no task process when they can be counted) wins
    even at the deadline: stopping then kills nothing."""
    if active == 0 and reserved == 0 and not tasks:
        return IDLE
    return _not_idle(now, deadline, on_deadline)


def _not_idle(now: float, deadline: float, on_deadline: str) -> str:
    if now >= deadline:
        return DEADLINE_STOP if on_deadline == "stop" else DEADLINE_FAIL
    return WAIT


# neither witness speaks: remote control silent and the processes not countable
RETRY = "retry"  # not for long yet: ask again
BLIND = "blind"  # for drain.reply_timeout, or at the deadline: fall back to a warm stop


def witness_decision(
    busy: Optional[Tuple[int, int]],
    tasks: Optional[int],
    silent_for: float,
    reply_timeout: float,
    now: float,
    deadline: float,
    on_deadline: str,
) -> str:
    """One poll of the drain's two witnesses: remote control's (active, reserved), None when
    it did not answer; the unit's running task processes, None when they cannot be counted.

    Idle needs every witness that speaks to say so, and at least one to speak: a silent or
    reconnecting broker alone never makes a worker idle, and a count of processes alone
    (remote control silent, as during a broker restart) can. Remote control silent with
    processes still running is a wait, however long the silence: the tasks are there.
    """
    if busy is None and tasks is None:
        return BLIND if silent_for >= reply_timeout or now >= deadline else RETRY
    if busy is None:
        if tasks == 0:
            return IDLE
        return _not_idle(now, deadline, on_deadline)
    return poll_decision(busy[0], busy[1], now, deadline, on_deadline, tasks)


def next_sleep(poll_interval: float, now: float, deadline: float) -> float:
    """Sleep until the next poll, but never past the deadline (the last poll is at it)."""
    return max(0.0, min(poll_interval, deadline - now))


def status_line(
    phase: str,
    node: str,
    active: int = 0,
    reserved: int = 0,
    remaining: float = 0.0,
    tasks: Optional[int] = None,
    silent_for: Optional[float] = None,
) -> str:
    """The STATUS= text and log line of a drain in progress (tasks: task processes counted;
    silent_for: how long remote control has not answered, None when it answers)."""
    if phase != "waiting":
        return f"draining {node}: {phase}"
    left = f"{max(0, int(remaining))}s to deadline"
    if silent_for is not None:
        seen = "uncounted" if tasks is None else str(tasks)
        return (
            f"draining {node}: remote control silent for {int(silent_for)}s; "
            f"{seen} task process(es) running, {left}"
        )
    procs = "" if tasks is None else f", {tasks} task process(es)"
    return f"draining {node}: {active} task(s) running, {reserved} reserved{procs}, {left}"


# -- undrain --------------------------------------------------------------------------------

START_UNIT = "start-unit"
ADD_CONSUMERS = "add-consumers"
WAIT_STOPPED_THEN_START = "wait-stopped-then-start"
NOTHING = "nothing"


def undrain_action(state: Optional[DrainState], condition: str) -> str:
    """What undrain does: start a stopped worker; re-add consumers on a running one."""
    if condition == UNIT_STOPPED:
        return START_UNIT
    if condition == UNIT_STOPPING:
        return WAIT_STOPPED_THEN_START
    if state is None or not state.queues:
        return NOTHING
    return ADD_CONSUMERS


def missing_queues(recorded: List[Dict[str, Any]], consuming: List[str]) -> List[Dict[str, Any]]:
    return [q for q in recorded if q["name"] not in set(consuming)]
