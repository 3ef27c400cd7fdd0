"""The agent's event metrics against the embedded AWS over HTTP (moto server): recorded events
arrive in the AirflowEC2Agent namespace with the Cluster and Role dimensions, batched into one
PutMetricData call; while CloudWatch is unreachable they stay in the spool (and flushes pause),
and they are sent once it answers again; a job run through the runner flushes at its end."""

from __future__ import annotations

import datetime

import pytest

from agent.config import config_from_dict
from agent.events.publish import flush, record
from agent.events.spool import Spool
from agent.runtime.runner import run_job

DEAD = "http://127.0.0.1:9"  # nothing listens: connection refused at once


@pytest.fixture
def cfg(tmp_path):
    return config_from_dict(
        {
            "cluster": "events-it",
            "state_dir": str(tmp_path / "state"),
            "aws": {"region": "us-east-1"},
            "metrics": {"events": {"flush_timeout": 4.0}},
        }
    )


def puts(aws):
    return aws.calls("PutMetricData")


def sums(aws, metric: str, role: str = "worker") -> float:
    now = datetime.datetime.now(datetime.timezone.utc)
    got = aws.client("cloudwatch").get_metric_statistics(
        Namespace="AirflowEC2Agent",
        MetricName=metric,
        Dimensions=[{"Name": "Cluster", "Value": "events-it"}, {"Name": "Role", "Value": role}],
        StartTime=now - datetime.timedelta(hours=1),
        EndTime=now + datetime.timedelta(minutes=5),
        Period=3600,
        Statistics=["Sum"],
    )
    return sum(p["Sum"] for p in got["Datapoints"])


def test_events_survive_an_outage_and_arrive_batched_later(aws, cfg, monkeypatch):
    record(cfg, "Drains", role="worker")
    record(cfg, "Drains", role="worker")
    record(cfg, "DrainSeconds", 37.0, role="worker")
    record(cfg, "EnvSyncFailures", role="worker")
    spool = Spool(cfg.state_dir, cfg.metrics.events.spool_max)
    assert len(spool.read()) == 4

    monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD)
    down = flush(cfg)
    assert down.sent == 0 and down.left == 4 and down.error
    assert len(spool.read()) == 4  # nothing lost
    assert flush(cfg).skipped.startswith("backing off")  # the next pass pays nothing

    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.url)
    before = len(puts(aws))
    up = flush(cfg, force=True)
    assert (up.sent, up.left, up.error) == (4, 0, "")
    assert len(puts(aws)) == before + 1  # one call for all four
    assert not spool.pending()
    assert sums(aws, "Drains") == 2.0
    assert sums(aws, "DrainSeconds") == 37.0
    assert sums(aws, "EnvSyncFailures") == 1.0
    names = {
        m["MetricName"]: sorted(d["Name"] for d in m["Dimensions"])
        for m in aws.client("cloudwatch").list_metrics(Namespace="AirflowEC2Agent")["Metrics"]
    }
    assert names["Drains"] == ["Cluster", "Role"]


def test_a_throttled_call_keeps_the_events_for_the_next_flush(aws, cfg):
    record(cfg, "ConfapplyRestarts", role="scheduler")
    aws.inject("PutMetricData", code="Throttling", count=10)
    assert flush(cfg).left == 1
    aws.clear_faults()
    assert flush(cfg, force=True).sent == 1
    assert sums(aws, "ConfapplyRestarts", role="scheduler") == 1.0


def test_a_job_flushes_the_events_it_recorded_at_its_end(aws, cfg):
    def job(_args, c):
        record(c, "DrainsPastDeadline", role="worker")
        return 0

    before = len(puts(aws))
    assert run_job("drain", job, None, lambda: cfg).exit_code == 0
    assert len(puts(aws)) == before + 1
    assert sums(aws, "DrainsPastDeadline") == 1.0


def test_a_job_without_events_makes_no_call(aws, cfg):
    before = len(aws.calls())
    assert run_job("status", lambda _a, _c: 0, None, lambda: cfg).exit_code == 0
    assert len(aws.calls()) == before


def test_an_endpoint_that_never_answers_costs_one_flush_timeout_then_nothing(cfg, monkeypatch):
    """A listener on 127.0.0.1 that accepts nothing: the call times out within
    metrics.events.flush_timeout, the events stay, and the next flush does not even try."""
    import socket
    import time

    record(cfg, "Drains", role="worker")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        down = flush(cfg)
        took = time.monotonic() - started
        assert down.left == 1 and "timeout" in down.error.lower()
        assert took <= cfg.metrics.events.flush_timeout + 1.0, took
        started = time.monotonic()
        assert flush(cfg).skipped.startswith("backing off")
        assert time.monotonic() - started < 0.5
