"""`airflow-agent metrics`, fast: the pure core (agent/jobs/metrics/plan.py) and the daemon's
decisions on virtual time, two daemons sharing one stand-in of the database's advisory lock
(the real lock, co-process and CloudWatch: tests/test_metrics_postgres.py)."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any, Dict, List, Optional

import pytest

from agent.airflow.restart_slot_plan import slot_key
from agent.config import DEFAULT_AGENT_UNITS, ROLES, config_from_dict
from agent.errors import ConfigError
from agent.jobs.metrics import plan
from agent.jobs.metrics.daemon import Metrics
from agent.jobs.metrics.plan import (
    MAX_QUEUES,
    Election,
    QueueCounts,
    Report,
    desired_workers,
    parse_report,
    queue_counts,
)
from agent.jobs.metrics.state import MetricsDoc
from agent.jobs.status import render
from agent.runtime.daemon import DaemonRuntime
from agent.state import registration
from tests.test_daemon_runtime import TimedNotifier, VirtualClock

# -- the arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "running,queued,concurrency,desired",
    [(0, 0, 16, 0), (0, 40, 4, 10), (0, 41, 4, 11), (3, 37, 4, 10), (1, 0, 16, 1), (16, 0, 16, 1)],
)
def test_desired_workers_is_the_ceiling_of_tasks_over_concurrency(
    running, queued, concurrency, desired
):
    assert desired_workers(running, queued, concurrency) == desired


def test_desired_workers_matches_the_formula_everywhere_and_refuses_zero_concurrency():
    for r in range(0, 30):
        for q in range(0, 30):
            for c in (1, 3, 4, 16):
                assert desired_workers(r, q, c) == math.ceil((r + q) / c)
    with pytest.raises(ValueError):
        desired_workers(1, 1, 0)


def test_worker_concurrency_comes_from_the_config_the_env_file_or_airflows_default():
    assert plan.concurrency_from(8, "4") == (8, "metrics.worker_concurrency")
    assert plan.concurrency_from(None, "4") == (4, "the env file")
    assert plan.concurrency_from(None, " 32\n") == (32, "the env file")
    assert plan.concurrency_from(None, None) == (16, "Airflow's default")
    for bad in ("0", "-2", "four", ""):
        value, source = plan.concurrency_from(None, bad)
        assert value == 16 and "not a count" in source


def test_counts_per_queue_with_always_published_queues_and_null_as_default():
    rows = [("default", "queued", 37), ("default", "running", 3), ("gpu", "queued", 5)]
    rows.append((None, "queued", 2))
    got = queue_counts(rows, 4, always=["default", "idle"])
    assert got == [
        QueueCounts("default", 3, 39, 11),
        QueueCounts("gpu", 0, 5, 2),
        QueueCounts("idle", 0, 0, 0),
    ]
    overall = plan.total(got, 4)
    assert (overall.running, overall.queued, overall.desired) == (3, 44, 12)


def test_the_datums_of_one_call_per_queue_and_the_cluster_total():
    ts = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    counts = queue_counts([("default", "queued", 40)], 4, always=["default", "gpu"])
    data = plan.metric_data("prod", counts, plan.total(counts, 4), ts)
    assert len(data) == 9
    by = {
        (d["MetricName"], tuple((x["Name"], x["Value"]) for x in d["Dimensions"])): d["Value"]
        for d in data
    }
    c = ("Cluster", "prod")
    assert by[("DesiredWorkers", (c, ("Queue", "default")))] == 10.0
    assert by[("QueuedTasks", (c, ("Queue", "default")))] == 40.0
    assert by[("RunningTasks", (c, ("Queue", "gpu")))] == 0.0
    assert by[("DesiredWorkers", (c,))] == 10.0
    assert {d["Unit"] for d in data} == {"Count"} and {d["Timestamp"] for d in data} == {ts}


def test_many_queues_are_capped_to_one_calls_limit_keeping_the_busiest():
    counts = [QueueCounts(f"q{i:04d}", 0, i, i) for i in range(MAX_QUEUES + 10)]
    kept, left_out = plan.capped(counts)
    assert left_out == 10 and len(kept) == MAX_QUEUES
    assert {c.queue for c in kept} == {f"q{i:04d}" for i in range(10, MAX_QUEUES + 10)}
    data = plan.metric_data("c", kept, plan.total(counts, 1), None)
    assert len(data) <= plan.MAX_DATUMS


def test_the_lock_key_is_per_cluster_and_never_a_restart_slots():
    assert plan.lock_key("a") == plan.lock_key("a") != plan.lock_key("b")
    assert -(2**63) <= plan.lock_key("a") < 2**63
    slots = {slot_key(c, r, i) for c in ("a", "b") for r in ROLES for i in range(20)}
    assert plan.lock_key("a") not in slots and plan.lock_key("b") not in slots


def test_reports_from_the_co_process_are_checked():
    ok = parse_report(json.dumps({"role": "publisher", "rows": [["default", "queued", 4]]}))
    assert ok.role == "publisher" and ok.rows == (("default", "queued", 4),)
    assert parse_report('{"role": "standby", "took": 0.01}').role == "standby"
    err = parse_report('{"role": "error", "why": "metadata database: OperationalError: x"}')
    assert err.role == "error" and err.why.startswith("metadata database")
    for bad in (
        "not json",
        "[]",
        '{"role": "publisher"}',
        '{"role": "publisher", "rows": [["default", "failed", 4]]}',
        '{"role": "publisher", "rows": [["default", "queued", -1]]}',
        '{"role": "publisher", "rows": [["default", "queued", true]]}',
        '{"role": "publisher", "rows": [[7, "queued", 1]]}',
        '{"role": "king"}',
    ):
        assert parse_report(bad).role == "error", bad


def test_the_election_logs_changes_only():
    e = Election()
    assert e.observe(Report("standby"), 10.0) == "standby: another scheduler publishes the metrics"
    assert e.observe(Report("standby"), 20.0) is None
    line = e.observe(Report("publisher"), 25.0)
    assert line == "now the cluster's metrics publisher (took over from another scheduler)"
    assert (e.role, e.since) == ("publisher", 25.0)
    # an error: the session (and a lock it held) ended; the role is unknown until a report
    assert e.observe(Report("error", why="x"), 30.0) is None and e.role is None
    assert e.observe(Report("publisher"), 40.0) == "now the cluster's metrics publisher"
    assert (e.role, e.since) == ("publisher", 40.0)


def test_status_lines():
    counts = [QueueCounts("default", 3, 37, 10)]
    assert (
        plan.status_line("publisher", counts, None, 60)
        == "publishing: queue default running 3 queued 37 desired 10"
    )
    assert plan.status_line("standby", [], None, 60) == "standby: another scheduler publishes"
    assert plan.status_line(None, [], "boom", 60) == "error: boom (retrying every 60 s)"


def test_the_config_section_and_the_scheduler_unit():
    cfg = config_from_dict({})
    assert (cfg.metrics.interval, cfg.metrics.namespace) == (60.0, "AirflowEC2Agent")
    assert cfg.metrics.worker_concurrency is None and cfg.metrics.queues == ["default"]
    assert "airflow-agent-metrics" in DEFAULT_AGENT_UNITS["scheduler"]
    for role in ("webserver", "worker"):
        assert "airflow-agent-metrics" not in DEFAULT_AGENT_UNITS[role]
    for bad, key in (
        ({"interval": 0}, "metrics.interval"),
        ({"namespace": "AWS/EC2"}, "metrics.namespace"),
        ({"worker_concurrency": 0}, "metrics.worker_concurrency"),
        ({"queues": [""]}, "metrics.queues[0]"),
        ({"user": "root"}, "metrics.user"),
        ({"python": "python3"}, "metrics.python"),
    ):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
            config_from_dict({"metrics": bad})


# -- the daemon on virtual time ------------------------------------------------------------------


class Database:
    """Stand-in for the metadata database's part in the election: one advisory lock (held by
    a session until it ends) and the task instance rows the holder counts."""

    def __init__(self) -> None:
        self.holder: Optional[Link] = None
        self.rows: List[List[Any]] = []
        self.down = False


class Link:
    """What DatabaseLink does, against the stand-in (same reports, same lock rule)."""

    def __init__(self, db: Database, url_hash: str):
        self.db, self.url_hash, self.pid = db, url_hash, 1
        self.open = True

    def alive(self) -> bool:
        return self.open

    def tick(self, timeout: float, clock) -> Report:
        if self.db.down:
            self.close()
            return Report("error", why="metadata database: OperationalError: down")
        if self.db.holder is None:
            self.db.holder = self
        if self.db.holder is not self:
            return Report("standby", queries=1)
        return parse_report(json.dumps({"role": "publisher", "rows": self.db.rows}))

    def close(self) -> None:
        self.open = False
        if self.db.holder is self:
            self.db.holder = None  # the session ends, and its lock with it


class CloudWatch:
    def __init__(self, clock: VirtualClock, fail: int = 0):
        self.clock, self.fail = clock, fail
        self.calls: List[Dict[str, Any]] = []

    def put_metric_data(self, **kwargs: Any) -> None:
        self.calls.append({"t": self.clock.now(), **kwargs})
        if self.fail:
            self.fail -= 1
            raise RuntimeError("endpoint unreachable")


def make_daemon(tmp_path, clock, db, name, cw=None, **metrics):
    env = tmp_path / f"{name}.env"
    env.write_text(
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://u:pw@db/airflow\n"
        "AIRFLOW__CELERY__WORKER_CONCURRENCY=4\n"
    )
    cfg = config_from_dict(
        {
            "cluster": "prod",
            "state_dir": str(tmp_path / f"state-{name}"),
            "env": {"file": str(env)},
            "metrics": {"interval": 60.0, **metrics},
        }
    )
    rt = DaemonRuntime(name, notifier=TimedNotifier(clock), clock=clock, watchdog_usec=None)
    cw = cw or CloudWatch(clock)
    daemon = Metrics(
        cfg,
        rt,
        lambda: cw,
        holder=name,
        link_start=lambda cfg, url, key, holder, url_hash: Link(db, url_hash),
    )
    return daemon, cw


def drive(clock: VirtualClock, due: Dict[Metrics, float], until: float) -> None:
    """Run each daemon's passes at the times its step() asks for (`due`: its next), in order."""
    while True:
        d = min(due, key=lambda x: due[x])
        if due[d] > until:
            clock.t = until
            return
        clock.t = due[d]
        due[d] = clock.now() + d.step()


