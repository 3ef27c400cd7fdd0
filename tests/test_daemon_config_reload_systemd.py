"""The agent's daemons pick up a changed agent.yaml, on a real systemd with the shipped units.

The project is installed as cfn-init installs it (sandbox/agent_host.py: the real unit files,
stand-in Airflow services). The daemons read agent.yaml once, at start; the runtime watches the
file (agent/runtime/config_watch.py) and, when it changes to content that loads, ends the daemon
with exit 75, which the unit's own `Restart=` answers. Shown here:

- confapply started with `units.scheduler: [airflow-scheduler]`; agent.yaml rewritten to list
  airflow-dag-processor too: confapply restarts by itself (new MainPID, one more NRestarts, the
  journal says why), and the very next env-file change restarts *both* units: the new config is
  in effect. Before the edit the same kind of change restarted only airflow-scheduler.
- a broken agent.yaml (bad YAML) leaves the running daemon alone (same MainPID well past the
  time a restart takes) and says so in its STATUS=; fixing it restarts the daemon.
- `lifecycle watch` (Restart=always) restarts on an agent.yaml change too.
"""

from __future__ import annotations

import time

import pytest

from agent.platform.envfile import encode_env
from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

CONFAPPLY = "airflow-agent-confapply.service"
LIFECYCLE = "airflow-agent-lifecycle.service"
AGENT_YAML = "/etc/airflow-agent/agent.yaml"
ENV_FILE = "/etc/sysconfig/airflow.env"
SCHED, DAGP = "airflow-scheduler", "airflow-dag-processor"
# the check interval + settle (<= 3 s), the unit's RestartSec=5, a Python start: well inside
RESTART_WITHIN = 20.0

BASE = {
    "role": {"override": "scheduler"},
    "confapply": {"recheck_interval": 600.0},
    "lifecycle": {"poll_interval": 1.0},
}


def config(units):
    return ah.agent_yaml(dict(BASE, units={"scheduler": units}))


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server):
    aws_server.reset()
    imds_server.reset()
    imds_server.set_paths({"meta-data/autoscaling/target-lifecycle-state": "InService"})
    with SystemdHost(tmp_path_factory.mktemp("config-reload"), name="aea-cfgreload") as h:
        ah.prepare(h, aws_server, imds_server, config=dict(BASE, units={"scheduler": [SCHED]}))
        write_env(h, {"FOO": "1", "STANDIN_READY_DELAY": "0"})
        for unit in (SCHED, DAGP):
            h.systemctl("start", unit)
            h.wait_active(unit)
        yield h


def write_env(host, variables) -> None:
    host.write_file(ENV_FILE, encode_env(dict(variables)), mode=0o640, owner="root:airflow")


def restarts(host, unit: str) -> int:
    return int(host.unit_property(unit, "NRestarts") or 0)


def wait_restarted(host, unit: str, old_pid: int, timeout: float) -> float:
    """Seconds until `unit` is active again under a new MainPID."""
    start = time.monotonic()
    host.wait_for(
        lambda: (
            host.main_pid(unit) not in (0, old_pid)
            and host.unit_property(unit, "ActiveState") == "active"
        ),
        timeout,
        f"{unit} to restart on the new agent.yaml",
        interval=0.2,
    )
    return time.monotonic() - start


def pids(host):
    return ah.main_pids(host, [SCHED, DAGP])


def test_confapply_restarts_on_a_changed_agent_yaml_and_uses_it(host):
    host.systemctl("start", CONFAPPLY)  # Type=notify: returns after its first check
    host.wait_active(CONFAPPLY)
    # the old config: an env change restarts airflow-scheduler only
    before = pids(host)
    write_env(host, {"FOO": "2", "STANDIN_READY_DELAY": "0"})
    host.wait_for(lambda: pids(host)[SCHED] != before[SCHED], 30, "scheduler restart", 0.2)
    host.wait_for(
        lambda: host.unit_property(CONFAPPLY, "StatusText").startswith("watching"), 30, "idle"
    )
    assert pids(host)[DAGP] == before[DAGP]

    pid, nrestarts = host.main_pid(CONFAPPLY), restarts(host, CONFAPPLY)
    cursor = host.journal_cursor()
    host.write_file(AGENT_YAML, config([SCHED, DAGP]))
    took = wait_restarted(host, CONFAPPLY, pid, RESTART_WITHIN + 10)
    print(f"confapply restarted on the new agent.yaml after {took:.1f} s")
    assert took < RESTART_WITHIN
    assert restarts(host, CONFAPPLY) == nrestarts + 1
    journal = host.journal(CONFAPPLY, since_cursor=cursor)
    assert f"{AGENT_YAML} changed; stopping (exit 75)" in journal, journal
    # its start-up check found the env file applied already: nothing restarted by the restart
    after = pids(host)
    host.wait_for(
        lambda: host.unit_property(CONFAPPLY, "StatusText").startswith("watching"), 30, "idle"
    )
    assert pids(host) == after

    # the new config in effect: the next env change restarts both units
    write_env(host, {"FOO": "3", "STANDIN_READY_DELAY": "0"})
    host.wait_for(
        lambda: all(pids(host)[u] != after[u] for u in (SCHED, DAGP)),
        30,
        "both units restarted under the new units list",
        0.2,
    )


def test_a_broken_agent_yaml_keeps_the_daemon_running_until_it_is_fixed(host):
    if host.unit_property(CONFAPPLY, "ActiveState") != "active":
        host.systemctl("start", CONFAPPLY)
    host.wait_active(CONFAPPLY)
    pid, nrestarts = host.main_pid(CONFAPPLY), restarts(host, CONFAPPLY)
    host.write_file(AGENT_YAML, "role: {override: [unclosed\n")
    host.wait_for(
        lambda: "cannot be loaded" in host.unit_property(CONFAPPLY, "StatusText"),
        15,
        "confapply to report the broken agent.yaml",
        0.2,
    )
    # well past the time a restart takes (check + settle + RestartSec=5), still the same process
    time_limit = time.monotonic() + 8.0
    while time.monotonic() < time_limit:
        assert host.main_pid(CONFAPPLY) == pid
        assert host.unit_property(CONFAPPLY, "ActiveState") == "active"
        time.sleep(0.5)
    assert restarts(host, CONFAPPLY) == nrestarts
    host.write_file(AGENT_YAML, config([SCHED]))
    assert wait_restarted(host, CONFAPPLY, pid, RESTART_WITHIN + 10) < RESTART_WITHIN
    assert "cannot be loaded" not in host.unit_property(CONFAPPLY, "StatusText")


def test_lifecycle_watch_restarts_on_a_changed_agent_yaml(host):
    host.systemctl("start", LIFECYCLE)
    host.wait_active(LIFECYCLE)
    pid = host.main_pid(LIFECYCLE)
    cursor = host.journal_cursor()
    host.write_file(AGENT_YAML, ah.agent_yaml(dict(BASE, lifecycle={"poll_interval": 2.0})))
    took = wait_restarted(host, LIFECYCLE, pid, RESTART_WITHIN + 10)
    print(f"lifecycle watch restarted on the new agent.yaml after {took:.1f} s")
    assert took < RESTART_WITHIN
    journal = host.journal(LIFECYCLE, since_cursor=cursor)
    assert "polling IMDS every 2s" in journal, journal
