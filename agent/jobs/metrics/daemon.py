"""`airflow-agent metrics`: Celery queue depth and the desired worker count to CloudWatch.

A `Type=notify` daemon on the scheduler role, on the daemon runtime (agent/runtime/daemon.py):
READY=1 after the first pass, WATCHDOG=1 while the loop is alive (a pass declares its database
wait and its CloudWatch call as busy sections), STATUS= `publishing: queue default running 3
queued 37 desired 10` or `standby: another scheduler publishes`, STOPPING=1 on SIGTERM.

Every `metrics.interval` s one pass:
1. the co-process (agent.jobs.metrics.database) is started when absent, or restarted when the
   env file's sql_alchemy_conn changed; it takes part in the election (one publisher per
   cluster: a PostgreSQL advisory lock held for as long as this daemon publishes; the others
   try to take it every pass) and, on the publisher, counts running and queued task instances
   per queue;
2. the publisher computes DesiredWorkers = ceil((running + queued) / worker concurrency)
   (`metrics.worker_concurrency`, else the env file's AIRFLOW__CELERY__WORKER_CONCURRENCY, else
   16) and sends every datum in ONE PutMetricData call (agent.jobs.metrics.plan);
3. `metrics.json` (agent.jobs.metrics.state) records the role, what was published and when,
   and the errors.
A database or CloudWatch error is logged (never a URL or secret), counted, recorded, and
retried at the next pass; it never ends the daemon.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import socket
import time
from typing import Any, Callable, List, Optional

from agent.airflow.config_options import OptionError
from agent.airflow.option_sources import airflow_options, sql_alchemy_conn
from agent.errors import AgentError, ConfigError
from agent.jobs.metrics.database import GRACE, DatabaseLink, LinkError
from agent.jobs.metrics.plan import (
    ERROR,
    PUBLISHER,
    Election,
    QueueCounts,
    Report,
    capped,
    concurrency_from,
    lock_key,
    metric_data,
    queue_counts,
    status_line,
    total,
)
from agent.jobs.metrics.state import MetricsDoc
from agent.platform.envfile import parse_env
from agent.runtime.daemon import Daemon, DaemonRuntime
from agent.state import StateStore

log = logging.getLogger(__name__)

FAILURE_DOCUMENT = MetricsDoc
# a publisher whose PutMetricData fails this many passes in a row lets the lock go and sits
# out 1.5 intervals, so another scheduler (perhaps with a working path to CloudWatch) takes over
STEP_DOWN_AFTER = 3


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval",
        type=float,
        metavar="S",
        default=None,
        help="seconds between publishes (default metrics.interval)",
    )


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class Metrics(Daemon):
    def __init__(
        self,
        cfg,
        runtime: DaemonRuntime,
        cloudwatch: Callable[[], Any],
        interval: Optional[float] = None,
        holder: Optional[str] = None,
        wall: Callable[[], datetime.datetime] = _utc_now,
        link_start: Callable[..., Any] = DatabaseLink.start,
    ):
        self.cfg = cfg
        self.rt = runtime
        self.interval = interval if interval is not None else cfg.metrics.interval
        self.holder = holder or socket.gethostname()
        self.key = lock_key(cfg.cluster)
        self.cloudwatch = cloudwatch  # makes the client at the first publish (region, IMDS)
        self.wall = wall
        self.link_start = link_start  # (cfg, url, key, holder, url_hash) -> a DatabaseLink
        self.link: Optional[DatabaseLink] = None
        self.env_hash: Optional[str] = None  # of the env file the co-process's URL came from
        self.election = Election()
        self.state = StateStore(cfg.state_dir)
        previous = self.state.load_doc(MetricsDoc)
        # what this instance last published survives a restart (status shows it)
        self.doc = previous if previous is not None else MetricsDoc()
        self.doc.role, self.doc.role_since = None, None
        self.error: Optional[str] = None
        self.counts: List[QueueCounts] = []
        self.seen: set = set()  # queues published this run: a drained one publishes zeros
        self.cloudwatch_failures = 0  # in a row
        self.sit_out_until: Optional[float] = None

    # -- one pass

    def _env(self) -> tuple:
        """(the env file's variables, a hash of its bytes); ({}, "") when it cannot be read."""
        try:
            with open(self.cfg.env.file, "rb") as f:
                data = f.read()
        except OSError:
            return {}, ""
        return parse_env(data), hashlib.sha256(data).hexdigest()

    def _concurrency(self, env: dict) -> tuple:
        value = None
        try:
            got = airflow_options(self.cfg, env, self.cfg.env.file).get(
                "celery", "worker_concurrency"
            )
            value = got.value if got is not None else None
        except OptionError as exc:
            log.warning("metrics: [celery] worker_concurrency: %s", exc)
        return concurrency_from(self.cfg.metrics.worker_concurrency, value)

    def _aws_budget(self) -> float:
        """The longest one AWS call may take with botocore's retries (+ slack)."""
        a = self.cfg.aws
        return a.max_attempts * (a.connect_timeout + a.read_timeout) + 5

    def _ensure_link(self, env_hash: str) -> Optional[str]:
        """Start the co-process, or restart it when the env file changed and gives another URL;
        why not, or None. The URL is resolved (its _CMD or _SECRET form run) only then, not
        every pass; a running co-process is kept when a changed file cannot be resolved."""
        if self.link is not None and not self.link.alive():
            self.link = None
        if self.link is not None and env_hash == self.env_hash:
            return None
        try:
            with self.rt.busy(self._aws_budget()):
                url = sql_alchemy_conn(self.cfg)
            why = None if url is not None else f"{self.cfg.env.file} gives no sql_alchemy_conn"
        except (OptionError, AgentError) as exc:
            url, why = None, f"cannot resolve [database] sql_alchemy_conn: {exc}"
        if url is None:
            if self.link is not None:
                log.warning("metrics: %s; keeping the co-process started before", why)
                return None
            return why
        self.env_hash = env_hash
        url_hash = hashlib.sha256(url.encode()).hexdigest()
        if self.link is not None and self.link.url_hash != url_hash:
            log.info("metrics: the database URL changed; restarting the co-process")
            self.link.close()
            self.link = None
        if self.link is None:
            try:
                self.link = self.link_start(self.cfg, url, self.key, self.holder, url_hash)
            except LinkError as exc:
                return str(exc)
            log.info("metrics: co-process pid %d started", self.link.pid)
        return None

    def _failed(self, kind: str, why: str) -> None:
        if kind == "db":
            self.doc.db_errors += 1
        else:
            self.doc.cloudwatch_errors += 1
        self.error = why
        self.doc.last_error, self.doc.last_error_at = why, time.time()
        self.doc.last_result = "failed"
        log.error("metrics: %s", why)

    def _step_down(self) -> None:
        log.warning(
            "metrics: %d PutMetricData calls in a row failed; letting another scheduler publish",
            self.cloudwatch_failures,
        )
        if self.link is not None:
            self.link.close()  # the session ends, and the lock with it
            self.link = None
        self.cloudwatch_failures = 0
        self.election.observe(Report(ERROR), self.rt.now())
        self.doc.role, self.doc.role_since = None, None
        self.sit_out_until = self.rt.now() + 1.5 * self.interval

    def pass_once(self) -> None:
        self.error = None
        if self.sit_out_until is not None and self.rt.now() < self.sit_out_until:
            self.error = f"stepped down after {STEP_DOWN_AFTER} failed PutMetricData calls"
            return None
        self.sit_out_until = None
        env, env_hash = self._env()
        concurrency, source = self._concurrency(env)
        why = self._ensure_link(env_hash)
        if why is not None:
            return self._failed("db", why)
        assert self.link is not None
        timeout = self.cfg.metrics.query_timeout + GRACE
        with self.rt.busy(timeout + 5):
            report = self.link.tick(timeout, self.rt.now)
        changed = self.election.observe(report, self.rt.now())
        self.doc.role, self.doc.role_since = self.election.role, self.election.since
        if report.role == ERROR:
            if not self.link.alive():
                self.link = None
            return self._failed("db", report.why)
        if changed:
            log.info("metrics: %s (cluster %s)", changed, self.cfg.cluster)
        self.doc.last_query_seconds = round(report.took, 4)
        if report.role != PUBLISHER:
            self.doc.last_result = "standby"
            return None
        counts = queue_counts(report.rows, concurrency, set(self.cfg.metrics.queues) | self.seen)
        overall = total(counts, concurrency)
        shown, left_out = capped(counts)
        if left_out:
            log.warning("metrics: %d queue(s) over PutMetricData's limit left out", left_out)
        datums = metric_data(self.cfg.cluster, shown, overall, self.wall())
        try:
            with self.rt.busy(self._aws_budget()):
                self.cloudwatch().put_metric_data(
                    Namespace=self.cfg.metrics.namespace, MetricData=datums
                )
        except Exception as exc:  # botocore's errors, no region, no credentials: next pass
            from agent.platform.aws import describe_error

            self._failed("cloudwatch", f"CloudWatch PutMetricData: {describe_error(exc)}")
            self.cloudwatch_failures += 1
            if self.cloudwatch_failures >= STEP_DOWN_AFTER:
                self._step_down()
            return None
        self.cloudwatch_failures = 0
        self.seen |= {c.queue for c in shown}
        self.counts = shown
        self.doc.last_result = "published"
        self.doc.last_publish_at = time.time()
        self.doc.published = {c.queue: c.to_dict() for c in shown}
        self.doc.total = overall.to_dict()
        self.doc.publishes += 1
        self.doc.worker_concurrency, self.doc.concurrency_source = concurrency, source
        return None

    def _record(self) -> None:
        self.doc.status = self.status()
        self.doc.last_pass_at = time.time()
        self.doc.namespace = self.cfg.metrics.namespace
        self.doc.interval = self.interval
        try:
            self.state.save_doc(self.doc)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state.path(MetricsDoc), exc.strerror)

    # -- the daemon's decisions (the runtime runs the loop)

    def step(self) -> float:
        started = self.rt.now()
        self.pass_once()
        self._record()
        # the interval counts from the start of a pass, as a timer's would
        return max(0.0, self.interval - (self.rt.now() - started))

    def status(self) -> str:
        return status_line(self.election.role, self.counts, self.error, self.interval)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()  # the session ends: another scheduler takes over at its next pass
            self.link = None
        log.info("metrics stopped")


def run(args: argparse.Namespace, cfg) -> int:
    interval = args.interval if args.interval is not None else cfg.metrics.interval
    if not interval >= 1:
        raise ConfigError(f"--interval must be at least 1 second, got {interval:g}")
    from agent.platform.aws import AwsClients

    clients = AwsClients(cfg)
    runtime = DaemonRuntime("metrics", watchdog_fallback=None)
    log.info(
        "metrics: cluster %s, namespace %s, every %g s",
        cfg.cluster,
        cfg.metrics.namespace,
        interval,
    )
    daemon = Metrics(cfg, runtime, lambda: clients.client("cloudwatch"), interval)
    return runtime.run(daemon)