def test_one_publisher_one_call_per_interval_and_a_takeover_within_two_intervals(tmp_path):
    clock, db = VirtualClock(), Database()
    db.rows = [["default", "queued", 37], ["default", "running", 3]]
    cw = CloudWatch(clock)
    a, _ = make_daemon(tmp_path, clock, db, "a", cw)
    b, _ = make_daemon(tmp_path, clock, db, "b", cw)
    start = clock.now()
    due = {a: start, b: start + 7.5}  # the other scheduler started a little later
    drive(clock, due, start + 600)
    assert a.status() == "publishing: queue default running 3 queued 37 desired 10"
    assert b.status() == "standby: another scheduler publishes"
    times = [c["t"] for c in cw.calls]
    assert len(times) == 11  # t = 0, 60, ..., 600: one call per interval, from one daemon
    assert all(abs(t2 - t1 - 60) < 1e-6 for t1, t2 in zip(times, times[1:]))
    assert len(cw.calls[0]["MetricData"]) == 6 and cw.calls[0]["Namespace"] == "AirflowEC2Agent"
    # the publisher dies: its session (and the lock) ends; the standby takes over
    died = clock.now() + 1.0
    clock.t = died
    a.link.close()
    del due[a]
    drive(clock, due, died + 120)
    taken = [c["t"] for c in cw.calls if c["t"] >= died]
    assert taken and taken[0] - died <= 2 * 60
    assert taken[0] == start + 607.5  # the standby's next pass after the death
    assert b.election.role == "publisher" and b.doc.publishes == len(taken)


