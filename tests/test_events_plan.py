"""The pure core of the agent's event metrics (agent.events.plan) on virtual time, and the
spool (agent.events.spool) on a temporary state dir: events to datums, the spool's bound, what
CloudWatch would refuse, batching, the pause after a failed flush; nothing leaves the process."""

from __future__ import annotations

import datetime
import os
import stat

import pytest

from agent.events import plan
from agent.events.spool import Spool

T0 = 1_764_000_000.0  # a fixed epoch: virtual time


def ev(n: int, metric: str = "Drains", value: float = 1.0, at: float = T0, role: str = "worker"):
    return plan.make_event(f"id{n}", metric, value, at, role)


def test_an_event_round_trips_through_its_spool_line_and_holds_nothing_else():
    e = ev(1, "DrainSeconds", 42.5)
    line = e.to_line()
    assert plan.parse_line(line) == e
    assert set(__import__("json").loads(line)) == {"id", "m", "v", "t", "r"}


@pytest.mark.parametrize(
    "line",
    ['{"id": "x", "m": "NoSuchMetric", "v": 1, "t": 1, "r": "worker"}', "{torn", "[]", ""],
)
def test_a_line_that_is_not_an_event_is_dropped(line):
    assert plan.parse_line(line) is None


def test_bad_events_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="unknown event metric 'Nope'"):
        plan.make_event("i", "Nope", 1, T0, "worker")
    with pytest.raises(ValueError, match="finite"):
        plan.make_event("i", "Drains", float("nan"), T0, "worker")
    assert plan.make_event("i", "Drains", 1, T0, None).role == plan.UNKNOWN_ROLE


def test_the_bound_keeps_the_newest_and_counts_the_dropped():
    events = [ev(i) for i in range(10)]
    kept, dropped = plan.bounded(events, 4)
    assert [e.id for e in kept] == ["id6", "id7", "id8", "id9"] and dropped == 6
    assert plan.bounded(events, 10) == (events, 0)


def test_events_cloudwatch_would_refuse_are_split_off():
    old = ev(1, at=T0 - 15 * 86400)
    ahead = ev(2, at=T0 + 3 * 3600)
    ok = ev(3, at=T0 - 13 * 86400)
    fresh, stale = plan.sendable([old, ahead, ok], T0)
    assert fresh == [ok] and stale == [old, ahead]


def test_events_of_one_metric_role_and_minute_become_one_statistic_datum():
    events = [
        ev(1, "DrainSeconds", 10.0, T0 + 1),
        ev(2, "DrainSeconds", 30.0, T0 + 2),
        ev(3, "DrainSeconds", 5.0, T0 + 120),  # another minute
        ev(4, "ConfapplyRestarts", 1.0, T0 + 3, role="scheduler"),
    ]
    datums, ids = plan.batch(events, "prod")
    assert sorted(ids) == ["id1", "id2", "id3", "id4"]
    first = datums[0]
    assert first["MetricName"] == "DrainSeconds" and first["Unit"] == "Seconds"
    assert first["Dimensions"] == [
        {"Name": "Cluster", "Value": "prod"},
        {"Name": "Role", "Value": "worker"},
    ]
    assert first["StatisticValues"] == {
        "SampleCount": 2.0,
        "Sum": 40.0,
        "Minimum": 10.0,
        "Maximum": 30.0,
    }
    assert first["Timestamp"] == datetime.datetime.fromtimestamp(
        T0 - T0 % 60, datetime.timezone.utc
    )
    order = ["DrainSeconds", "ConfapplyRestarts", "DrainSeconds"]
    assert [d["MetricName"] for d in datums] == order
    assert {d["Dimensions"][1]["Value"] for d in datums} == {"worker", "scheduler"}


def test_one_call_carries_at_most_the_limit_and_the_rest_waits():
    events = [ev(i, at=T0 + 60 * i) for i in range(plan.MAX_DATUMS + 5)]  # a minute each
    datums, ids = plan.batch(events, "prod")
    assert len(datums) == plan.MAX_DATUMS
    assert ids == [f"id{i}" for i in range(plan.MAX_DATUMS)]  # the oldest go first
    datums, ids = plan.batch(events, "prod", most=2)
    assert len(datums) == 2 and ids == ["id0", "id1"]


def test_every_metric_has_a_cloudwatch_unit():
    assert set(plan.METRICS.values()) <= {"Count", "Seconds"}
    assert plan.DIMENSIONS == ("Cluster", "Role")


def test_a_failed_flush_pauses_the_next_ones_with_a_cap():
    delays = [plan.retry_delay(n) for n in range(0, 8)]
    assert delays[0] == 0 and delays[1] == plan.RETRY_FIRST
    assert delays == sorted(delays) and delays[-1] == plan.RETRY_CAP


# -- the spool on disk ---------------------------------------------------------------------------


def test_the_spool_is_root_only_and_bounded_dropping_the_oldest(tmp_path):
    spool = Spool(str(tmp_path), most=3)
    assert not spool.pending()
    drops = [spool.append(ev(i)) for i in range(5)]
    assert drops == [0, 0, 0, 1, 1]
    assert [e.id for e in spool.read()] == ["id2", "id3", "id4"]
    assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o600
    assert spool.pending()


def test_removing_sent_events_keeps_those_appended_meanwhile(tmp_path):
    spool = Spool(str(tmp_path), most=10)
    for i in range(3):
        spool.append(ev(i))
    sent = [e.id for e in spool.read()][:2]
    spool.append(ev(9))  # while the flush was sending
    assert spool.remove(sent) == 2
    assert [e.id for e in spool.read()] == ["id2", "id9"]


def test_a_torn_line_is_skipped_and_dropped_at_the_next_rewrite(tmp_path):
    spool = Spool(str(tmp_path), most=10)
    spool.append(ev(1))
    with open(spool.path, "a") as f:
        f.write('{"id": "half')  # a writer killed mid-line
    spool.append(ev(2))
    assert [e.id for e in spool.read()] == ["id1", "id2"]


def test_only_one_flusher_at_a_time(tmp_path):
    spool = Spool(str(tmp_path), most=10)
    with spool.flusher() as first, Spool(str(tmp_path), most=10).flusher() as second:
        assert first and not second
