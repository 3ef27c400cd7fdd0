"""`variables.method: api` (the default) and `variables watch`, against the real Airflow 3.3
interpreter and metadata database (SQLite) and moto over HTTP.

What Airflow wrote is observed in Airflow's own database: triggers on the `variable` table
append every insert/update/delete to an audit table (key and operation only), so "exactly one
key written" is a fact about the database, not about our logs. A key that fails to land is
forced the same way, by a trigger that aborts writes of that one key. The Airflow CLI wrapper
of tests/test_variables.py stays configured as `airflow_command`, and its call log proves that
the api method never runs the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from agent.jobs.variables.plan import stored_form, unwrap
from sandbox import variable_shapes
from sandbox.notify_socket import NotifySocket
from sandbox.proc import wait_for
from tests.conftest import REPO_ROOT
from tests.test_variables import (  # noqa: F401 - migrated_home is a fixture
    AIRFLOW,
    SECRET_ID,
    CmdlineScanner,
    Rig,
    _files_holding,
    _values,
    migrated_home,
)

AIRFLOW_PYTHON = AIRFLOW.parent / "python"

AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS aea_audit (n INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT, key TEXT);
CREATE TRIGGER IF NOT EXISTS aea_ins AFTER INSERT ON variable
  BEGIN INSERT INTO aea_audit (op, key) VALUES ('insert', NEW.key); END;
CREATE TRIGGER IF NOT EXISTS aea_upd AFTER UPDATE ON variable
  BEGIN INSERT INTO aea_audit (op, key) VALUES ('update', NEW.key); END;
CREATE TRIGGER IF NOT EXISTS aea_del AFTER DELETE ON variable
  BEGIN INSERT INTO aea_audit (op, key) VALUES ('delete', OLD.key); END;
"""

REFUSE_SQL = """
CREATE TRIGGER aea_refuse_ins BEFORE INSERT ON variable WHEN NEW.key = '{key}'
  BEGIN SELECT RAISE(ABORT, 'refused by test'); END;
CREATE TRIGGER aea_refuse_upd BEFORE UPDATE ON variable WHEN NEW.key = '{key}'
  BEGIN SELECT RAISE(ABORT, 'refused by test'); END;
"""


class ApiRig(Rig):
    def sql(self, script: str) -> None:
        with sqlite3.connect(self.home / "airflow.db") as conn:
            conn.executescript(script)

    def audit(self) -> List[tuple]:
        with sqlite3.connect(self.home / "airflow.db") as conn:
            return conn.execute("SELECT op, key FROM aea_audit ORDER BY n").fetchall()

    def bridges(self) -> List[int]:
        """PIDs of live Airflow bridge co-processes started from this test's state dir."""
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                cwd = os.readlink(f"/proc/{pid}/cwd")
                st = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            zombie = st.rsplit(")", 1)[1].split()[0] == "Z"
            if b"airflow_bridge" in cmd and cwd.startswith(str(self.state_dir)) and not zombie:
                out.append(int(pid))
        return out

    def watch_state(self) -> dict:
        path = self.state_dir / "variables-watch.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return {}


@pytest.fixture
def rig(tmp_path, migrated_home, make_config, run_agent, aws, imds) -> ApiRig:  # noqa: F811
    r = ApiRig(
        tmp_path,
        migrated_home,
        make_config,
        run_agent,
        method="api",
        airflow_python=str(AIRFLOW_PYTHON),
    )
    r.sql(AUDIT_SQL)
    return r


def _stored(raw) -> tuple:
    value, description = unwrap(raw)
    return stored_form(value), description


SHAPES = {**variable_shapes.BASIC, **variable_shapes.EXPORT_DIFFERS}


