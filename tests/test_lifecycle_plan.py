"""The lifecycle watch's pure core (agent/jobs/lifecycle/plan.py) and the boot gate.

Pure and fast (no rig servers): `make mutate` measures how well these prove the plan. The real
Watcher on a virtual clock against the rig lives in tests/test_lifecycle_watcher.py.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import config_from_dict
from agent.jobs.lifecycle import plan
from agent.worker.boot_gate import boot_gate_holds, boot_gate_reason

# -- timing rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timeout,interval",
    [(30, 10.0), (6, 2.0), (900, 300.0), (3600, 300.0), (7200, 300.0), (2, 1.0)],
)
def test_heartbeat_interval_is_a_third_capped(timeout, interval):
    assert plan.heartbeat_interval(timeout) == interval


def test_heartbeat_interval_override_never_above_half_the_timeout():
    assert plan.heartbeat_interval(30, override=100) == 15.0
    assert plan.heartbeat_interval(30, override=4) == 4.0


@pytest.mark.parametrize(
    "timeout,expected", [(30, 3000.0), (600, 60000.0), (1728, 172800.0), (3600, 172800.0)]
)
def test_global_timeout_is_100_heartbeat_timeouts_at_most_48h(timeout, expected):
    assert plan.global_timeout(timeout) == expected


def test_plan_termination_stops_before_the_global_timeout():
    p = plan.plan_termination(1000.0, 30, complete_margin=60, poll_interval=5)
    assert p.global_deadline == 1000.0 - 5 + 3000
    assert p.heartbeat_stop_at == p.global_deadline - 60
    assert p.drain_deadline == p.heartbeat_stop_at
    # the margin is at least two heartbeat intervals
    p = plan.plan_termination(0.0, 3600, complete_margin=10, poll_interval=5)
    assert p.global_deadline - p.heartbeat_stop_at == 600
    # max_wait shortens, never extends
    assert plan.plan_termination(0.0, 30, 60, 5, max_wait=100).heartbeat_stop_at == 100
    assert plan.plan_termination(0.0, 30, 60, 5, max_wait=10**6).heartbeat_stop_at == 2935
    # a resumed plan keeps the original start
    assert plan.plan_termination(500.0, 30, 60, 5, wait_started=0.0).global_deadline == 2995


def test_heartbeat_due_first_at_once_then_every_interval_with_retries():
    kw = {"interval": 10.0, "retry_delay": 2.5, "stop_at": 100.0, "started": 0.0}
    assert plan.heartbeat_due(0.0, None, None, **kw)
    # the first attempt failed: retried 2.5 s later, not before
    assert not plan.heartbeat_due(1.0, None, 0.0, **kw)
    assert plan.heartbeat_due(2.5, None, 0.0, **kw)
    # success at 3: next at 13
    assert not plan.heartbeat_due(12.9, 3.0, 3.0, **kw)
    assert plan.heartbeat_due(13.0, 3.0, 3.0, **kw)
    # failed at 13: retry at 15.5
    assert not plan.heartbeat_due(15.0, 3.0, 13.0, **kw)
    assert plan.heartbeat_due(15.5, 3.0, 13.0, **kw)
    # none at or after the stop time
    assert not plan.heartbeat_due(100.0, 85.0, 85.0, **kw)


@settings(max_examples=200, deadline=None)
@given(
    timeout=st.integers(min_value=30, max_value=7200),
    failures=st.sets(st.integers(min_value=0, max_value=400), max_size=40),
)
def test_simulated_hold_never_lets_the_hook_time_out(timeout, failures):
    """Step virtual time; some attempts fail. No success gap reaches HeartbeatTimeout while
    failures are isolated, and nothing is sent after the stop time."""
    p = plan.plan_termination(0.0, timeout, 60, 5)
    delay = plan.retry_delay(p.heartbeat_interval)
    last_ok = None
    last_try = None
    oks = []
    attempt = 0
    t = 0.0
    step = max(0.5, p.heartbeat_interval / 20)
    horizon = min(p.heartbeat_stop_at + 50, 200 * p.heartbeat_interval)
    while t < horizon:
        if plan.heartbeat_due(
            t, last_ok, last_try, p.heartbeat_interval, delay, p.heartbeat_stop_at, p.wait_started
        ):
            assert t < p.heartbeat_stop_at
            last_try = t
            # never two failures in a row: that is what the third-of-the-timeout rule covers
            if attempt in failures and (attempt - 1) not in failures:
                pass
            else:
                last_ok = t
                oks.append(t)
            attempt += 1
        t += step
    gaps = [b - a for a, b in zip(oks, oks[1:])]
    assert all(g < timeout for g in gaps)
    assert p.heartbeat_stop_at < p.global_deadline


# -- events ----------------------------------------------------------------------------------


def test_classify_orders_spot_first_and_ignores_rebalance_by_default():
    spot = {"action": "terminate", "time": "2026-11-21T10:00:00Z"}
    evs = plan.classify("Terminated", spot, {"noticeTime": "x"}, "ignore")
    assert [e.kind for e in evs] == ["spot", "terminate"]
    evs = plan.classify("InService", None, {"noticeTime": "x"}, "stop-consuming")
    assert [(e.kind, e.key) for e in evs] == [("rebalance", "rebalance:x")]
    assert plan.classify("Warmed:Stopped", None, None)[0].kind == "warmed"
    assert plan.classify("InService", None, None) == []
    assert plan.classify(None, None, None) == []


def test_next_event_one_at_a_time_and_deduplicated_by_content():
    a = plan.Event("terminate", "target:Terminated")
    b = plan.Event("spot", "spot:terminate:T1")
    assert plan.next_event([a], None, []) == a
    assert plan.next_event([a], None, ["target:Terminated"]) is None
    assert plan.next_event([b, a], b, []) is None  # something in progress
    assert plan.next_event([b], None, ["spot:terminate:T0"]) == b  # a new notice time is new
    assert plan.attaches_lifecycle_action(b, a)
    assert not plan.attaches_lifecycle_action(a, b)


def test_spot_deadline():
    now = plan.parse_time("2026-11-21T10:00:00Z")
    assert plan.spot_deadline("2026-11-21T10:02:00Z", 20, now) == now + 100
    assert plan.spot_deadline("2026-11-21T09:59:00Z", 20, now) == now  # already late
    assert plan.spot_deadline("garbled", 20, now) == now + 100  # treated as 2 min


def test_protection_decision():
    d = plan.protection_decision
    assert d(None, 2, None, 0.0, 300) == (True, None)
    assert d(True, 1, 50.0, 60.0, 300) == (None, None)
    assert d(True, 0, None, 100.0, 300) == (None, 100.0)  # idle starts now
    assert d(True, 0, 100.0, 399.0, 300) == (None, 100.0)
    assert d(True, 0, 100.0, 400.0, 300) == (False, 100.0)
    assert d(False, 0, 100.0, 1000.0, 300) == (None, 100.0)
    assert d(None, 0, 0.0, 300.0, 300) == (False, 0.0)  # unknown after a restart: cleared


# -- boot gate -------------------------------------------------------------------------------


def _cfg(tmp_path, **deploy):
    marker = tmp_path / "airflow" / ".deployed-revision"
    # the state dir too: the gate reads the worker's record (absent here: the marker rule)
    cfg = config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "deploy": {"first_revision_marker": str(marker), **deploy},
        }
    )
    return cfg, marker


def test_boot_gate_holds_a_fresh_worker_until_the_first_revision(tmp_path):
    cfg, marker = _cfg(tmp_path)
    assert boot_gate_holds(cfg, "worker")
    assert "ApplicationStart will start it" in boot_gate_reason(cfg, "worker")
    marker.parent.mkdir()
    marker.write_text("d-ABC123\n")
    assert not boot_gate_holds(cfg, "worker")
    assert boot_gate_reason(cfg, "worker") == "boot gate open"


def test_boot_gate_only_for_workers_and_only_when_on(tmp_path):
    cfg, _ = _cfg(tmp_path)
    assert not boot_gate_holds(cfg, "scheduler")
    assert not boot_gate_holds(cfg, "webserver")
    off, _ = _cfg(tmp_path, boot_gate=False)
    assert not boot_gate_holds(off, "worker")


def test_boot_gate_holds_in_a_warm_pool_even_with_a_revision(tmp_path):
    cfg, marker = _cfg(tmp_path)
    marker.parent.mkdir()
    marker.write_text("d-1\n")
    assert boot_gate_holds(cfg, "worker", "Warmed:Running")
    assert "warm pool" in boot_gate_reason(cfg, "worker", "Warmed:Running")
    assert not boot_gate_holds(cfg, "worker", "InService")


# -- exact events, state documents and timing edges (each kills a mutant `make mutate` found
# surviving; see docs/mutation.md) ------------------------------------------------------------


def test_classify_builds_each_event_exactly():
    spot = {"action": "stop", "time": "2026-11-21T10:00:00Z"}
    evs = plan.classify("Terminated", spot, {"noticeTime": "N"}, "stop-consuming")
    assert evs == [
        plan.Event(
            "spot", "spot:stop:2026-11-21T10:00:00Z", {"action": "stop", "time": spot["time"]}
        ),
        plan.Event("terminate", "target:Terminated", {"target_state": "Terminated"}),
        plan.Event("rebalance", "rebalance:N", {"notice_time": "N"}),
    ]
    assert plan.classify(" Warmed:Hibernated\n", None, None) == [
        plan.Event("warmed", "target:Warmed:Hibernated", {"target_state": "Warmed:Hibernated"})
    ]
    # missing times still make one well-formed event each
    assert plan.classify(None, {"action": "terminate"}, {"x": 1}, "drain") == [
        plan.Event("spot", "spot:terminate:", {"action": "terminate", "time": ""}),
        plan.Event("rebalance", "rebalance:", {"notice_time": ""}),
    ]
    # a Spot notice without an action is no reclaim; rebalance is ignored by default
    assert plan.classify("InService", {"time": "T"}, {"noticeTime": "N"}) == []


def test_events_survive_lifecycle_json():
    ev = plan.classify(None, {"action": "terminate", "time": "T"}, None)[0]
    doc = json.loads(json.dumps(ev.to_dict()))
    assert doc == {
        "kind": "spot",
        "key": "spot:terminate:T",
        "detail": {"action": "terminate", "time": "T"},
    }
    assert plan.Event.from_dict(doc) == ev
    assert plan.Event.from_dict({"kind": "terminate", "key": "k"}) == plan.Event("terminate", "k")
    assert plan.Event.from_dict({"kind": "terminate", "key": "k", "detail": None}).detail == {}


def test_only_a_termination_during_a_spot_drain_attaches():
    spot = plan.Event("spot", "s")
    term = plan.Event("terminate", "t")
    assert plan.attaches_lifecycle_action(spot, term)
    assert not plan.attaches_lifecycle_action(spot, spot)
    assert not plan.attaches_lifecycle_action(term, term)
    assert not plan.attaches_lifecycle_action(plan.Event("rebalance", "r"), term)


def test_termination_plan_document():
    p = plan.plan_termination(1000.0, 30, 60, 5, interval_override=4)
    assert p.to_dict() == {
        "heartbeat_timeout": 30,
        "heartbeat_interval": 4.0,
        "wait_started": 1000.0,
        "global_deadline": 3995.0,
        "heartbeat_stop_at": 3935.0,
        "drain_deadline": 3935.0,
    }


def test_a_success_resets_the_retry_pause():
    # after a success the next heartbeat is due one interval later, however long the retry
    # pause is (the successful attempt is not a failure to back off from)
    kw = {"interval": 10.0, "retry_delay": 20.0, "stop_at": 100.0, "started": 0.0}
    assert plan.heartbeat_due(13.0, 3.0, 3.0, **kw)
    assert not plan.heartbeat_due(14.0, 3.0, 13.0, **kw)  # that one failed: pause
    assert plan.heartbeat_due(33.0, 3.0, 13.0, **kw)


@pytest.mark.parametrize(
    "now, poll, heartbeat_at, sleep",
    [
        (0.0, 5.0, None, 5.0),
        (0.0, 5.0, 2.0, 2.0),
        (0.0, 5.0, 10.0, 5.0),
        (10.0, 5.0, 12.5, 2.5),
        (10.0, 5.0, 9.0, 0.05),  # overdue: a short sleep, never a busy loop or a negative one
        (0.0, 0.01, None, 0.05),
    ],
)
def test_next_wake(now, poll, heartbeat_at, sleep):
    assert plan.next_wake(now, poll, heartbeat_at) == sleep


@pytest.mark.parametrize("interval, delay", [(2.0, 1.0), (6.0, 1.5), (40.0, 10.0), (100.0, 15.0)])
def test_retry_delay_is_a_quarter_interval_within_1_and_15_s(interval, delay):
    assert plan.retry_delay(interval) == delay


def test_times_without_a_zone_are_utc_whatever_the_machines_zone(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "EST5")  # POSIX form: needs no tzdata
    time.tzset()
    try:
        assert plan.parse_time("2026-11-21T10:00:00") == 1795255200.0
        assert plan.parse_time(" 2026-11-21T10:00:00Z\n") == 1795255200.0
        assert plan.parse_time("2026-11-21T12:00:00+02:00") == 1795255200.0
        # IMDS writes an upper-case Z; anything else is garbled on every Python alike
        # (spot_deadline then assumes AWS's two minutes)
        with pytest.raises(ValueError):
            plan.parse_time("2026-11-21T10:00:00z")
    finally:
        monkeypatch.undo()
        time.tzset()
