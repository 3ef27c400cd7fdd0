"""The `metrics` section of agent.yaml: what `airflow-agent metrics` publishes, and how often;
`metrics.events` (agent.events.config) is how every instance sends the agent's own events.

Pure (stdlib only) so agent.config can import it. `check_metrics` holds the section's own checks;
agent.config reports the (key, why) it returns like any other key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from agent.events.config import EventsConfig, check_events

# CloudWatch: a namespace is 1-255 of these, and may not start with "AWS/"
NAMESPACE = re.compile(r"^[A-Za-z0-9.\-_/#:]{1,255}$")
# a Celery queue name as a dimension value (1-1024 characters in CloudWatch)
MAX_QUEUE_NAME = 1024


@dataclass
class MetricsConfig:
    # seconds between two publishes (and between a standby's tries to become the publisher)
    interval: float = 60.0
    # CloudWatch namespace; every datum also has the dimension Cluster=<cluster>
    namespace: str = "AirflowEC2Agent"
    # tasks one worker runs at once; null: the env file's AIRFLOW__CELERY__WORKER_CONCURRENCY,
    # else Airflow's default, 16
    worker_concurrency: Optional[int] = None
    # queues published every interval even when they have no task (a zero, not missing data)
    queues: List[str] = field(default_factory=lambda: ["default"])
    # one count query may take this long (statement_timeout); the agent waits this + grace
    query_timeout: float = 30.0
    # the Airflow venv's interpreter (SQLAlchemy, psycopg2) and who runs it (never root)
    python: str = "/opt/airflow/venv/bin/python"
    user: Optional[str] = "airflow"
    # the agent's own events from every instance (agent.events), in the same namespace
    events: EventsConfig = field(default_factory=EventsConfig)


def check_metrics(m: MetricsConfig) -> Optional[Tuple[str, str]]:
    """(dotted key, why) for the first bad key of the section, else None."""
    if not m.interval >= 1:
        return "metrics.interval", f"must be at least 1 second, got {m.interval}"
    if not NAMESPACE.match(m.namespace) or m.namespace.startswith("AWS/"):
        return "metrics.namespace", f"is not a CloudWatch namespace of ours: {m.namespace!r}"
    if m.worker_concurrency is not None and m.worker_concurrency < 1:
        return "metrics.worker_concurrency", f"must be at least 1, got {m.worker_concurrency}"
    for i, q in enumerate(m.queues):
        if not q or len(q) > MAX_QUEUE_NAME:
            return f"metrics.queues[{i}]", f"must be 1..{MAX_QUEUE_NAME} characters"
    if not m.query_timeout > 0:
        return "metrics.query_timeout", f"must be positive, got {m.query_timeout}"
    if not m.python.startswith("/"):
        return "metrics.python", f"must be an absolute path, got {m.python!r}"
    if m.user in ("root", "0", ""):
        return "metrics.user", "must not be root (it connects with the env file's URL)"
    return check_events(m.events)