def test_api_imports_only_changes_verified_without_the_cli(rig):
    secret: Dict = _values(6, "api")
    secret.update(SHAPES)
    rig.put(secret)
    needles = [v for v in secret.values() if isinstance(v, str) and "-value-" in v]

    with CmdlineScanner(needles) as scan:
        first = rig.sync("--diff")
    assert first.returncode == 0, first.stderr
    assert scan.found == []
    # stored exactly as `airflow variables import` stores each shape
    assert rig.db() == {k: _stored(v) for k, v in secret.items()}
    assert sorted(k for _op, k in rig.audit()) == sorted(secret)
    assert rig.calls() == []  # the Airflow CLI never ran
    assert "airflow bridge started" in first.stderr
    assert f"{len(secret)} imported" in first.stderr and "verified" in first.stderr
    assert rig.bridges() == []  # the one-shot's co-process ended with it

    # one of N changes: Airflow's table sees exactly one write (a tampered key stays tampered)
    rig.tamper("key_1", "tampered")
    n_audit = len(rig.audit())
    secret["key_0"] = "second-value-" + os.urandom(4).hex()
    needles.append(secret["key_0"])
    v2 = rig.put(secret)
    with CmdlineScanner(needles) as scan:
        second = rig.sync()
    assert second.returncode == 0, second.stderr
    assert scan.found == []
    assert rig.audit()[n_audit:] == [("update", "key_0")]
    assert rig.db()["key_0"][0] == secret["key_0"] and rig.db()["key_1"][0] == "tampered"
    assert "1 changed" in second.stderr and "1 imported" in second.stderr
    assert rig.state()["version_id"] == v2

    # unchanged: no Airflow interpreter at all
    n_audit = len(rig.audit())
    third = rig.sync()
    assert third.returncode == 0 and "no Airflow call" in third.stderr
    assert "airflow bridge started" not in third.stderr and len(rig.audit()) == n_audit

    # --prune deletes through the bridge, verified absent
    del secret["key_3"], secret["-dash"]
    rig.put(secret)
    fourth = rig.sync("--prune")
    assert fourth.returncode == 0, fourth.stderr
    assert sorted(rig.audit()[n_audit:]) == [("delete", "-dash"), ("delete", "key_3")]
    assert "key_3" not in rig.db() and rig.state()["counts"]["deleted"] == 2

    # --all repairs the drift
    fifth = rig.sync("--all")
    assert fifth.returncode == 0, fifth.stderr
    assert rig.db()["key_1"][0] == secret["key_1"]

    outputs = "".join(p.stdout + p.stderr for p in (first, second, third, fourth, fifth))
    assert [n for n in needles if n in outputs] == []
    assert _files_holding(rig.tmp, needles) == []
    assert rig.tmp_files() == [] and rig.calls() == []


def test_api_a_key_airflow_refuses_is_named_and_retried(rig):
    secret = _values(4, "refuse")
    version = rig.put(secret)
    rig.sql(REFUSE_SQL.format(key="key_2"))
    proc = rig.sync()
    assert proc.returncode == 1
    assert "did not land in Airflow: key_2 (the next run retries them)" in proc.stderr
    # the bridge names the key and the exception class, never the message (it quotes values)
    assert "key_2 (IntegrityError)" in proc.stderr and "refused by test" not in proc.stderr
    assert sorted(rig.db()) == ["key_0", "key_1", "key_3"]
    assert sorted(rig.hashes()) == ["key_0", "key_1", "key_3"]
    st = rig.state()
    assert st.get("version_id") != version and st["last_result"] == "failed"

    rig.sql("DROP TRIGGER aea_refuse_ins; DROP TRIGGER aea_refuse_upd;")
    n_audit = len(rig.audit())
    again = rig.sync()
    assert again.returncode == 0, again.stderr
    assert rig.audit()[n_audit:] == [("insert", "key_2")]
    assert rig.state()["version_id"] == version


def test_api_defaults_to_the_python_beside_the_airflow_cli_and_names_a_wrong_one(rig, make_config):
    secret = _values(2, "default-python")
    rig.put(secret)
    base = {"secret_id": SECRET_ID, "env_file": str(rig.env_file)}
    # no method, no airflow_python: api through <dir of airflow_command[0]>/python
    config = make_config(
        {"variables": {**base, "airflow_command": [str(AIRFLOW)], "user": None}},
        name="agent-default.yaml",
    )
    proc = rig._run_agent(config, "variables", "sync")
    assert proc.returncode == 0, proc.stderr
    assert "airflow bridge started" in proc.stderr
    assert {k: v[0] for k, v in rig.db().items()} == secret

    # an interpreter without Airflow: a clear error naming the key, nothing recorded
    secret["key_0"] = "x-" + os.urandom(4).hex()
    rig.put(secret)
    bad = make_config(
        {"variables": {**base, "airflow_python": sys.executable, "user": None}},
        name="agent-bad.yaml",
    )
    proc = rig._run_agent(bad, "variables", "sync")
    assert proc.returncode == 1
    assert "could not load Airflow with" in proc.stderr and "ModuleNotFoundError" in proc.stderr
    assert "variables.airflow_python" in proc.stderr
    missing = make_config(
        {"variables": {**base, "airflow_python": "/nonexistent/python", "user": None}},
        name="agent-missing.yaml",
    )
    proc = rig._run_agent(missing, "variables", "sync")
    assert proc.returncode == 2 and "variables.airflow_python: /nonexistent/python" in proc.stderr


