"""confapply on a real systemd: restarts exactly when the env file's content changes.

One test host for the module: the project installed with its real unit files, bootstrapped as
a scheduler whose three Airflow units run stand-ins (sandbox/agent_host.py) that record the
environment they started with. Restarts are counted from the stand-ins' own start lines in
the journal and from MainPIDs; "nothing happened" is asserted only after confapply reports
(STATUS=, `N check(s)`) that it has looked at the change.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from agent.jobs.confapply.plan import content_hash
from agent.platform.envfile import encode_env
from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

UNITS = ["airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
CONFAPPLY = "airflow-agent-confapply.service"
ENV_FILE = "/etc/sysconfig/airflow.env"


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server, ssm):
    aws_server.reset()
    imds_server.reset()
    ah.put_params(ssm, {"FOO": "initial", "STANDIN_READY_DELAY": "0"})
    with SystemdHost(tmp_path_factory.mktemp("confapply-host"), name="aea-confapply") as h:
        ah.prepare(h, aws_server, imds_server)
        ah.agent(h, aws_server, imds_server, "bootstrap", "--role", "scheduler")
        for u in UNITS:
            h.wait_active(u)
        yield h


# -- helpers ------------------------------------------------------------------------------------


def checks(host) -> int:
    m = re.search(r"(\d+) check\(s\)", host.unit_property(CONFAPPLY, "StatusText"))
    return int(m.group(1)) if m else -1


def applied(host) -> str:
    return json.loads(host.read_file("/var/lib/airflow-agent/confapply.json")).get("applied_hash")


def file_hash(host) -> str:
    return content_hash([(ENV_FILE, host.read_file(ENV_FILE))])


def write_env(host, variables) -> bytes:
    data = encode_env(dict(variables))
    host.write_file(ENV_FILE, data, mode=0o640, owner="root:airflow")
    return data


def starts_since(host, cursor: str, unit: str) -> int:
    return host.journal(unit + ".service", since_cursor=cursor).count("(stand-in) pid")


def settle(host, before_checks: int, timeout: float = 30) -> None:
    """Wait until confapply has checked after `before_checks` and is idle and in sync."""

    def done() -> bool:
        return (
            checks(host) > before_checks
            and applied(host) == file_hash(host)
            and all(host.unit_property(u, "ActiveState") == "active" for u in UNITS)
        )

    host.wait_for(done, timeout, "confapply to check, apply and go idle", interval=0.1)


def current_vars(host) -> dict:
    from agent.platform.envfile import parse_env

    return parse_env(host.read_file(ENV_FILE))


# -- tests --------------------------------------------------------------------------------------


def test_one_parameter_change_restarts_each_unit_exactly_once(host, aws_server, imds_server, ssm):
    cursor = host.journal_cursor()
    pids = ah.main_pids(host, UNITS)
    n = checks(host)
    ah.put_params(ssm, {"FOO": "changed-once"})
    ah.agent(host, aws_server, imds_server, "env", "sync")
    settle(host, n)
    new = ah.main_pids(host, UNITS)
    assert all(new[u] != pids[u] and new[u] > 0 for u in UNITS), (pids, new)
    assert {u: starts_since(host, cursor, u) for u in UNITS} == {u: 1 for u in UNITS}
    for u in UNITS:
        assert ah.standin_env(host, u)[b"FOO"] == b"changed-once"
    # restarted in the configured order, each after the previous one was active
    log = host.journal(CONFAPPLY, since_cursor=cursor)
    order = [log.index(f"{u} restarted and active") for u in UNITS]
    assert order == sorted(order)


def test_touch_identical_rewrite_and_agent_restarts_restart_nothing(host, aws_server, imds_server):
    cursor = host.journal_cursor()
    pids = ah.main_pids(host, UNITS)
    same = host.read_file(ENV_FILE)

    n = checks(host)
    host.run(["touch", ENV_FILE])
    host.wait_for(lambda: checks(host) > n, 10, "confapply to check after touch")

    n = checks(host)
    host.write_file(ENV_FILE, same, mode=0o640, owner="root:airflow")  # atomic replace
    host.wait_for(lambda: checks(host) > n, 10, "confapply to check after identical rewrite")

    # env sync with nothing new in SSM: the file is not even rewritten
    ah.agent(host, aws_server, imds_server, "env", "sync")

    # a confapply restart: the start-up check compares with the recorded hash
    host.systemctl("restart", CONFAPPLY)
    assert checks(host) >= 1

    # reboot-like: everything stopped, the units started first, then the agent
    host.systemctl("stop", CONFAPPLY, *UNITS)
    host.systemctl("start", *UNITS)
    pids = ah.main_pids(host, UNITS)
    host.systemctl("start", CONFAPPLY)
    assert checks(host) >= 1
    n = checks(host)
    host.run(["touch", ENV_FILE])
    host.wait_for(lambda: checks(host) > n, 10, "confapply to check after touch")

    assert ah.main_pids(host, UNITS) == pids
    log = host.journal(CONFAPPLY, since_cursor=cursor)
    assert "restarting" not in log, log
    # the only stand-in starts are the ones of the reboot-like start above
    assert {u: starts_since(host, cursor, u) for u in UNITS} == {u: 1 for u in UNITS}


def test_burst_of_20_changes_in_one_second_is_at_most_two_restarts(host):
    cursor = host.journal_cursor()
    base = current_vars(host)
    n = checks(host)
    # 20 atomic replaces ~45 ms apart, each with different content, from inside the host
    script = (
        "import grp, os, sys, time\n"
        "src = sys.stdin.buffer.read().split(b'\\0')\n"
        "gid = grp.getgrnam('airflow').gr_gid\n"
        "for i, data in enumerate(src):\n"
        "    if i: time.sleep(0.045)\n"
        "    tmp = '/etc/sysconfig/.burst.tmp'\n"
        "    with open(tmp, 'wb') as f: f.write(data)\n"
        "    os.chown(tmp, 0, gid)\n"
        "    os.chmod(tmp, 0o640); os.replace(tmp, '/etc/sysconfig/airflow.env')\n"
        "    print(time.monotonic())\n"
    )
    bodies = [encode_env({**base, "FOO": f"burst-{i}"}) for i in range(20)]
    out = host.run(["python3", "-c", script], input=b"\0".join(bodies), text=False).stdout
    # the premise of "one burst" (agent_yaml: debounce 0.5 s, max_wait 2 s): each replace
    # within the debounce of the one before, all within max_wait. That such a burst is one
    # check is the Coalescer's, proven on virtual time (tests/test_confapply_plan.py); here
    # real inotify events through the daemon restart each unit once, or twice when a late
    # event of the burst lands during the restart.
    times = [float(t) for t in out.split()]
    assert len(times) == 20
    assert max(b - a for a, b in zip(times, times[1:])) < 0.5, times
    assert times[-1] - times[0] < 2.0, times
    settle(host, n)
    counts = {u: starts_since(host, cursor, u) for u in UNITS}
    assert all(1 <= c <= 2 for c in counts.values()), counts
    for u in UNITS:
        assert ah.standin_env(host, u)[b"FOO"] == b"burst-19"


def test_change_during_a_restart_is_applied_after_it(host):
    base = current_vars(host)
    cursor = host.journal_cursor()
    n = checks(host)
    # the stand-ins take 1.5 s to report READY with this content: the restart is slow
    write_env(host, {**base, "FOO": "slow", "STANDIN_READY_DELAY": "1.5"})
    host.wait_for(
        lambda: host.unit_property(CONFAPPLY, "StatusText").startswith("restarting"),
        10,
        "confapply to be restarting",
    )
    final = write_env(host, {**base, "FOO": "final", "STANDIN_READY_DELAY": "0"})
    settle(host, n, timeout=60)
    assert host.read_file(ENV_FILE) == final
    assert applied(host) == content_hash([(ENV_FILE, final)])
    for u in UNITS:
        env = ah.standin_env(host, u)
        assert (env[b"FOO"], env[b"STANDIN_READY_DELAY"]) == (b"final", b"0")
    assert all(starts_since(host, cursor, u) >= 1 for u in UNITS)


def test_unit_in_start_limit_hit_recovers(host):
    unit = UNITS[0]
    # drive it into systemd's start limit (StartLimitBurst=5 in 60 s in the stand-in drop-in)
    for _ in range(12):
        host.systemctl("restart", unit, check=False)
        if host.unit_property(unit, "Result") == "start-limit-hit":
            break
    assert host.unit_property(unit, "Result") == "start-limit-hit"
    assert host.unit_property(unit, "ActiveState") == "failed"
    cursor = host.journal_cursor()
    n = checks(host)
    write_env(host, {**current_vars(host), "FOO": "after-start-limit"})
    settle(host, n)
    assert host.unit_property(unit, "ActiveState") == "active"
    assert ah.standin_env(host, unit)[b"FOO"] == b"after-start-limit"
    assert "hit systemd's start limit; reset-failed and retrying once" in host.journal(
        CONFAPPLY, since_cursor=cursor
    )


def test_failed_restart_is_not_recorded_and_retried_on_the_next_change(host):
    base = current_vars(host)
    good_hash = applied(host)
    cursor = host.journal_cursor()
    bad = write_env(host, {**base, "STANDIN_FAIL": "1"})

    def failed() -> bool:
        doc = json.loads(host.read_file("/var/lib/airflow-agent/confapply.json"))
        return doc.get("last_result") == "failed"

    host.wait_for(failed, 30, "confapply to record the failed apply")
    assert applied(host) == good_hash != content_hash([(ENV_FILE, bad)])
    log = host.journal(CONFAPPLY, since_cursor=cursor)
    assert "restart of airflow-scheduler failed" in log and "incomplete" in log
    # it stopped at the first failure: the later units still run the previous config
    assert "restarting airflow-dag-processor" not in log
    n = checks(host)
    write_env(host, base)  # the fix
    settle(host, n, timeout=60)
    for u in UNITS:
        assert b"STANDIN_FAIL" not in ah.standin_env(host, u)


def test_ready_gates_activation_and_a_change_made_while_down_is_applied_at_start(host):
    host.systemctl("stop", CONFAPPLY)
    pids = ah.main_pids(host, UNITS)
    # changed while the agent is down; stand-ins now take 1 s each to be ready
    data = write_env(host, {**current_vars(host), "FOO": "while-down", "STANDIN_READY_DELAY": "1"})
    host.systemctl("start", CONFAPPLY)  # returns when confapply sent READY=1
    # READY=1 came only after the initial check restarted all three units and each was ready,
    # by systemd's own clock: each unit became active (its READY=1) after confapply started and
    # before confapply became active (its READY=1)
    started = int(host.unit_property(CONFAPPLY, "InactiveExitTimestampMonotonic"))
    ready_at = int(host.unit_property(CONFAPPLY, "ActiveEnterTimestampMonotonic"))
    units_ready = [int(host.unit_property(u, "ActiveEnterTimestampMonotonic")) for u in UNITS]
    assert all(started < t <= ready_at for t in units_ready), (started, units_ready, ready_at)
    assert applied(host) == content_hash([(ENV_FILE, data)])
    new = ah.main_pids(host, UNITS)
    assert all(new[u] != pids[u] for u in UNITS)
    assert host.unit_property(CONFAPPLY, "ActiveState") == "active"
    n = checks(host)
    write_env(host, {**current_vars(host), "STANDIN_READY_DELAY": "0"})
    settle(host, n)


def test_watchdog_pings_and_sigterm_exits_cleanly(host):
    dropin = "/etc/systemd/system/airflow-agent-confapply.service.d/60-test-watchdog.conf"
    host.write_file(dropin, "[Service]\nWatchdogSec=2\n")
    host.systemctl("daemon-reload")
    try:
        host.systemctl("restart", CONFAPPLY)
        pid = host.main_pid(CONFAPPLY)
        first = int(host.unit_property(CONFAPPLY, "WatchdogTimestampMonotonic"))
        host.wait_for(
            lambda: int(host.unit_property(CONFAPPLY, "WatchdogTimestampMonotonic")) > first,
            5,
            "a WATCHDOG=1 ping",
        )
        # 3 watchdog periods later it is still the same process: pings keep coming
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert host.main_pid(CONFAPPLY) == pid
            time.sleep(0.5)
        cursor = host.journal_cursor()
        host.systemctl("stop", CONFAPPLY)
        assert host.unit_property(CONFAPPLY, "Result") == "success"
        assert "stopping on signal" in host.journal(CONFAPPLY, since_cursor=cursor)
    finally:
        host.run(["rm", "-f", dropin])
        host.systemctl("daemon-reload")
        host.systemctl("start", CONFAPPLY)


def test_extra_watched_file_restarts_too(host):
    extra = "/airflow/airflow.cfg"
    host.write_file(extra, "[core]\nx = 1\n", mode=0o644)
    host.write_file(
        "/etc/airflow-agent/agent.yaml", ah.agent_yaml({"confapply": {"watch": [extra]}})
    )
    try:
        # a new watch list is a new hash: the start-up check applies it once
        host.systemctl("restart", CONFAPPLY)
        host.wait_for(lambda: applied(host) == watched_hash(host, extra), 30, "start-up apply")
        pids = ah.main_pids(host, UNITS)
        n = checks(host)
        host.write_file(extra, "[core]\nx = 2\n", mode=0o644)
        host.wait_for(
            lambda: checks(host) > n and applied(host) == watched_hash(host, extra),
            30,
            "the change of the extra file to be applied",
        )
        new = ah.main_pids(host, UNITS)
        assert all(new[u] != pids[u] for u in UNITS), (pids, new)
    finally:
        host.write_file("/etc/airflow-agent/agent.yaml", ah.agent_yaml())
        host.systemctl("restart", CONFAPPLY)


def watched_hash(host, extra: str) -> str:
    return content_hash([(ENV_FILE, host.read_file(ENV_FILE)), (extra, host.read_file(extra))])
