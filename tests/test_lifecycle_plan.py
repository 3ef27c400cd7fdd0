"""The lifecycle watch's pure core (agent/jobs/lifecycle/plan.py) and the boot gate, plus the
global-timeout path of the real Watcher driven by a virtual clock against the real rig
(moto Auto Scaling with a real hook, the strict IMDSv2 server): a 50-minute hold runs in
seconds, which is the only way to see "stops heartbeating before the global timeout".
"""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import config_from_dict
from agent.jobs.lifecycle import plan
from agent.jobs.lifecycle.watch import LifecycleAws, Watcher
from agent.platform.aws import AwsClients
from agent.platform.imds import ImdsClient
from agent.state import StateStore
from agent.worker.boot_gate import boot_gate_holds, boot_gate_reason
from sandbox.lifecycle import make_asg

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
    return config_from_dict({"deploy": {"first_revision_marker": str(marker), **deploy}}), marker


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


# -- the real Watcher through a 50-minute hold, on a virtual clock ----------------------------


class _Clock:
    def __init__(self, start: float):
        self.t = start

    def __call__(self) -> float:
        return self.t


class _RecordingAws(LifecycleAws):
    def __init__(self, *a, clock, **kw):
        super().__init__(*a, **kw)
        self.clock = clock
        self.heartbeat_times = []
        self.complete_times = []

    def heartbeat(self, hook):
        super().heartbeat(hook)
        self.heartbeat_times.append(self.clock())

    def complete(self, hook):
        super().complete(hook)
        self.complete_times.append(self.clock())


def test_drain_longer_than_the_global_timeout_stops_heartbeats_and_completes(aws, imds, tmp_path):
    make_asg(aws, imds, "drain", "workers", heartbeat_timeout=30)
    # hook_name unset: the group's only termination hook is found through DescribeLifecycleHooks
    cfg = config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "lifecycle": {"poll_interval": 5.0, "complete_margin": 60.0},
        }
    )
    clock = _Clock(1_800_000_000.0)
    imds_client = ImdsClient.from_config(cfg)
    lc_aws = _RecordingAws(cfg, AwsClients(cfg, imds_client), imds_client, clock=clock)
    release = threading.Event()
    deadlines = []

    def endless_drain(cfg, deadline, on_progress):  # tasks that never finish
        deadlines.append(deadline)
        on_progress({"phase": "waiting", "active": 1, "message": "1 running"})
        release.wait(60)

    watcher = Watcher(
        cfg,
        imds_client,
        lc_aws,
        StateStore(cfg.state_dir),
        drain_fn=endless_drain,
        active_tasks_fn=lambda: [],
        clock=clock,
    )
    start = clock.t
    watcher.tick()  # InService
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Terminated"})
    try:
        while clock.t < start + 3200:
            watcher.tick()
            clock.t += 5.0
        for _ in range(10):  # the drain keeps running; nothing more is sent
            watcher.tick()
            clock.t += 5.0
    finally:
        release.set()

    action = watcher.state["lifecycle_action"]
    p = action["plan"]
    seen = start + 5  # the next poll after InService
    assert p["global_deadline"] == seen - 5 + 3000
    assert p["heartbeat_stop_at"] == p["global_deadline"] - 60
    assert deadlines == [p["heartbeat_stop_at"]]
    hb = lc_aws.heartbeat_times
    assert hb[0] == seen
    assert all(b - a == 10.0 for a, b in zip(hb, hb[1:]))
    assert hb[-1] < p["heartbeat_stop_at"] <= hb[-1] + 10
    assert len(hb) == len(aws.calls("RecordLifecycleActionHeartbeat")) == action["heartbeats_sent"]
    # completed once, after heartbeats stopped and before Auto Scaling's global timeout
    assert len(lc_aws.complete_times) == 1
    assert p["heartbeat_stop_at"] <= lc_aws.complete_times[0] < p["global_deadline"]
    done = [a for a in aws.lifecycle_actions() if a["action"] == "CompleteLifecycleAction"]
    assert len(done) == 1 and done[0]["params"]["LifecycleActionResult"] == "CONTINUE"
    assert done[0]["params"]["LifecycleHookName"] == "drain"
    assert action["completed"] is True


def test_termination_during_a_spot_drain_is_heartbeated_and_completed_once(aws, imds, tmp_path):
    from sandbox.proc import wait_for

    make_asg(aws, imds, "drain", "workers", heartbeat_timeout=30)
    cfg = config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "lifecycle": {"hook_name": "drain", "poll_interval": 5.0, "spot_margin": 20.0},
        }
    )
    clock = _Clock(1_800_000_000.0)
    imds_client = ImdsClient.from_config(cfg)
    lc_aws = _RecordingAws(cfg, AwsClients(cfg, imds_client), imds_client, clock=clock)
    finish = threading.Event()
    deadlines = []

    def drain(cfg, deadline, on_progress):
        deadlines.append(deadline)
        finish.wait(30)
        return {"outcome": "drained"}

    watcher = Watcher(
        cfg,
        imds_client,
        lc_aws,
        StateStore(cfg.state_dir),
        drain_fn=drain,
        active_tasks_fn=lambda: [],
        clock=clock,
    )
    notice = "2027-01-15T08:01:00Z"  # 60 s after the virtual start
    clock.t = plan.parse_time("2027-01-15T08:00:00Z")
    imds.set_paths(
        {"meta-data/spot/instance-action": json.dumps({"action": "terminate", "time": notice})}
    )
    watcher.tick()
    assert watcher.state["event"]["kind"] == "spot"
    assert deadlines == [plan.parse_time(notice) - 20]
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Terminated"})
    for _ in range(5):
        clock.t += 5.0
        watcher.tick()
    assert watcher.state["event"]["kind"] == "spot"  # still the one event
    assert len(lc_aws.heartbeat_times) == 3  # at once, +10 s, +20 s
    assert lc_aws.complete_times == []
    finish.set()
    wait_for(lambda: watcher.runner.snapshot()[1], 10, "the drain thread to return")
    for _ in range(3):
        clock.t += 5.0
        watcher.tick()
    assert len(lc_aws.complete_times) == 1
    assert watcher.state["phase"] == "done"
    assert watcher.state["lifecycle_action"]["result"] == "CONTINUE"
    assert deadlines == [plan.parse_time(notice) - 20]  # no second drain