def _start_watch(rig: ApiRig, agent_env: dict, notify: NotifySocket, interval: float):
    argv = [sys.executable, "-m", "agent", "--config", str(rig.config), "variables", "watch"]
    argv += ["--interval", str(interval)]
    with open(rig.tmp / "watch.log", "wb") as log:
        return subprocess.Popen(
            argv,
            env={**agent_env, "NOTIFY_SOCKET": notify.path},
            cwd=str(REPO_ROOT),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_watch_syncs_a_change_within_its_interval_and_idles_without_airflow_work(rig, agent_env):
    secret = _values(50, "watch")
    rig.put(secret)
    notify = NotifySocket(rig.tmp)
    interval = 1.0
    proc = _start_watch(rig, agent_env, notify, interval)
    try:
        wait_for(lambda: any("READY=1" in m for m in notify.drain()), 90, "READY=1")
        assert {k: v[0] for k, v in rig.db().items()} == secret
        first = rig.watch_state()
        bridge = first["bridge_pid"]
        assert first["syncs"] == 1 and rig.bridges() == [bridge]

        # unchanged secret: polls go on, no request reaches the bridge, nothing is written
        n_audit = len(rig.audit())
        wait_for(lambda: rig.watch_state().get("polls", 0) >= first["polls"] + 3, 30, "3 polls")
        idle = rig.watch_state()
        assert idle["bridge_requests"] == first["bridge_requests"] and idle["syncs"] == 1
        assert len(rig.audit()) == n_audit and idle["bridge_pid"] == bridge
        assert any(m == "WATCHDOG=1" for m in notify.drain())

        # one change: in Airflow within the interval (+ the poll's own work), exactly one write
        secret["key_7"] = "changed-value-" + os.urandom(4).hex()
        rig.put(secret)
        t0 = time.monotonic()
        wait_for(lambda: rig.db()["key_7"][0] == secret["key_7"], 30, "the change in Airflow")
        took = time.monotonic() - t0
        assert took < interval + 2.0, took
        assert rig.audit()[n_audit:] == [("update", "key_7")]
        wait_for(lambda: rig.watch_state().get("syncs") == 2, 10, "the sync recorded")
        assert rig.watch_state()["bridge_pid"] == bridge  # warm: the same co-process
        wait_for(lambda: any("STATUS=synced version" in m for m in notify.drain()), 10, "STATUS")

        # the bridge dies: the daemon starts another, and the next change lands through it
        os.kill(bridge, signal.SIGKILL)
        wait_for(
            lambda: (
                rig.watch_state().get("bridge_starts") == 2
                and rig.watch_state().get("bridge_pid") not in (None, bridge)
            ),
            60,
            "a new bridge",
        )
        secret["key_8"] = "again-value-" + os.urandom(4).hex()
        rig.put(secret)
        wait_for(lambda: rig.db()["key_8"][0] == secret["key_8"], 30, "the next change")

        # the env file changes (a rotated database password, say): the next poll restarts the
        # bridge with the new environment
        rig.write_env({"AEA_ROTATED": "1"})
        third = rig.watch_state()["bridge_pid"]
        wait_for(lambda: rig.watch_state().get("bridge_starts") == 3, 60, "a third bridge")
        new = rig.watch_state()["bridge_pid"]
        assert new != third and b"AEA_ROTATED=1" in Path(f"/proc/{new}/environ").read_bytes()

        # SIGTERM: clean exit, the bridge ends with it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "STOPPING=1" in notify.drain()
        assert rig.bridges() == []
        log = (rig.tmp / "watch.log").read_text()
        assert "variables watch stopped" in log and "exited (status -9)" in log
        assert "the Airflow environment changed; restarting the airflow bridge" in log
        values = [v for v in secret.values()]
        assert [v for v in values if v in log] == []
        assert rig.calls() == []
    finally:
        _stop(proc)
        notify.close()


def test_sigkill_of_the_agent_leaves_no_bridge_behind(rig, agent_env):
    rig.put(_values(3, "orphan"))
    notify = NotifySocket(rig.tmp)
    proc = _start_watch(rig, agent_env, notify, 30.0)
    try:
        wait_for(lambda: any("READY=1" in m for m in notify.drain()), 90, "READY=1")
        bridge = rig.watch_state()["bridge_pid"]
        assert rig.bridges() == [bridge]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # parent-death signal: no orphan keeps a database connection (or the values)
        wait_for(lambda: rig.bridges() == [], 10, "the bridge to die with the agent")
    finally:
        _stop(proc)
        notify.close()


def test_sigterm_mid_run_ends_the_bridge_and_records_the_failure(rig, agent_env):
    rig.put(_values(2, "term"))
    # the test holds Airflow's database: the bridge's first write waits on the lock
    conn = sqlite3.connect(rig.home / "airflow.db", isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    argv = [sys.executable, "-m", "agent", "--config", str(rig.config), "variables", "sync"]
    agent = subprocess.Popen(
        argv, env=agent_env, cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        (bridge,) = wait_for(rig.bridges, 30, "the bridge to start")
        agent.send_signal(signal.SIGTERM)
        _out, err = agent.communicate(timeout=10)
    finally:
        conn.rollback()
        conn.close()
        _stop(agent)
    assert agent.returncode == 1 and "terminated by signal 15" in err.decode()
    assert rig.bridges() == [] and not Path(f"/proc/{bridge}").exists()
    assert rig.state()["last_result"] == "failed" and rig.hashes() == {} and rig.db() == {}
