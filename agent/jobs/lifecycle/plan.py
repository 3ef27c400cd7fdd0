"""Pure decisions of `airflow-agent lifecycle watch`: no I/O, no clock, no AWS.

The daemon (watch.py) polls three IMDS facts and feeds them here with the current
wall-clock time; these functions say what the facts mean (which event, is it new), how long a
termination may be held (heartbeat interval, global timeout, drain deadline), when the next
heartbeat is due and whether scale-in protection should be on. Every time is a Unix epoch in
seconds, because the plan is persisted in lifecycle.json and must survive an agent restart
(monotonic clocks restart with the process).

Auto Scaling facts this relies on (EC2 Auto Scaling user guide, "Amazon EC2 Auto Scaling
lifecycle hooks"):
- an instance waiting on a termination hook sees `Terminated` at
  `meta-data/autoscaling/target-lifecycle-state`; warm-pool instances see `Warmed:*`;
- each RecordLifecycleActionHeartbeat restarts the hook's HeartbeatTimeout;
- the wait can be extended at most to 100 x HeartbeatTimeout or 48 hours (172800 s), whichever
  is smaller (the *global timeout*), counted from the start of the wait; then the hook's
  DefaultResult applies whatever we do.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

GLOBAL_TIMEOUT_CAP = 172800.0  # 48 h: Auto Scaling's absolute cap on one lifecycle wait
GLOBAL_TIMEOUT_FACTOR = 100  # ... or 100 heartbeat timeouts, whichever is smaller
HEARTBEAT_INTERVAL_CAP = 300.0  # never let a heartbeat gap exceed 5 minutes
HEARTBEAT_INTERVAL_FLOOR = 1.0

# event kinds, in order of urgency (a Spot reclaim cannot be delayed; a hook can)
SPOT = "spot"
TERMINATE = "terminate"
REBALANCE = "rebalance"
WARMED = "warmed"

# lifecycle.json phases
IDLE = "idle"
DRAINING = "draining"  # drain running (terminate, spot) or consumers cancelled (rebalance)
DONE = "done"  # event finished (lifecycle action completed if there was one)


@dataclass
class Event:
    """One thing IMDS told us; `key` is its content, used to de-duplicate across polls/restarts."""

    kind: str
    key: str
    detail: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> Event:
        return cls(kind=data["kind"], key=data["key"], detail=dict(data.get("detail") or {}))


def parse_time(text: str) -> float:
    """IMDS times look like 2026-11-21T10:42:13Z; return the Unix epoch, or raise ValueError."""
    value = text.strip()
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    parsed = _dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.timestamp()


def classify(
    target_state: Optional[str],
    spot_action: Optional[Dict[str, Any]],
    rebalance: Optional[Dict[str, Any]],
    rebalance_mode: str = "ignore",
) -> List[Event]:
    """The events the three IMDS facts describe, most urgent first.

    A Spot `instance-action` of `terminate` or `stop` (`hibernate` too) is a reclaim with a time;
    `Terminated` is a termination hook wait; `Warmed:*` is a warm-pool instance that must not
    consume; a rebalance recommendation counts only when the config acts on it.
    """
    events: List[Event] = []
    if spot_action and spot_action.get("action"):
        action = str(spot_action.get("action"))
        when = str(spot_action.get("time", ""))
        events.append(Event(SPOT, f"spot:{action}:{when}", {"action": action, "time": when}))
    state = (target_state or "").strip()
    if state == "Terminated":
        events.append(Event(TERMINATE, "target:Terminated", {"target_state": state}))
    elif state.startswith("Warmed:"):
        events.append(Event(WARMED, f"target:{state}", {"target_state": state}))
    if rebalance and rebalance_mode != "ignore":
        when = str(rebalance.get("noticeTime", ""))
        events.append(Event(REBALANCE, f"rebalance:{when}", {"notice_time": when}))
    return events


def next_event(
    candidates: List[Event], current: Optional[Event], handled: List[str]
) -> Optional[Event]:
    """The event to start now, or None.

    One event at a time: while one is in progress nothing else starts (its drain already
    stops the worker), except that a termination hook wait seen during a Spot drain is
    attached to it by the shell (see `attaches_lifecycle_action`). Events whose
    key was handled before (this boot, or before an agent restart) are not started again.
    """
    if current is not None:
        return None
    for ev in candidates:
        if ev.key not in handled:
            return ev
    return None


def attaches_lifecycle_action(current: Event, candidate: Event) -> bool:
    """A termination hook wait seen while a Spot drain runs: heartbeat/complete on that drain."""
    return current.kind == SPOT and candidate.kind == TERMINATE


# -- termination timing --------------------------------------------------------------------


def heartbeat_interval(heartbeat_timeout: float, override: Optional[float] = None) -> float:
    """Seconds between heartbeats: a third of HeartbeatTimeout, at most 5 minutes.

    A third leaves two more chances (each with botocore's own retries and ours) before the
    hook times out: one heartbeat can fail outright and the next still lands in time. The cap
    keeps a failure noticed quickly and the status fresh when HeartbeatTimeout is hours long.
    An explicit override is honoured but never allowed above half the timeout.
    """
    if override is not None:
        return max(HEARTBEAT_INTERVAL_FLOOR, min(override, heartbeat_timeout / 2.0))
    return max(HEARTBEAT_INTERVAL_FLOOR, min(heartbeat_timeout / 3.0, HEARTBEAT_INTERVAL_CAP))


def global_timeout(heartbeat_timeout: float) -> float:
    """How long Auto Scaling lets one lifecycle wait last: min(100 x HeartbeatTimeout, 48 h)."""
    return min(GLOBAL_TIMEOUT_FACTOR * heartbeat_timeout, GLOBAL_TIMEOUT_CAP)


@dataclass
class TerminationPlan:
    heartbeat_timeout: float
    heartbeat_interval: float
    wait_started: float  # when we first saw Terminated (the real wait began up to a poll earlier)
    global_deadline: float  # wait_started - poll + global timeout; DefaultResult applies after
    heartbeat_stop_at: float  # no heartbeat after this; complete instead
    drain_deadline: float  # the drain is told to give up here

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def plan_termination(
    now: float,
    heartbeat_timeout: float,
    complete_margin: float,
    poll_interval: float,
    max_wait: Optional[float] = None,
    interval_override: Optional[float] = None,
    wait_started: Optional[float] = None,
) -> TerminationPlan:
    """Deadlines of one termination hook wait, all as epochs.

    The wait really began up to one poll interval before we saw `Terminated`, so the global
    deadline is counted from `wait_started - poll_interval`. Heartbeats stop, and the drain is
    told to end, `complete_margin` seconds before it (at least two heartbeat intervals), so
    that the drain's own wrap-up and CompleteLifecycleAction (with its retries) land while
    the wait still exists. `max_wait` (agent.yaml) can only shorten the hold, never extend it.
    """
    started = now if wait_started is None else wait_started
    interval = heartbeat_interval(heartbeat_timeout, interval_override)
    gdeadline = started - poll_interval + global_timeout(heartbeat_timeout)
    margin = max(complete_margin, 2 * interval)
    stop_at = gdeadline - margin
    if max_wait is not None:
        stop_at = min(stop_at, started + max_wait)
    stop_at = max(stop_at, started)
    return TerminationPlan(
        heartbeat_timeout=heartbeat_timeout,
        heartbeat_interval=interval,
        wait_started=started,
        global_deadline=gdeadline,
        heartbeat_stop_at=stop_at,
        drain_deadline=stop_at,
    )


def spot_deadline(notice_time: str, margin: float, now: float) -> float:
    """The Spot drain's deadline: the reclaim time minus the margin, never before `now`.

    An unparseable time is treated as "two minutes from now" (AWS's documented notice), so a
    garbled notice still drains rather than being ignored.
    """
    try:
        when = parse_time(notice_time)
    except ValueError:
        when = now + 120.0
    return max(now, when - margin)


def heartbeat_due(
    now: float,
    last_success: Optional[float],
    last_attempt: Optional[float],
    interval: float,
    retry_delay: float,
    stop_at: float,
    started: float,
) -> bool:
    """Whether to send a heartbeat now.

    The first heartbeat goes out as soon as the wait is seen (the hook's timer started up to a
    poll interval earlier), then one every `interval` after the last success. After a
    failed attempt the next try comes `retry_delay` later, so a throttled or failing endpoint
    is retried well within the interval. None after `stop_at`.
    """
    if now >= stop_at:
        return False
    if last_success is None:
        base = started
    else:
        base = last_success
        if now < base + interval:
            return False
    # a failed attempt after the base (the wait's start counts: the first try may fail too)
    retrying = last_attempt is not None and (
        last_attempt >= base if last_success is None else last_attempt > base
    )
    return not (retrying and now < last_attempt + retry_delay)


def next_wake(
    now: float,
    poll_interval: float,
    heartbeat_at: Optional[float] = None,
) -> float:
    """Seconds to sleep: the next poll or the next heartbeat, whichever comes first."""
    delay = poll_interval
    if heartbeat_at is not None:
        delay = min(delay, heartbeat_at - now)
    return max(0.05, delay)


def retry_delay(interval: float) -> float:
    """Pause between our own heartbeat retries: a quarter interval, between 1 s and 15 s."""
    return max(1.0, min(interval / 4.0, 15.0))


# -- scale-in protection -------------------------------------------------------------------


def protection_decision(
    protected: Optional[bool],
    active_tasks: int,
    idle_since: Optional[float],
    now: float,
    idle_before_unprotect: float,
) -> tuple[Optional[bool], Optional[float]]:
    """(desired protection or None for "leave it", new idle_since).

    Busy -> protect at once (scale-in must pick an idle worker). Idle -> unprotect only after
    `idle_before_unprotect` seconds of continuous idleness, so a worker between two tasks of a
    busy DAG keeps its protection. `protected` None means unknown (fresh start): an idle
    worker is then unprotected once the idle time has passed, which also clears protection a
    crashed agent left behind.
    """
    if active_tasks > 0:
        return (True if protected is not True else None), None
    since = now if idle_since is None else idle_since
    if protected is not False and now - since >= idle_before_unprotect:
        return False, since
    return None, since