def test_errors_are_counted_recorded_and_retried_next_interval(tmp_path):
    clock, db = VirtualClock(), Database()
    db.rows = [["default", "queued", 40]]
    daemon, cw = make_daemon(tmp_path, clock, db, "a", CloudWatch(VirtualClock(), fail=1))
    assert daemon.step() == 60.0
    doc = daemon.state.read(MetricsDoc)
    assert doc.cloudwatch_errors == 1 and doc.last_result == "failed"
    assert "CloudWatch PutMetricData" in doc.last_error and "pw" not in doc.last_error
    assert daemon.status().startswith("error: CloudWatch PutMetricData")
    daemon.step()
    doc = daemon.state.read(MetricsDoc)
    assert (doc.last_result, doc.publishes, doc.total["desired"]) == ("published", 1, 10)
    db.down = True
    daemon.step()
    doc = daemon.state.read(MetricsDoc)
    assert doc.db_errors == 1 and doc.last_error.startswith("metadata database")
    assert doc.published["default"]["queued"] == 40  # what it last published stays
    db.down = False
    daemon.step()
    assert daemon.state.read(MetricsDoc).publishes == 2 and len(cw.calls) == 3


def test_a_drained_queue_publishes_zeros_and_ready_comes_after_the_first_pass(tmp_path):
    clock, db = VirtualClock(), Database()
    db.rows = [["gpu", "queued", 9]]
    daemon, cw = make_daemon(tmp_path, clock, db, "a")
    clock.at(clock.now() + 150, daemon.rt.request_stop)
    assert daemon.rt.run(daemon) == 0
    assert daemon.link is None  # close() ended the session (the lock goes with it)
    ready = [m for m in daemon.rt.notifier.lines() if m.startswith("READY=1")]
    assert ready == [
        "READY=1\nSTATUS=publishing: queue default running 0 queued 0 desired 0; "
        "queue gpu running 0 queued 9 desired 3"
    ]
    db.rows = []
    daemon.step()
    assert {d["Value"] for d in cw.calls[-1]["MetricData"]} == {0.0}
    assert len(cw.calls[-1]["MetricData"]) == 9  # default, gpu, the total


