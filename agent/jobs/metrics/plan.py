"""Pure core of `airflow-agent metrics`: the numbers, the CloudWatch datums, the election's
lock key, what the co-process reports and what the daemon says about it. No I/O; driven on
virtual time in tests.

- `desired_workers(running, queued, concurrency)` = ceil((running + queued) / concurrency).
- `queue_counts(rows, always)`: the co-process's (queue, state, count) rows -> one
  `QueueCounts` per queue, with every queue of `always` present (zeros) so a queue that drains
  publishes 0 instead of going silent; a NULL queue counts as "default".
- `metric_data(...)`: the one PutMetricData call's datums: per queue RunningTasks, QueuedTasks,
  DesiredWorkers with dimensions Cluster + Queue, then the same three with Cluster only (the
  cluster-wide total: DesiredWorkers = ceil(all running + all queued / concurrency), what one
  worker group serving every queue needs).
- `lock_key(cluster)`: the PostgreSQL advisory lock key of the cluster's one publisher.
- `parse_report(line)`: the co-process (run as the Airflow user, so untrusted) says
  {"role": "publisher", "rows": [[queue, state, n], ...], "took": s, "queries": n},
  {"role": "standby", "took": s} or {"role": "error", "why": "..."}; anything else is an error.
- `Election`: what a report changes (publisher <-> standby) and the log line saying so.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

DEFAULT_CONCURRENCY = 16  # Airflow's [celery] worker_concurrency default
NULL_QUEUE = "default"
COUNTED_STATES = ("running", "queued")
# PutMetricData takes at most 1000 datums: 3 per queue plus the 3 cluster totals
MAX_DATUMS = 1000
METRICS = ("RunningTasks", "QueuedTasks", "DesiredWorkers")
MAX_QUEUES = (MAX_DATUMS - len(METRICS)) // len(METRICS)
PUBLISHER = "publisher"
STANDBY = "standby"
ERROR = "error"


def desired_workers(running: int, queued: int, concurrency: int) -> int:
    if concurrency < 1:
        raise ValueError(f"worker concurrency must be at least 1, got {concurrency}")
    return math.ceil((max(0, running) + max(0, queued)) / concurrency)


def concurrency_from(configured: Optional[int], env_value: Optional[str]) -> Tuple[int, str]:
    """(worker concurrency, where it came from): metrics.worker_concurrency, else the env
    file's AIRFLOW__CELERY__WORKER_CONCURRENCY, else Airflow's default. A value in the env
    file that is not a positive integer falls back to the default, and the source says so."""
    if configured is not None:
        return configured, "metrics.worker_concurrency"
    if env_value is None:
        return DEFAULT_CONCURRENCY, "Airflow's default"
    try:
        value = int(env_value.strip())
    except ValueError:
        value = 0
    if value < 1:
        return DEFAULT_CONCURRENCY, "Airflow's default (the env file's value is not a count)"
    return value, "the env file"


def lock_key(cluster: str) -> int:
    """The advisory lock key (a signed bigint) the cluster's metrics publisher holds. Another
    text than the restart slots' (agent.airflow.restart_slot_plan.slot_key), so never theirs."""
    text = f"airflow-agent metrics publisher\0{cluster}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class QueueCounts:
    queue: str
    running: int
    queued: int
    desired: int

    def to_dict(self) -> Dict[str, int]:
        return {"running": self.running, "queued": self.queued, "desired": self.desired}


def queue_counts(
    rows: Iterable[Sequence[Any]], concurrency: int, always: Iterable[str] = ()
) -> List[QueueCounts]:
    """One QueueCounts per queue (sorted by name) from (queue, state, count) rows."""
    by_queue: Dict[str, Dict[str, int]] = {q: {} for q in always}
    for queue, state, n in rows:
        name = queue if queue else NULL_QUEUE
        counts = by_queue.setdefault(name, {})
        counts[state] = counts.get(state, 0) + int(n)
    out = []
    for q in sorted(by_queue):
        running, queued = by_queue[q].get("running", 0), by_queue[q].get("queued", 0)
        out.append(QueueCounts(q, running, queued, desired_workers(running, queued, concurrency)))
    return out


def total(counts: Sequence[QueueCounts], concurrency: int) -> QueueCounts:
    running = sum(c.running for c in counts)
    queued = sum(c.queued for c in counts)
    return QueueCounts("", running, queued, desired_workers(running, queued, concurrency))


