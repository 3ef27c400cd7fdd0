"""`metrics.json`: what `airflow-agent metrics` on this instance is (publisher or standby),
what it last published and when, and its errors (counted, the last one kept). `status` shows
it; the daemon rewrites it after every pass."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple

from agent.state import StateDoc, register


@dataclass
class MetricsDoc(StateDoc):
    name: ClassVar[str] = "metrics"
    version: ClassVar[int] = 1
    failure_fields: ClassVar[Optional[Tuple[str, str, str]]] = (
        "last_error_at",
        "last_result",
        "last_error",
    )

    role: Optional[str] = None  # publisher | standby (null: not decided yet)
    role_since: Optional[float] = None
    status: Optional[str] = None  # the STATUS= line
    last_pass_at: Optional[float] = None
    last_result: Optional[str] = None  # published | standby | failed
    # what this instance last published, and when (kept while it is a standby)
    last_publish_at: Optional[float] = None
    published: Dict[str, Dict[str, int]] = field(default_factory=dict)  # queue -> counts
    total: Dict[str, int] = field(default_factory=dict)  # running, queued, desired
    namespace: Optional[str] = None
    worker_concurrency: Optional[int] = None
    concurrency_source: Optional[str] = None
    interval: Optional[float] = None
    publishes: int = 0
    # counted errors: the metadata database (or the co-process), CloudWatch
    db_errors: int = 0
    cloudwatch_errors: int = 0
    last_error: Optional[str] = None  # never a URL or a secret
    last_error_at: Optional[float] = None
    last_query_seconds: Optional[float] = None


def _published(doc: Dict[str, Any]) -> str:
    at, total = doc.get("last_publish_at"), doc.get("total")
    if not isinstance(at, (int, float)) or not isinstance(total, dict):
        return ""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    queues = doc.get("published") if isinstance(doc.get("published"), dict) else {}
    parts = [
        f"{q} {c.get('running')}/{c.get('queued')}/{c.get('desired')}"
        for q, c in sorted(queues.items())
        if isinstance(c, dict)
    ]
    return (
        f" (last published {when}: running/queued/desired {' '.join(parts)}; total "
        f"{total.get('running')}/{total.get('queued')}/{total.get('desired')})"
    )


register(
    MetricsDoc,
    status_key="metrics",
    shown=("role", "last_result", "last_publish_at", "publishes", "last_error"),
    detail=_published,
    optional=True,
)