def test_status_shows_what_this_instance_last_published(tmp_path):
    clock, db = VirtualClock(), Database()
    db.rows = [["default", "queued", 37], ["default", "running", 3]]
    daemon, _ = make_daemon(tmp_path, clock, db, "a")
    daemon.step()
    entry = registration(MetricsDoc)
    assert entry.status_key == "metrics"
    raw = daemon.state.load_raw("metrics")
    line = entry.detail(raw)
    assert "running/queued/desired default 3/37/10; total 3/37/10" in line
    assert raw["role"] == "publisher" and isinstance(raw["last_publish_at"], float)
    text = render(
        {
            "role": "scheduler",
            "env_file": {"path": "/x", "sha256": None, "error": "absent", "synced_sha256": None},
            "config": {
                "current_hash": None,
                "hash_error": "x",
                "applied_hash": None,
                "in_sync": False,
                "last_result": None,
            },
            "metrics": raw,
            "systemd": {"reachable": False, "error": "test"},
            "units": {},
        }
    )
    assert "role=publisher last_result=published last_publish_at=" in text
    assert "total 3/37/10" in text


def test_the_co_process_is_restarted_only_when_the_database_url_changes(tmp_path, caplog):
    clock, db = VirtualClock(), Database()
    daemon, _ = make_daemon(tmp_path, clock, db, "a")
    starts: List[Link] = []

    def start(cfg, url, key, holder, url_hash):
        starts.append(Link(db, url_hash))
        return starts[-1]

    daemon.link_start = start
    daemon.step()
    daemon.step()
    assert len(starts) == 1  # the URL is resolved once, not every pass
    env = tmp_path / "a.env"
    env.write_text(env.read_text() + "AIRFLOW__CORE__PARALLELISM=64\n")
    daemon.step()
    assert len(starts) == 1 and starts[0].open  # another file, the same URL: kept
    env.write_text(env.read_text().replace("@db/", "@db2/"))
    daemon.step()
    assert len(starts) == 2 and not starts[0].open and starts[1].open
    env.unlink()  # unreadable for a while: the running co-process is kept
    daemon.step()
    assert len(starts) == 2 and starts[1].open and daemon.doc.last_result == "published"
    assert "keeping the co-process started before" in caplog.text


def test_a_publisher_that_cannot_reach_cloudwatch_steps_down_for_another(tmp_path):
    from agent.jobs.metrics.daemon import STEP_DOWN_AFTER

    clock, db = VirtualClock(), Database()
    db.rows = [["default", "queued", 8]]
    broken = CloudWatch(clock, fail=10**6)  # this scheduler's path to CloudWatch is broken
    working = CloudWatch(clock)
    a, _ = make_daemon(tmp_path, clock, db, "a", broken)
    b, _ = make_daemon(tmp_path, clock, db, "b", working)
    start = clock.now()
    due = {a: start, b: start + 10}
    drive(clock, due, start + (STEP_DOWN_AFTER - 1) * 60 - 5)  # before a's third failure
    assert b.election.role == "standby" and not working.calls
    drive(clock, due, start + 600)
    # a failed 3 passes in a row, let the lock go and sat out; b took over and publishes
    assert len(broken.calls) == STEP_DOWN_AFTER
    assert b.election.role == "publisher" and len(working.calls) >= 7
    assert working.calls[0]["t"] - broken.calls[-1]["t"] <= 60
    doc = a.state.read(MetricsDoc)
    assert doc.cloudwatch_errors == STEP_DOWN_AFTER and doc.role == "standby"
