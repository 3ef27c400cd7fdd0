"""The global-timeout path of the real lifecycle Watcher, driven by a virtual clock against the
real rig (moto Auto Scaling with a real hook, the strict IMDSv2 server): a 50-minute hold runs in
seconds, which is the only way to see "stops heartbeating before the global timeout".

(Moved from tests/test_lifecycle_plan.py, which keeps only the pure core's tests.)
"""

from __future__ import annotations

import json
import logging
import threading

import pytest

from agent.config import config_from_dict
from agent.jobs.lifecycle import plan
from agent.jobs.lifecycle.watch import LifecycleAws, Watcher
from agent.platform.aws import AwsClients
from agent.platform.imds import ImdsClient
from agent.state import StateStore
from sandbox.lifecycle import make_asg

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


def _watcher(cfg, imds_client, clock, drain_fn):
    """A Watcher on virtual time with a recording Auto Scaling client and the given drain."""
    lc_aws = _RecordingAws(cfg, AwsClients(cfg, imds_client), imds_client, clock=clock)
    watcher = Watcher(
        cfg,
        imds_client,
        lc_aws,
        StateStore(cfg.state_dir),
        drain_fn=drain_fn,
        active_tasks_fn=lambda: [],
        clock=clock,
    )
    return watcher, lc_aws


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
    release = threading.Event()
    deadlines = []

    def endless_drain(cfg, deadline, on_progress):  # tasks that never finish
        deadlines.append(deadline)
        on_progress({"phase": "waiting", "active": 1, "message": "1 running"})
        release.wait(60)

    watcher, lc_aws = _watcher(cfg, imds_client, clock, endless_drain)
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
    finish = threading.Event()
    deadlines = []
    flags = []

    def drain(cfg, deadline, on_progress):
        from agent.worker.state import WorkerDoc

        deadlines.append(deadline)
        # the worker's record says terminating before the drain begins: nothing restarts it
        flags.append(StateStore(cfg.state_dir).read(WorkerDoc).terminating)
        finish.wait(30)
        return {"outcome": "drained"}

    watcher, lc_aws = _watcher(cfg, imds_client, clock, drain)
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
    assert flags == ["spot"]  # the Spot cause stays; the termination wait adds nothing


# -- malformed IMDS answers: each fact read on its own ----------------------------------------

SPOT_PATH = "meta-data/spot/instance-action"
TARGET_PATH = "meta-data/autoscaling/target-lifecycle-state"


def _fault_watcher(aws, imds, tmp_path, clock, drains):
    make_asg(aws, imds, "drain", "workers", heartbeat_timeout=30)
    cfg = config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "lifecycle": {"hook_name": "drain", "poll_interval": 5.0, "spot_margin": 20.0},
        }
    )
    # the client's own retry pauses are real sleeps: none on virtual time
    imds_client = ImdsClient(endpoint=imds.url, attempts=2, sleep=lambda s: None)

    def drain(cfg, deadline, on_progress):  # the worker is idle: the drain ends at once
        drains.append(deadline)
        return {"outcome": "drained"}

    watcher, lc_aws = _watcher(cfg, imds_client, clock, drain)
    return watcher, lc_aws


def _run_until_done(watcher, clock, passes=20):
    from sandbox.proc import wait_for

    for _ in range(passes):
        watcher.step()
        if watcher.runner is not None:
            wait_for(lambda: watcher.runner.snapshot()[1], 10, "the drain thread to return")
        if watcher.state.get("phase") == "done":
            return
        clock.t += 5.0


@pytest.mark.parametrize("fault", ["bad-json", "truncated", "bad-status-line", "reset"])
def test_termination_is_seen_while_the_spot_notice_is_malformed(aws, imds, tmp_path, caplog, fault):
    clock = _Clock(1_800_000_000.0)
    drains = []
    watcher, lc_aws = _fault_watcher(aws, imds, tmp_path, clock, drains)
    if fault == "bad-json":
        imds.set_paths({SPOT_PATH: '{"action": "terminate", "time": '})
    else:
        imds.fault(SPOT_PATH, fault)
    imds.set_paths({TARGET_PATH: "Terminated"})
    caplog.set_level(logging.INFO, logger="agent")
    _run_until_done(watcher, clock)
    for _ in range(5):  # the malformed answer goes on: still named once, nothing else starts
        clock.t += 5.0
        watcher.step()

    assert watcher.state["event"]["kind"] == "terminate"
    assert watcher.state["phase"] == "done"
    assert len(lc_aws.complete_times) == 1 and len(drains) == 1
    assert watcher.state["lifecycle_action"]["result"] == "CONTINUE"
    errors = watcher.state["poll_errors"]
    assert list(errors) == [SPOT_PATH] and SPOT_PATH in errors[SPOT_PATH]
    named = [r for r in caplog.records if SPOT_PATH in r.getMessage() and "unreadable" in r.msg]
    assert len(named) == 1, [r.getMessage() for r in named]
    assert named[0].levelno == logging.WARNING
    assert watcher.state["last_pass_error"] is None
    # the path recovers: said once, and the error is gone from the record
    imds.fault(SPOT_PATH, None)
    imds.set_paths({SPOT_PATH: None})
    clock.t += 5.0
    watcher.step()
    assert watcher.state["poll_errors"] is None
    assert any(f"IMDS {SPOT_PATH} readable again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fault", ["truncated", "bad-status-line", "garbage"])
def test_spot_notice_is_seen_while_the_lifecycle_state_is_broken(
    aws, imds, tmp_path, caplog, fault
):
    clock = _Clock(plan.parse_time("2027-01-15T08:00:00Z"))
    drains = []
    watcher, lc_aws = _fault_watcher(aws, imds, tmp_path, clock, drains)
    if fault == "garbage":
        imds.fault(TARGET_PATH, "raw", raw="\x00\x01 not http at all\r\n\r\n")
    else:
        imds.fault(TARGET_PATH, fault)
    notice = "2027-01-15T08:02:00Z"
    imds.set_paths({SPOT_PATH: json.dumps({"action": "terminate", "time": notice})})
    caplog.set_level(logging.INFO, logger="agent")
    _run_until_done(watcher, clock)

    assert watcher.state["event"]["kind"] == "spot"
    assert drains == [plan.parse_time(notice) - 20]
    assert watcher.state["phase"] == "done"
    assert list(watcher.state["poll_errors"]) == [TARGET_PATH]
    # an unknown target state is not a change of state: nothing handled is forgotten
    assert watcher.state["target_lifecycle_state"] is None
    assert lc_aws.complete_times == []  # no hook wait was seen, nothing to complete
    named = [r for r in caplog.records if TARGET_PATH in r.getMessage()]
    assert len(named) == 1 and "unreadable" in named[0].getMessage()
