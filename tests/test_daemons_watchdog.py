"""Each daemon on the daemon runtime: WATCHDOG=1 stops when its loop hangs, and SIGTERM ends it
with STOPPING=1 and exit 0.

The real daemon classes (confapply's `Confapply`, lifecycle's `Watcher`, variables' `Watch`),
each with its real runtime reading a real NOTIFY_SOCKET (a unix datagram socket bound in the
test's directory) and WATCHDOG_USEC=400000 (WatchdogSec 0.4 s: pings every 0.1 s, a pass is
alive for 0.2 s after its last sign of life). The loop runs in the test's main thread, where
the SIGTERM handler runs; a second thread drives the scenario. The hang is made at each
daemon's own injection point: a dependency that blocks while its `Gate` is closed (systemd
answering `systemctl show` for confapply, IMDS for lifecycle, GetSecretValue for variables).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, List

import pytest

from agent.config import config_from_dict, load_config
from agent.jobs.confapply.daemon import Confapply
from agent.jobs.lifecycle.aws import LifecycleAws
from agent.jobs.lifecycle.watch import Watcher
from agent.jobs.variables.watch import Watch
from agent.platform.aws import AwsClients
from agent.platform.imds import ImdsClient
from agent.runtime.config_watch import EXIT_CONFIG_CHANGED
from agent.runtime.daemon import Daemon, DaemonRuntime
from agent.state import StateStore
from sandbox.notify_socket import NotifySocket
from sandbox.systemctl_standin import ActiveUnits

WATCHDOG_USEC = 400_000
BOUND = 0.2  # WatchdogSec/2: how long a pass counts as alive after its last sign of life


class Gate:
    """A dependency's way to hang: `wait()` blocks while the gate is closed."""

    def __init__(self):
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()

    def close(self) -> None:
        self.entered.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def wait(self) -> None:
        if not self._open.is_set():
            self.entered.set()
            self._open.wait(30)


@pytest.fixture
def notify(tmp_path_factory, monkeypatch):
    sock = NotifySocket(tmp_path_factory.mktemp("n"))
    monkeypatch.setenv("NOTIFY_SOCKET", sock.path)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield sock
    sock.close()


def run_hang_and_sigterm(
    rt: DaemonRuntime, daemon: Daemon, notify: NotifySocket, gate: Gate, hang: Callable[[], None]
) -> List[str]:
    """Run `daemon` in this thread; from another: READY, pings, `hang()` until the gate holds
    the loop, no pings while it does, pings again once it opens, then SIGTERM."""
    errors: List[BaseException] = []

    def scenario() -> None:
        notify.wait_for(lambda: notify.count("READY=1") == 1, 30, "READY=1")
        n = notify.count("WATCHDOG=1")
        notify.wait_for(lambda: notify.count("WATCHDOG=1") >= n + 3, 10, "pings while healthy")
        gate.close()
        hang()
        assert gate.entered.wait(10), "the loop never reached the blocking dependency"
        threading.Event().wait(BOUND + 0.3)
        quiet = notify.count("WATCHDOG=1")
        threading.Event().wait(1.0)  # ten ping intervals, five WatchdogSec
        assert notify.count("WATCHDOG=1") == quiet, "WATCHDOG=1 sent while the loop hung"
        gate.open()
        notify.wait_for(lambda: notify.count("WATCHDOG=1") > quiet, 10, "pings after the hang")

    def body() -> None:
        try:
            scenario()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
        finally:
            gate.open()
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the runtime in the main thread

    t = threading.Thread(target=body, name="scenario")
    t.start()
    try:
        rc = rt.run(daemon)
    finally:
        t.join(60)
    if errors:
        raise errors[0]
    assert rc == 0
    msgs = notify.drain()
    assert msgs[-1] == "STOPPING=1" and msgs.count("STOPPING=1") == 1
    assert rt.signal_received == signal.SIGTERM
    return msgs


# -- confapply -----------------------------------------------------------------------------------


class StandInSystemctl(ActiveUnits):
    """What confapply asks systemd, for units that are always active; `show`-based queries wait
    at the gate (a systemd that stopped answering)."""

    def __init__(self, gate: Gate):
        super().__init__()
        self.gate = gate

    def active_state(self, unit: str) -> str:
        self.gate.wait()
        return "active"


def test_confapply_watchdog_stops_when_its_loop_hangs_and_sigterm_sends_stopping(tmp_path, notify):
    env_file = tmp_path / "sysconfig" / "airflow.env"
    env_file.parent.mkdir()
    env_file.write_text("FOO=1\n")
    cfg = config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "env": {"file": str(env_file)},
            "confapply": {"debounce": 0.05, "max_wait": 0.5, "recheck_interval": 600},
        }
    )
    gate = Gate()
    systemctl = StandInSystemctl(gate)
    rt = DaemonRuntime("confapply", watchdog_fallback=cfg.confapply.watchdog_interval)
    assert rt.interval == WATCHDOG_USEC / 4e6
    daemon = Confapply(cfg, "scheduler", systemctl, rt)

    msgs = run_hang_and_sigterm(rt, daemon, notify, gate, lambda: env_file.write_text("FOO=2\n"))
    # after the hang the change was applied: every unit restarted once, in order
    assert systemctl.restarted == cfg.units_for("scheduler")
    assert any(m.startswith("STATUS=restarting ") for m in msgs)
    doc = json.loads((tmp_path / "state" / "confapply.json").read_text())
    assert doc["last_result"] == "ok" and doc["last_restarted"] == systemctl.restarted