def capped(counts: Sequence[QueueCounts]) -> Tuple[List[QueueCounts], int]:
    """At most MAX_QUEUES queues (the busiest), and how many were left out."""
    if len(counts) <= MAX_QUEUES:
        return list(counts), 0
    busiest = sorted(counts, key=lambda c: (-(c.running + c.queued), c.queue))[:MAX_QUEUES]
    return sorted(busiest, key=lambda c: c.queue), len(counts) - MAX_QUEUES


def _datums(dims: List[Dict[str, str]], c: QueueCounts, timestamp: Any) -> List[Dict[str, Any]]:
    values = (c.running, c.queued, c.desired)
    return [
        {
            "MetricName": name,
            "Dimensions": dims,
            "Value": float(value),
            "Unit": "Count",
            "Timestamp": timestamp,
        }
        for name, value in zip(METRICS, values)
    ]


def metric_data(
    cluster: str, counts: Sequence[QueueCounts], overall: QueueCounts, timestamp: Any
) -> List[Dict[str, Any]]:
    """The datums of one PutMetricData call: per queue, then the cluster-wide `overall` (the
    total over every queue, `total()`, also those `capped` left out)."""
    cluster_dim = {"Name": "Cluster", "Value": cluster}
    out: List[Dict[str, Any]] = []
    for c in counts:
        out += _datums([cluster_dim, {"Name": "Queue", "Value": c.queue}], c, timestamp)
    out += _datums([cluster_dim], overall, timestamp)
    return out


@dataclass(frozen=True)
class Report:
    role: str  # publisher | standby | error
    rows: Tuple[Tuple[Optional[str], str, int], ...] = ()
    took: float = 0.0
    queries: int = 0
    why: str = ""


def _row(item: Any) -> Optional[Tuple[Optional[str], str, int]]:
    if not isinstance(item, list) or len(item) != 3:
        return None
    queue, state, n = item
    if queue is not None and not isinstance(queue, str):
        return None
    if state not in COUNTED_STATES or isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return None
    return queue, state, n


def parse_report(line: str) -> Report:
    """The co-process's answer to one tick (anything unexpected is an error report)."""
    try:
        doc = json.loads(line)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return Report(ERROR, why="the metrics co-process said something unexpected")
    role = doc.get("role")
    took = doc.get("took")
    took = float(took) if isinstance(took, (int, float)) and not isinstance(took, bool) else 0.0
    queries = doc.get("queries")
    queries = queries if isinstance(queries, int) and not isinstance(queries, bool) else 0
    if role == ERROR:
        why = doc.get("why")
        return Report(ERROR, why=why[:300] if isinstance(why, str) else "unknown error")
    if role == STANDBY:
        return Report(STANDBY, took=took, queries=queries)
    if role == PUBLISHER and isinstance(doc.get("rows"), list):
        rows = [_row(item) for item in doc["rows"]]
        if all(r is not None for r in rows):
            return Report(PUBLISHER, tuple(rows), took, queries)  # type: ignore[arg-type]
    return Report(ERROR, why="the metrics co-process said something unexpected")


class Election:
    """This daemon's side of the election: its role now, since when, and what changed."""

    def __init__(self) -> None:
        self.role: Optional[str] = None  # None until the first report that is not an error
        self.since: Optional[float] = None

    def observe(self, report: Report, now: float) -> Optional[str]:
        """Take a report in; a line to log when the role changed, else None. After an error
        the role is unknown (None: the session, and a lock it held, ended with it; the next
        tick decides, a former publisher trying again like any standby). Errors are logged by
        the caller."""
        if report.role == ERROR:
            self.role = self.since = None
            return None
        if report.role == self.role:
            return None
        before, self.role, self.since = self.role, report.role, now
        if report.role == PUBLISHER:
            return "now the cluster's metrics publisher" + (
                " (took over from another scheduler)" if before == STANDBY else ""
            )
        return "standby: another scheduler publishes the metrics"


def status_line(
    role: Optional[str], counts: Sequence[QueueCounts], error: Optional[str], interval: float
) -> str:
    """One line for STATUS=: what this daemon did last."""
    if error:
        return f"error: {error} (retrying every {interval:g} s)"[:200]
    if role == STANDBY:
        return "standby: another scheduler publishes"
    if role != PUBLISHER:
        return "starting"
    parts = [
        f"queue {c.queue} running {c.running} queued {c.queued} desired {c.desired}" for c in counts
    ]
    return ("publishing: " + "; ".join(parts))[:200]
