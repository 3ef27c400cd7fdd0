"""Record an agent event, and send the spooled ones to CloudWatch.

`record(cfg, metric, value, role)` appends one event to the spool (agent.events.spool) and
never raises: an event must not fail the job it describes (a problem is one WARNING line).

`flush(cfg)` runs at the end of every job that recorded an event (agent.runtime.runner) and
after every daemon pass (agent.runtime.daemon), only when the spool holds something. One flusher
at a time; it sends the oldest events as one PutMetricData call (`metrics.namespace`,
dimensions Cluster and Role, agent.events.plan.batch) on the agent's client plumbing
(agent.platform.aws: region from agent.yaml, the environment or IMDS; instance-profile
credentials) with its retries and timeouts shrunk to `metrics.events.flush_timeout`, then
removes what was sent. When the call fails the events stay for a later flush, and flushes
pause for agent.events.plan.retry_delay (in `events.flush.json`) so a long outage costs each
pass nothing. Events CloudWatch would refuse whatever happens (older than two weeks, or a call
refused as invalid) are dropped with a WARNING, so one bad datum cannot block the spool.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from agent.events.plan import batch, make_event, retry_delay, sendable
from agent.events.spool import Spool
from agent.platform.fsutil import atomic_write

log = logging.getLogger(__name__)

BACKOFF = "events.flush.json"
# refusals no retry can cure: the batch is dropped rather than blocking the spool forever
INVALID = ("InvalidParameterValue", "InvalidParameterCombination", "MissingParameter")
_counter = [0]


def _events_cfg(cfg: Any) -> Any:
    return getattr(getattr(cfg, "metrics", None), "events", None)


def _role(cfg: Any) -> Optional[str]:
    from agent.jobs.role_state import RoleDoc
    from agent.state import StateStore

    doc = StateStore(cfg.state_dir).load_doc(RoleDoc)
    return doc.role if doc is not None else None


def record(cfg: Any, metric: str, value: float = 1.0, role: Optional[str] = None) -> None:
    """Spool one event (role: the caller's, else role.json's). Never raises."""
    try:
        ecfg = _events_cfg(cfg)
        if ecfg is None or not ecfg.enabled:
            return
        _counter[0] += 1
        ident = f"{os.getpid()}-{time.time_ns()}-{_counter[0]}"
        event = make_event(ident, metric, value, time.time(), role or _role(cfg))
        dropped = Spool(cfg.state_dir, ecfg.spool_max).append(event)
        if dropped:
            log.warning(
                "event spool full (metrics.events.spool_max %d): dropped the %d oldest event(s)",
                ecfg.spool_max,
                dropped,
            )
    except Exception as exc:  # noqa: BLE001 - an event never fails the job it describes
        log.warning("event %s not recorded: %s: %s", metric, type(exc).__name__, exc)


def _short_client(cfg: Any, timeout: float) -> Any:
    """A CloudWatch client whose retries and timeouts fit in `timeout` seconds."""
    from agent.platform.aws import AwsClients

    aws = dataclasses.replace(
        cfg.aws,
        max_attempts=2,
        connect_timeout=min(cfg.aws.connect_timeout, timeout / 4),
        read_timeout=min(cfg.aws.read_timeout, timeout / 4),
    )
    imds = dataclasses.replace(cfg.imds, attempts=1, timeout=min(cfg.imds.timeout, timeout / 4))
    return AwsClients(dataclasses.replace(cfg, aws=aws, imds=imds)).client("cloudwatch")


@dataclasses.dataclass
class FlushResult:
    sent: int = 0
    left: int = 0
    dropped: int = 0
    skipped: str = ""  # why nothing was tried: empty, another flusher, backing off
    error: str = ""


def _backoff(state_dir: str) -> dict:
    try:
        data = json.loads((Path(state_dir) / BACKOFF).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_backoff(state_dir: str, failures: int, now: float, error: str = "") -> None:
    doc = {"failures": failures, "retry_at": now + retry_delay(failures), "last_error": error}
    atomic_write(Path(state_dir) / BACKOFF, json.dumps(doc).encode(), mode=0o600)


def flush(
    cfg: Any,
    client: Optional[Callable[[], Any]] = None,
    now: Callable[[], float] = time.time,
    force: bool = False,
) -> FlushResult:
    """Send what the spool holds (one PutMetricData call); never raises. `client` makes the
    CloudWatch client (default: the agent's, with short timeouts); `force` ignores the pause
    after a failed flush."""
    try:
        return _flush(cfg, client, now, force)
    except Exception as exc:  # noqa: BLE001 - a flush never fails the job or the pass
        log.warning("event flush failed: %s: %s", type(exc).__name__, exc)
        return FlushResult(error=str(exc))


def _flush(cfg: Any, client: Optional[Callable[[], Any]], now: Callable[[], float], force: bool):
    ecfg = _events_cfg(cfg)
    if ecfg is None:
        return FlushResult(skipped="no metrics.events section")
    spool = Spool(cfg.state_dir, ecfg.spool_max)
    if not spool.pending():
        return FlushResult(skipped="empty")
    backoff = _backoff(cfg.state_dir)
    failures = int(backoff.get("failures") or 0)
    if not force and now() < float(backoff.get("retry_at") or 0):
        return FlushResult(skipped="backing off after a failed flush")
    with spool.flusher() as held:
        if not held:
            return FlushResult(skipped="another process flushes")
        fresh, stale = sendable(spool.read(), now())
        if stale:
            log.warning("dropping %d event(s) CloudWatch no longer takes (too old)", len(stale))
            spool.remove(e.id for e in stale)
        datums, ids = batch(fresh, cfg.cluster)
        if not datums:
            return FlushResult(dropped=len(stale))
        from agent.platform.aws import describe_error

        make = client or (lambda: _short_client(cfg, ecfg.flush_timeout))
        try:
            make().put_metric_data(Namespace=cfg.metrics.namespace, MetricData=datums)
        except Exception as exc:  # noqa: BLE001 - botocore's, no region, IMDS: try later
            # a ClientError's response names the code; a timeout's response is None
            response = getattr(exc, "response", None) or {}
            code = response.get("Error", {}).get("Code", "")
            why = describe_error(exc)
            if code in INVALID:
                log.warning("CloudWatch refused %d event(s) as invalid (%s)", len(ids), why)
                left = spool.remove(ids)
                return FlushResult(left=left, dropped=len(ids) + len(stale), error=why)
            _save_backoff(cfg.state_dir, failures + 1, now(), why)
            log.warning(
                "events: PutMetricData failed (%s); %d event(s) kept, next try in %.0fs",
                why,
                len(fresh),
                retry_delay(failures + 1),
            )
            return FlushResult(left=len(fresh), dropped=len(stale), error=why)
        left = spool.remove(ids)
        if failures:
            _save_backoff(cfg.state_dir, 0, now())
        log.info("events: %d event(s) sent as %d datum(s); %d left", len(ids), len(datums), left)
        return FlushResult(sent=len(ids), left=left, dropped=len(stale))


def flush_pending(cfg: Any, recorded_here: bool = False) -> None:
    """The end-of-job / end-of-pass hook: a flush when the spool holds something. With
    `recorded_here` (the end of a job) only when this process recorded an event: a job with
    nothing to say (worker-gate, status, a credentials refresh) never waits on CloudWatch;
    what an outage left in the spool goes with the daemons' passes or the next job's events."""
    if recorded_here and not _counter[0]:
        return
    ecfg = _events_cfg(cfg)
    state_dir = getattr(cfg, "state_dir", None)
    if ecfg is None or not state_dir or not Spool(state_dir, ecfg.spool_max).pending():
        return
    flush(cfg)
