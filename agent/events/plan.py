"""Pure core of the agent's event metrics: what an event is, how it sits in the spool, how
many the spool keeps, and which CloudWatch datums one PutMetricData call carries. No I/O, no
clock (the caller passes `now`); tests drive it on virtual time.

- `METRICS`: every event metric the agent publishes and its unit (the README's table and the
  template's alarms name these; tests/test_alarms.py checks the alarms against it).
- `Event`: one spool line, JSON: {"id", "m" (metric), "v" (value), "t" (epoch), "r" (role)};
  nothing else, so no secret can reach the spool. `parse_line` drops what is not one.
- `bounded(events, most)`: the newest `most`, and how many older ones were dropped.
- `sendable(events, now)`: CloudWatch refuses a whole call when one datum is older than two
  weeks or more than two hours ahead, so those are split off (and dropped by the caller).
- `batch(events, cluster)`: events of one metric, role and minute become one datum with
  StatisticValues (SampleCount, Sum, Minimum, Maximum), oldest first, at most `MAX_DATUMS`
  datums (PutMetricData's limit: 1000 metrics and 1 MB per call; an aggregated datum is well
  under 1 KB); the events left out wait for the next flush.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

# metric -> CloudWatch unit; dimensions Cluster and Role on every one
METRICS: Dict[str, str] = {
    "Drains": "Count",  # a drain that stopped the worker (every trigger: deploy, ASG, Spot, CLI)
    "DrainSeconds": "Seconds",  # how long that drain took, from its start to the stop
    "DrainsPastDeadline": "Count",  # a drain that reached its deadline with the worker busy
    "DrainFailures": "Count",  # a drain that failed otherwise (broker, systemd, state)
    "LifecycleHolds": "Count",  # a termination hold completed (CompleteLifecycleAction sent)
    "LifecycleHoldSeconds": "Seconds",  # how long the instance was held in Terminating:Wait
    "LifecycleHoldsExpired": "Count",  # a hold the hook's global timeout ended instead
    "ConfapplyRestarts": "Count",  # an Airflow unit restarted for a config change
    "ConfapplyRestartFailures": "Count",  # a restart that failed (the apply is retried)
    "EnvSyncFailures": "Count",  # an env sync that failed (SSM, disk): the old file kept
    "EnvSyncRefusals": "Count",  # an env sync refused as bad or suspicious input
}
DIMENSIONS = ("Cluster", "Role")
MAX_DATUMS = 1000  # PutMetricData: at most 1000 metrics per call
MAX_AGE = 14 * 86400 - 3600  # CloudWatch: at most two weeks old (an hour's margin)
MAX_AHEAD = 2 * 3600 - 300  # and at most two hours ahead (clock skew; a margin)
UNKNOWN_ROLE = "unknown"


@dataclass(frozen=True)
class Event:
    id: str
    metric: str
    value: float
    at: float  # epoch seconds
    role: str

    def to_line(self) -> str:
        doc = {"id": self.id, "m": self.metric, "v": self.value, "t": self.at, "r": self.role}
        return json.dumps(doc, sort_keys=True) + "\n"


def make_event(ident: str, metric: str, value: float, at: float, role: Optional[str]) -> Event:
    """An event; ValueError naming what is wrong (an unknown metric, a value not finite)."""
    if metric not in METRICS:
        raise ValueError(f"unknown event metric {metric!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"event {metric}: value must be a finite number, got {value!r}")
    return Event(ident, metric, float(value), float(at), role or UNKNOWN_ROLE)


def parse_line(line: str) -> Optional[Event]:
    """The event a spool line holds; None for anything else (a torn or foreign line)."""
    try:
        doc = json.loads(line)
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            return None
        if not isinstance(doc.get("r"), str) or not isinstance(doc.get("t"), (int, float)):
            return None
        return make_event(doc["id"], doc.get("m"), doc.get("v"), doc["t"], doc["r"])
    except (ValueError, TypeError):
        return None


def parse_spool(text: str) -> Tuple[List[Event], int]:
    """(the events, how many lines were not events)."""
    events, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        ev = parse_line(line)
        if ev is None:
            bad += 1
        else:
            events.append(ev)
    return events, bad


def bounded(events: Sequence[Event], most: int) -> Tuple[List[Event], int]:
    """The newest `most` events (spool order is arrival order), and how many were dropped."""
    if len(events) <= most:
        return list(events), 0
    return list(events[len(events) - most :]), len(events) - most


def sendable(events: Sequence[Event], now: float) -> Tuple[List[Event], List[Event]]:
    """(events CloudWatch takes, events it would refuse: too old or too far ahead)."""
    ok, stale = [], []
    for ev in events:
        (ok if now - MAX_AGE <= ev.at <= now + MAX_AHEAD else stale).append(ev)
    return ok, stale


def _minute(at: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(at - at % 60, datetime.timezone.utc)


def batch(
    events: Sequence[Event], cluster: str, most: int = MAX_DATUMS
) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(the datums of one PutMetricData call, the ids of the events they carry)."""
    groups: Dict[Tuple[str, str, datetime.datetime], List[Event]] = {}
    for ev in sorted(events, key=lambda e: e.at):
        key = (ev.metric, ev.role, _minute(ev.at))
        if key in groups or len(groups) < most:
            groups.setdefault(key, []).append(ev)
    datums, ids = [], []
    for (metric, role, minute), group in groups.items():
        values = [e.value for e in group]
        datums.append(
            {
                "MetricName": metric,
                "Dimensions": [
                    {"Name": "Cluster", "Value": cluster},
                    {"Name": "Role", "Value": role},
                ],
                "Timestamp": minute,
                "StatisticValues": {
                    "SampleCount": float(len(values)),
                    "Sum": float(sum(values)),
                    "Minimum": float(min(values)),
                    "Maximum": float(max(values)),
                },
                "Unit": METRICS[metric],
            }
        )
        ids += [e.id for e in group]
    return datums, ids


RETRY_FIRST = 30.0
RETRY_CAP = 900.0


def retry_delay(failures: int) -> float:
    """Seconds before the next flush after `failures` failed ones in a row: while AWS is
    unreachable each job and daemon pass would otherwise spend the flush timeout on it."""
    if failures < 1:
        return 0.0
    return min(RETRY_CAP, RETRY_FIRST * 2.0 ** min(failures - 1, 16))