# -- lifecycle watch ---------------------------------------------------------------------------


class GatedImds:
    """The real IMDSv2 client against the rig's IMDS server; the lifecycle state read waits at
    the gate (an IMDS that stopped answering)."""

    def __init__(self, real: ImdsClient, gate: Gate):
        self.real = real
        self.gate = gate

    def target_lifecycle_state(self):
        self.gate.wait()
        return self.real.target_lifecycle_state()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_lifecycle_watch_watchdog_stops_when_its_loop_hangs_and_sigterm_sends_stopping(
    tmp_path, notify, imds
):
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "InService"})
    cfg = config_from_dict(
        {"state_dir": str(tmp_path / "state"), "lifecycle": {"poll_interval": 0.05}}
    )
    gate = Gate()
    real = ImdsClient.from_config(cfg)
    gated = GatedImds(real, gate)
    store = StateStore(cfg.state_dir)
    watcher = Watcher(cfg, gated, LifecycleAws(cfg, AwsClients(cfg, real), real), store)
    rt = DaemonRuntime("lifecycle watch")

    msgs = run_hang_and_sigterm(rt, watcher, notify, gate, lambda: None)
    ready = next(m for m in msgs if m.startswith("READY=1"))
    assert ready == "READY=1\nSTATUS=idle; target state InService"
    doc = json.loads(Path(store.path("lifecycle")).read_text())
    assert doc["phase"] == "idle" and doc["target_lifecycle_state"] == "InService"


# -- variables watch ---------------------------------------------------------------------------


class GatedSecretsManager:
    """The real Secrets Manager client (the rig's moto); GetSecretValue waits at the gate."""

    def __init__(self, real: Any, gate: Gate):
        self.real = real
        self.gate = gate

    def get_secret_value(self, **kwargs: Any) -> Any:
        self.gate.wait()
        return self.real.get_secret_value(**kwargs)


def test_variables_watch_watchdog_stops_when_its_loop_hangs_and_sigterm_sends_stopping(
    tmp_path, notify, aws
):
    sm = aws.client("secretsmanager")
    sm.create_secret(Name="airflow/test/variables", SecretString="{}")
    env_file = tmp_path / "airflow.env"
    env_file.write_text("AIRFLOW_HOME=/nonexistent\n")
    cfg = config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "env": {"file": str(env_file)},
            # method cli with an empty secret: a sync needs no Airflow at all
            "variables": {"secret_id": "airflow/test/variables", "method": "cli", "user": None},
        }
    )
    gate = Gate()
    rt = DaemonRuntime("variables watch", watchdog_fallback=1.0)
    watch = Watch(cfg, 0.05, False, rt, GatedSecretsManager(sm, gate))

    msgs = run_hang_and_sigterm(rt, watch, notify, gate, lambda: None)
    ready = next(m for m in msgs if m.startswith("READY=1"))
    assert "STATUS=synced version " in ready
    doc = json.loads((tmp_path / "state" / "variables-watch.json").read_text())
    assert doc["polls"] >= 3 and doc["failures"] == 0


# -- agent.yaml changes ------------------------------------------------------------------------


def test_variables_watch_ends_with_the_restart_code_when_its_agent_yaml_changes(
    tmp_path, notify, aws
):
    """The real daemon class with a config loaded from a file: the runtime watches that file
    (variables watch is the daemon the systemd test does not start)."""
    sm = aws.client("secretsmanager")
    sm.create_secret(Name="airflow/test/variables-cfg", SecretString="{}")
    env_file = tmp_path / "airflow.env"
    env_file.write_text("AIRFLOW_HOME=/nonexistent\n")
    data = {
        "state_dir": str(tmp_path / "state"),
        "env": {"file": str(env_file)},
        "variables": {"secret_id": "airflow/test/variables-cfg", "method": "cli", "user": None},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(data))
    cfg = load_config(str(path))
    rt = DaemonRuntime("variables watch", watchdog_fallback=1.0)
    watch = Watch(cfg, 0.5, False, rt, sm)
    errors: List[BaseException] = []

    def scenario() -> None:
        try:
            notify.wait_for(lambda: notify.count("READY=1") == 1, 30, "READY=1")
            path.write_text(json.dumps(dict(data, cluster="changed")))
            # keep reading the socket (as systemd does) until the runtime has stopped
            notify.wait_for(lambda: notify.count("STOPPING=1") == 1, 30, "STOPPING=1")
        except BaseException as exc:
            errors.append(exc)
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=scenario)
    t.start()
    try:
        rc = rt.run(watch)
    finally:
        t.join(30)
    assert errors == [] and rc == EXIT_CONFIG_CHANGED
    assert notify.count("STOPPING=1") == 1 and rt.signal_received is None
