"""`airflow-agent lifecycle watch` end to end: real IMDSv2 server, moto Auto Scaling (real
group, launch template and lifecycle hook; the rig answers heartbeat/complete), real Redis, a
real Celery worker, the real drain (jobs/drain/drainer.py). systemctl is sandbox/lifecycle's PID
stand-in (the drain's stop of `airflow-worker` sends the warm-shutdown SIGTERM).

Times are compressed through config: HeartbeatTimeout 6 s -> a heartbeat every 2 s (the
HeartbeatTimeout/3 rule), IMDS polled every 0.5 s.

Wall-clock tolerances are kept to what only real time proves (the hook never lapses: no gap of
HeartbeatTimeout; nothing is sent early or after completing; the order of heartbeats, tasks and
completion). The schedule itself (first heartbeat at once, one per interval, a failed one
retried a quarter interval later) is proven on virtual time in tests/test_lifecycle_plan.py
(`test_heartbeat_due_first_at_once_then_every_interval_with_retries`,
`test_simulated_hold_never_lets_the_hook_time_out`) and tests/test_lifecycle_watcher.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.lifecycle import (
    FAKE_SYSTEMCTL,
    QUEUE,
    CeleryWorker,
    make_asg,
    wait_until,
)
from sandbox.proc import end_process
from sandbox.redis_server import RedisServer
from tests.conftest import REPO_ROOT

HOOK = "drain-on-terminate"
GROUP = "airflow-workers"
HB_TIMEOUT = 6
INTERVAL = HB_TIMEOUT / 3


@pytest.fixture(scope="module")
def redis():
    r = RedisServer().start()
    yield r
    r.stop()


@pytest.fixture
def asg(aws, imds):
    """A real group with one instance and a termination hook; IMDS speaks for that instance."""
    return make_asg(aws, imds, HOOK, GROUP, HB_TIMEOUT)


@pytest.fixture
def worker(redis, tmp_path):
    node = f"lc{int(time.time() * 1000) % 10**8}@testhost"
    w = CeleryWorker(redis.url, node, tmp_path / "marks", tmp_path / "worker.log")
    redis.cli("DEL", QUEUE)
    yield w
    w.stop()


class Watch:
    """The daemon as a subprocess, its config, its state and its log."""

    def __init__(self, tmp_path: Path, config: Path, env):
        self.tmp = tmp_path
        self.config = config
        self.env = env
        self.proc = None
        self.log_path = tmp_path / "watch.log"
        self.state_path = tmp_path / "state" / "lifecycle.json"
        self.systemctl_log = tmp_path / "systemctl.log"

    def start(self) -> Watch:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(self.config), "lifecycle", "watch"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=str(REPO_ROOT),
            )
        wait_until(
            lambda: self._alive() and self.state().get("last_poll"), 30, "the watch's first poll"
        )
        return self

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"watch exited {self.proc.returncode}: {self.log()[-3000:]}")
        return True

    def state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def action(self) -> dict:
        return self.state().get("lifecycle_action") or {}

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        end_process(self.proc, grace=15)


@pytest.fixture
def watch_factory(tmp_path, make_config, agent_env, redis):
    made = []

    def make(worker=None, overrides=None) -> Watch:
        pidfile = tmp_path / "worker.pid"
        pidfile.write_text(str(worker.pid) if worker and worker.proc else "0")
        env_file = tmp_path / "sysconfig" / "airflow.env"
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.write_text(f"AIRFLOW__CELERY__BROKER_URL={redis.url}\n")
        base = {
            "systemctl": [
                sys.executable,
                str(FAKE_SYSTEMCTL),
                "--pidfile",
                str(pidfile),
                "--log",
                str(tmp_path / "systemctl.log"),
            ],
            "drain": {
                "node_name": worker.node if worker else "none@testhost",
                "poll_interval": 0.5,
                "on_deadline": "fail",
                "reply_timeout": 10.0,
            },
            "lifecycle": {"hook_name": HOOK, "poll_interval": 0.5, "spot_margin": 4.0},
            "aws": {"max_attempts": 3},
        }
        for k, v in (overrides or {}).items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
        w = Watch(tmp_path, make_config(base), agent_env)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def after_polls(watch: Watch, n: int) -> None:
    """Wait until the watch has polled IMDS `n` more times (poll_interval 0.5 s)."""
    since = time.time()
    wait_until(
        lambda: watch.state().get("last_poll", 0) > since + 0.5 * (n - 1), 15, f"{n} more polls"
    )


def heartbeats(aws):
    return [a for a in aws.lifecycle_actions() if a["action"] == "RecordLifecycleActionHeartbeat"]


def completes(aws):
    return [a for a in aws.lifecycle_actions() if a["action"] == "CompleteLifecycleAction"]


def start_two_tasks(worker, seconds: float, extra: int = 1):
    """Two running tasks (both slots busy) and `extra` waiting in Redis."""
    worker.start()
    worker.send("t1", seconds)
    worker.send("t2", seconds)
    wait_until(
        lambda: worker.marks("t1", "start") and worker.marks("t2", "start"),
        20,
        "both tasks to start",
    )
    for i in range(extra):
        worker.send(f"queued{i}", 1)


def test_terminated_drains_heartbeats_and_completes_once(
    aws, imds, asg, worker, watch_factory, redis
):
    start_two_tasks(worker, seconds=7)
    watch = watch_factory(worker).start()
    t0 = time.time()
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Terminated"})
    wait_until(lambda: watch.state().get("phase") == "done", 60, "the termination to finish")

    hbs, done = heartbeats(aws), completes(aws)
    assert len(done) == 1, done
    assert done[0]["params"]["LifecycleActionResult"] == "CONTINUE"
    assert done[0]["params"]["LifecycleHookName"] == HOOK
    assert done[0]["params"]["AutoScalingGroupName"] == GROUP
    assert done[0]["params"]["InstanceId"] == asg["instance_id"]
    finished = worker.marks("t1", "end") + worker.marks("t2", "end")
    assert len(finished) == 2
    # completed only after the last task finished (and the worker was stopped)
    assert done[0]["time"] > max(finished)
    assert not worker.alive()
    # heartbeats: the first at once (while both tasks still run), then never early and never a
    # gap the hook would lapse in, up to the completion and none after it (the schedule's
    # exact times: virtual-clock tests, module docstring)
    assert len(hbs) >= 3, hbs
    assert t0 < hbs[0]["time"] < min(finished) and hbs[0]["time"] - t0 < HB_TIMEOUT
    gaps = [b["time"] - a["time"] for a, b in zip(hbs, hbs[1:])]
    assert all(INTERVAL - 0.3 <= g < HB_TIMEOUT for g in gaps), gaps
    assert all(h["time"] < done[0]["time"] for h in hbs)
    assert done[0]["time"] - hbs[-1]["time"] < HB_TIMEOUT  # the hook never lapsed
    # no task lost or run twice: each ran once, the waiting one is still in Redis
    for tag in ("t1", "t2"):
        assert len(worker.marks(tag, "start")) == 1 and len(worker.marks(tag, "end")) == 1
    assert worker.marks("queued0", "start") == []
    assert redis.llen(QUEUE) == 1
    # status fields for `airflow-agent status`
    st = watch.state()
    assert st["event"]["kind"] == "terminate"
    assert st["lifecycle_action"]["heartbeats_sent"] == len(hbs)
    assert st["lifecycle_action"]["completed"] is True
    assert st["lifecycle_action"]["plan"]["heartbeat_interval"] == INTERVAL
    assert st["drain"]["status"] == "done"
    # and it stays done: the Terminated state is still there, nothing is sent again
    after_polls(watch, 3)
    assert len(completes(aws)) == 1 and len(heartbeats(aws)) == len(hbs)


def test_throttled_heartbeat_and_complete_are_retried(aws, imds, asg, worker, watch_factory):
    # AWS's smallest HeartbeatTimeout (30 s -> a heartbeat every 10 s): botocore's backoff
    # between throttled attempts (up to 2 s, then 4 s) is real time and cannot be compressed
    asg["client"].put_lifecycle_hook(
        LifecycleHookName=HOOK,
        AutoScalingGroupName=GROUP,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=30,
        DefaultResult="CONTINUE",
    )
    start_two_tasks(worker, seconds=10, extra=0)
    watch = watch_factory(worker).start()
    # 3 attempts per call (aws.max_attempts): 5 throttles exhaust the first call's botocore
    # retries; our own retry (a quarter interval later) then gets through
    aws.inject("RecordLifecycleActionHeartbeat", "Throttling", 5)
    aws.inject("CompleteLifecycleAction", "Throttling", 4)
    t0 = time.time()
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Terminated"})
    wait_until(lambda: watch.state().get("phase") == "done", 90, "the termination to finish")

    hbs, done = heartbeats(aws), completes(aws)
    assert len(done) == 1 and done[0]["params"]["LifecycleActionResult"] == "CONTINUE"
    assert len(aws.calls("CompleteLifecycleAction")) == 5
    assert len(aws.calls("RecordLifecycleActionHeartbeat")) == len(hbs) + 5
    action = watch.action()
    assert action["plan"]["heartbeat_interval"] == 10.0
    assert action["heartbeat_failures"] == 1
    assert action["complete_attempts"] == 2
    assert len(hbs) >= 1
    # our retry came a quarter interval (2.5 s) after botocore gave up, not before, and before
    # the next planned heartbeat (the exact 2.5 s: the virtual-clock schedule test); the first
    # success, after botocore's real backoffs, well within the timeout
    tries = [c["time"] for c in aws.calls("RecordLifecycleActionHeartbeat")]
    assert 2.5 <= tries[3] - tries[2] < 10.0, tries
    assert hbs[0]["time"] - t0 < 20.0
    gaps = [b["time"] - a["time"] for a, b in zip(hbs, hbs[1:])]
    assert all(g < 30 for g in gaps), gaps
    assert done[0]["time"] - hbs[-1]["time"] < 30  # the wait never lapsed
    assert "heartbeat failed (Throttling" in watch.log()
    assert "CompleteLifecycleAction failed (Throttling" in watch.log()


# shaped like an Airflow 3 execution-API token (a JWT): must never leave the worker's memory
TOKEN = (
    "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiJ0aS0xIiwic2NvcGUiOiJ3b3JrbG9hZCJ9"
    ".c2VjcmV0LXNpZ25hdHVyZS1vZi10aGUtdGFzaw"
)


def scan_for_token(watch: Watch, config: Path, env) -> list:
    """Every place the agent writes or prints that holds TOKEN (or its signature)."""
    found = []
    needles = (TOKEN, TOKEN.split(".")[2])
    if any(n in watch.log() for n in needles):
        found.append("the daemon's log")
    for path in sorted((watch.tmp / "state").rglob("*")):
        if path.is_file() and any(n.encode() in path.read_bytes() for n in needles):
            found.append(str(path))
    for args in (["status", "--json"], ["status"]):
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(config), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(REPO_ROOT),
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        if any(n in proc.stdout + proc.stderr for n in needles):
            found.append(" ".join(args))
    return found


def test_spot_notice_drain_deadline_reports_unfinished_task(aws, imds, asg, worker, watch_factory):
    worker.start()
    worker.send("short", 1.5)
    # the task's argument carries a token, as Airflow 3's execute_workload argument does
    long_id = worker.client.send_task("record", args=[f"long-{TOKEN}", 40], queue=QUEUE).id
    wait_until(lambda: worker.marks(f"long-{TOKEN}", "start"), 20, "the long task to start")
    watch = watch_factory(worker).start()
    notice = time.time() + 10  # the reclaim, compressed from 120 s; margin 4 s -> drain 6 s
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(notice))
    imds.set_paths(
        {"meta-data/spot/instance-action": json.dumps({"action": "terminate", "time": when})}
    )
    wait_until(lambda: watch.state().get("phase") == "done", 30, "the Spot drain to end")

    drain = watch.state()["drain"]
    deadline = int(notice) - 4.0  # the notice time has whole seconds
    assert drain["deadline"] == pytest.approx(deadline, abs=0.01)
    assert drain["status"] == "deadline"
    # ended at its deadline, not before and not long after
    assert deadline <= drain["finished_at"] < deadline + 3.0
    # the unfinished task is named by its Celery name and id, never by its arguments
    assert [(t["name"], t["id"]) for t in drain["unfinished_tasks"]] == [("record", long_id)]
    assert all("args" not in t and "kwargs" not in t for t in drain["unfinished_tasks"])
    assert f"record[{long_id}]" in watch.log() and "Airflow will retry" in watch.log()
    assert len(worker.marks("short", "end")) == 1
    assert worker.marks(f"long-{TOKEN}", "end") == []
    assert completes(aws) == [] and heartbeats(aws) == []  # no hook wait, nothing to complete
    # no token in the log, any state file, or `status`
    assert scan_for_token(watch, watch.config, watch.env) == []
    worker.stop(cold=True)  # the reclaim: the long task dies here and Airflow retries it


def test_restart_mid_drain_resumes_heartbeats_and_completes_once(
    aws, imds, asg, worker, watch_factory
):
    start_two_tasks(worker, seconds=9, extra=0)
    watch = watch_factory(worker).start()
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Terminated"})
    wait_until(lambda: watch.action().get("heartbeats_sent", 0) >= 2, 20, "two heartbeats")
    watch.kill()  # SIGKILL: no chance to tidy up
    killed_at = time.time()
    before = len(heartbeats(aws))
    watch.start()
    wait_until(lambda: watch.state().get("phase") == "done", 60, "the resumed drain to end")

    hbs, done = heartbeats(aws), completes(aws)
    assert len(done) == 1
    after = [h for h in hbs if h["time"] > killed_at]
    assert len(after) >= 1 and len(hbs) > before
    gaps = [b["time"] - a["time"] for a, b in zip(hbs, hbs[1:])]
    assert all(g < HB_TIMEOUT for g in gaps), gaps
    assert watch.action()["heartbeats_sent"] == len(hbs)  # the count survived the restart
    assert "resuming the drain" in watch.log()
    finished = worker.marks("t1", "end") + worker.marks("t2", "end")
    assert len(finished) == 2 and done[0]["time"] > max(finished)
    for tag in ("t1", "t2"):
        assert len(worker.marks(tag, "start")) == 1


def test_imds_token_expiry_mid_watch_misses_no_event(aws, imds, asg, watch_factory):
    watch = watch_factory(None).start()  # the worker is stopped: the drain ends at once
    for _ in range(3):
        imds.expire_tokens()
        polls = watch.state()["last_poll"]
        wait_until(lambda p=polls: watch.state()["last_poll"] > p, 10, "a poll after expiry")
    imds.expire_tokens()
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Terminated"})
    wait_until(lambda: watch.state().get("phase") == "done", 30, "the termination to finish")
    assert len(completes(aws)) == 1
    log = imds.log()
    unauthorized = [e for e in log if e["status"] == 401]
    assert len(unauthorized) >= 4
    # every 401 was followed by a fresh token and a successful read
    puts = [e for e in log if e["method"] == "PUT"]
    assert len(puts) >= 5
    assert "IMDS poll failed" not in watch.log()


def test_warmed_instance_never_starts_the_worker(aws, imds, asg, watch_factory, tmp_path):
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Warmed:Running"})
    watch = watch_factory(None).start()  # launched into the pool: the boot gate held the worker
    wait_until(lambda: watch.state().get("phase") == "done", 15, "the warm-pool event")
    assert watch.state()["event"]["kind"] == "warmed"
    after_polls(watch, 3)
    calls = (tmp_path / "systemctl.log").read_text().splitlines()
    assert calls and not [c for c in calls if c.split()[0] in ("start", "restart")], calls
    assert completes(aws) == [] and heartbeats(aws) == []


def test_return_to_warm_pool_drains_the_running_worker(aws, imds, asg, worker, watch_factory):
    worker.start()
    worker.send("w1", 3)
    wait_until(lambda: worker.marks("w1", "start"), 20, "the task to start")
    watch = watch_factory(worker).start()
    # scale-in with ReuseOnScaleIn: no termination hook, the instance is stopped into the pool
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Warmed:Stopped"})
    wait_until(lambda: watch.state().get("phase") == "done", 30, "the drain")
    assert not worker.alive()
    assert len(worker.marks("w1", "start")) == 1 and len(worker.marks("w1", "end")) == 1
    assert watch.state()["drain"]["status"] == "done"
    assert completes(aws) == []


def test_rebalance_stop_consuming_keeps_tasks_running(aws, imds, asg, worker, watch_factory):
    worker.start()
    worker.send("r1", 4)
    wait_until(lambda: worker.marks("r1", "start"), 20, "the task to start")
    watch = watch_factory(worker, {"lifecycle": {"rebalance": "stop-consuming"}}).start()
    imds.set_paths(
        {
            "meta-data/events/recommendations/rebalance": json.dumps(
                {"noticeTime": "2026-11-21T10:00:00Z"}
            )
        }
    )
    wait_until(
        lambda: (watch.state().get("event") or {}).get("kind") == "rebalance",
        20,
        "the rebalance event",
    )
    insp = worker.client.control.inspect(destination=[worker.node], timeout=2)
    queues = insp.active_queues()[worker.node]
    assert queues == []
    worker.send("r2", 1)  # not consumed any more
    wait_until(lambda: worker.marks("r1", "end"), 20, "the running task to finish")
    assert worker.alive() and worker.marks("r2", "start") == []


def test_scale_in_protection_follows_the_worker(aws, imds, asg, worker, watch_factory):
    worker.start()
    watch = watch_factory(
        worker, {"lifecycle": {"scale_in_protection": True, "idle_before_unprotect": 2.0}}
    ).start()
    client, iid = asg["client"], asg["instance_id"]

    def protected():
        inst = client.describe_auto_scaling_instances(InstanceIds=[iid])["AutoScalingInstances"]
        return inst[0]["ProtectedFromScaleIn"]

    worker.send("p1", 4)
    wait_until(protected, 20, "protection while a task runs")
    assert worker.marks("p1", "end") == []
    wait_until(lambda: worker.marks("p1", "end"), 20, "the task to finish")
    done_at = worker.marks("p1", "end")[0]
    wait_until(lambda: not protected(), 20, "protection off when idle")
    assert time.time() - done_at >= 2.0
    assert watch.state()["protection"]["protected"] is False


# -- malformed IMDS answers: the daemon keeps running and still acts -------------------------

SPOT_PATH = "meta-data/spot/instance-action"
TARGET_PATH = "meta-data/autoscaling/target-lifecycle-state"


def test_daemon_survives_malformed_spot_answers_and_completes_the_termination(
    aws, imds, asg, watch_factory
):
    watch = watch_factory(None).start()  # the worker is stopped: the drain ends at once
    # every kind of broken answer on the Spot path, one after the other, each polled a few times
    imds.set_paths({SPOT_PATH: '{"action": "terminate", "time": '})
    after_polls(watch, 2)
    for fault in ("truncated", "bad-status-line", "reset"):
        imds.fault(SPOT_PATH, fault)
        after_polls(watch, 2)
    imds.set_paths({TARGET_PATH: "Terminated"})
    wait_until(lambda: watch.state().get("phase") == "done", 30, "the termination to finish")
    after_polls(watch, 3)

    assert watch.proc.poll() is None, watch.log()[-2000:]
    assert len(completes(aws)) == 1
    st = watch.state()
    assert st["event"]["kind"] == "terminate" and st["lifecycle_action"]["result"] == "CONTINUE"
    assert list(st["poll_errors"]) == [SPOT_PATH]
    log = watch.log()
    named = [line for line in log.splitlines() if f"IMDS {SPOT_PATH} unreadable" in line]
    # one line per distinct answer: bad JSON, IncompleteRead, BadStatusLine, RemoteDisconnected
    assert len(named) == 4, named
    assert "is not JSON" in named[0] and "IncompleteRead" in named[1]
    assert "BadStatusLine" in named[2] and "RemoteDisconnected" in named[3]
    assert "Traceback" not in log and "pass failed" not in log


def test_daemon_sees_a_spot_notice_while_the_lifecycle_state_answers_garbage(
    aws, imds, asg, watch_factory
):
    watch = watch_factory(None).start()
    imds.fault(TARGET_PATH, "bad-status-line")
    after_polls(watch, 2)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30))
    imds.set_paths({SPOT_PATH: json.dumps({"action": "terminate", "time": when})})
    wait_until(lambda: watch.state().get("phase") == "done", 30, "the Spot drain")

    assert watch.proc.poll() is None, watch.log()[-2000:]
    st = watch.state()
    assert st["event"]["kind"] == "spot" and st["drain"]["status"] == "done"
    assert list(st["poll_errors"]) == [TARGET_PATH]
    named = [ln for ln in watch.log().splitlines() if f"IMDS {TARGET_PATH} unreadable" in ln]
    assert len(named) == 1 and "BadStatusLine" in named[0], named
    imds.fault(TARGET_PATH, None)
    after_polls(watch, 2)
    assert watch.state()["poll_errors"] is None
    assert f"IMDS {TARGET_PATH} readable again" in watch.log()
