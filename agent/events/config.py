"""The `metrics.events` section of agent.yaml: how the agent's own events reach CloudWatch.

Pure (stdlib only) so agent.jobs.metrics.config can nest it; `check_events` holds the section's
own checks and returns (dotted key, why) like the other sections' checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

MAX_SPOOL = 100_000
MAX_FLUSH_TIMEOUT = 60.0


@dataclass
class EventsConfig:
    # false: events are neither spooled nor sent (the jobs behave the same otherwise)
    enabled: bool = True
    # events kept while CloudWatch cannot be reached; beyond it the oldest are dropped (WARNING)
    spool_max: int = 2000
    # the longest one flush (at the end of a job or a daemon pass) may take, retries included
    flush_timeout: float = 5.0


def check_events(e: EventsConfig) -> Optional[Tuple[str, str]]:
    """(dotted key, why) for the first bad key of the section, else None."""
    if not 1 <= e.spool_max <= MAX_SPOOL:
        return "metrics.events.spool_max", f"must be 1..{MAX_SPOOL}, got {e.spool_max}"
    if not 0 < e.flush_timeout <= MAX_FLUSH_TIMEOUT:
        return (
            "metrics.events.flush_timeout",
            f"must be more than 0 and at most {MAX_FLUSH_TIMEOUT:g} s, got {e.flush_timeout:g}",
        )
    return None
