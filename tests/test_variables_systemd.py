"""`airflow-agent-variables.service` on a real systemd: the installed unit, its hardening, the
switch to user airflow, and the secret from moto.

The Airflow CLI inside the host is a stand-in at the default `variables.airflow_command`
(/opt/airflow/venv/bin/airflow): the machine's Airflow venv runs on an interpreter under /root,
which user airflow cannot execute. The stand-in does to its files what the real CLI does (reads
the import file and writes the export file by the names it is given, in its working directory)
and records the uid it ran as; the real CLI's behaviour is covered by tests/test_variables.py.
"""

from __future__ import annotations

import json

import pytest

from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

SECRET_ID = "airflow/test/variables"
UNIT = "airflow-agent-variables.service"

STAND_IN = """#!/usr/bin/python3
import json, os, sys
db = "/airflow/stand-in-variables.json"
with open("/airflow/stand-in-calls.jsonl", "a") as f:
    f.write(json.dumps([os.getuid(), os.getcwd()] + sys.argv[1:3]) + "\\n")
data = json.load(open(db)) if os.path.exists(db) else {}
if sys.argv[1:3] == ["variables", "import"]:
    data.update(json.load(open(sys.argv[3])))
elif sys.argv[1:3] == ["variables", "delete"]:
    data.pop(sys.argv[-1], None)
elif sys.argv[1:3] == ["variables", "export"]:
    json.dump(data, open(sys.argv[3], "w"))
json.dump(data, open(db, "w"))
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server):
    aws_server.reset()
    imds_server.reset()
    with SystemdHost(tmp_path_factory.mktemp("variables-host"), name="aea-variables") as h:
        # the stand-in is a CLI: this host has no Airflow interpreter for method api
        config = {"variables": {"secret_id": SECRET_ID, "method": "cli"}}
        ah.prepare(h, aws_server, imds_server, config=config)
        h.write_file("/opt/airflow/venv/bin/airflow", STAND_IN, mode=0o755)
        h.write_file(
            "/etc/sysconfig/airflow.env",
            'AIRFLOW_HOME="/airflow"\n',
            mode=0o640,
            owner="root:airflow",
        )
        yield h


def test_timer_service_syncs_as_airflow_under_the_units_hardening(host, aws_server):
    sm = aws_server.client("secretsmanager")
    secret = {"a": "value-a-123456", "b": {"value": 7, "description": "seven"}}
    sm.create_secret(Name=SECRET_ID, SecretString=json.dumps(secret))
    timer = host.systemctl("cat", "airflow-agent-variables.timer").stdout
    assert "[Timer]" in timer
    assert (
        "ExecStart=/usr/local/bin/airflow-agent variables sync"
        in host.systemctl("cat", UNIT).stdout
    )
    cursor = host.journal_cursor()
    proc = host.systemctl("start", UNIT, check=False)
    journal = host.journal(UNIT, since_cursor=cursor)
    assert proc.returncode == 0, journal
    assert "2 imported" in journal and "value-a-123456" not in journal
    stored = json.loads(host.read_file("/airflow/stand-in-variables.json"))
    assert stored == secret
    airflow_uid = int(host.run(["id", "-u", "airflow"]).stdout)
    calls = [json.loads(x) for x in host.read_file("/airflow/stand-in-calls.jsonl").splitlines()]
    assert [c[2:] for c in calls] == [["variables", "import"], ["variables", "export"]]
    assert {(c[0], c[1]) for c in calls} == {(airflow_uid, "/var/lib/airflow-agent/variables-tmp")}
    state = json.loads(host.read_file("/var/lib/airflow-agent/variables.json"))
    assert state["counts"]["imported"] == 2 and state["last_result"] == "ok"
    assert host.run(["ls", "-A", "/var/lib/airflow-agent/variables-tmp"]).stdout == ""

    # a second start: same version, no Airflow call
    host.systemctl("start", UNIT)
    assert len(host.read_file("/airflow/stand-in-calls.jsonl").splitlines()) == 2


# A stand-in for the Airflow venv's interpreter for `variables.method: api`: the system python
# with a stand-in `airflow` package (the few names airflow/bridge_server.py uses) that keeps the
# variables in /airflow/api-variables.json and records, at import, who runs it with which argv.
API_PYTHON = """#!/bin/sh
PYTHONPATH=/opt/airflow/standin exec /usr/bin/python3 "$@"
"""
STANDIN_PKG = {
    "airflow/__init__.py": """
import json, os
__version__ = "stand-in"
with open("/airflow/stand-in-bridge.jsonl", "a") as f:
    argv = open("/proc/self/cmdline", "rb").read().split(b"\\0")
    f.write(json.dumps([os.getpid(), os.getuid(), os.getcwd(), [a.decode() for a in argv]]) + "\\n")
""",
    "airflow/settings.py": """
class Session:
    def __init__(self):
        self.pending = {}
    def execute(self, stmt):
        return None
    def scalars(self, query):
        from airflow.models.variable import Variable, load
        data = load()
        return [Variable(k, data[k][0], data[k][1]) for k in query.keys if k in data]
    def rollback(self):
        self.pending.clear()
    def commit(self):
        if self.pending:
            from airflow.models.variable import load, save
            data = load()
            data.update(self.pending)
            save(data)
            self.pending.clear()
    def close(self):
        pass
""",
    "airflow/utils/__init__.py": "",
    "airflow/utils/session.py": """
import contextlib
from airflow.settings import Session
@contextlib.contextmanager
def create_session():
    s = Session()
    yield s
    s.commit()
""",
    "airflow/models/__init__.py": "",
    "airflow/models/variable.py": """
import json, os
DB = "/airflow/api-variables.json"
def load():
    return json.load(open(DB)) if os.path.exists(DB) else {}
def save(data):
    json.dump(data, open(DB + ".tmp", "w"))
    os.rename(DB + ".tmp", DB)
class _Key:
    def in_(self, keys):
        return list(keys)
class Variable:
    key = _Key()
    def __init__(self, key, val, description):
        self.key, self.val, self.description = key, val, description
    @staticmethod
    def set(key, value, description=None, serialize_json=False, session=None):
        if session is not None:
            session.pending[key] = [str(value), description]
            return
        data = load()
        data[key] = [str(value), description]
        save(data)
    @staticmethod
    def delete(key, session=None):
        data = load()
        gone = data.pop(key, None) is not None
        save(data)
        return int(gone)
""",
    "sqlalchemy/__init__.py": """
class _Select:
    def __init__(self, model):
        self.keys = []
    def where(self, keys):
        self.keys = keys
        return self
def select(model):
    return _Select(model)
def text(sql):
    return sql
""",
}
WATCH_UNIT = "airflow-agent-variables-watch.service"


def _bridges(host) -> list:
    text = host.read_file("/airflow/stand-in-bridge.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


def _alive(host, pid: int) -> bool:
    return host.run(["kill", "-0", str(pid)], check=False).returncode == 0


def test_watch_daemon_syncs_through_a_bridge_run_as_airflow_under_its_hardening(host, aws_server):
    sm = aws_server.client("secretsmanager")
    secret_id = "airflow/test/variables-watch"
    secret = {"w1": "watch-value-314159", "w2": {"value": 3, "description": "three"}}
    sm.create_secret(Name=secret_id, SecretString=json.dumps(secret))
    host.write_file("/opt/airflow/venv/bin/python", API_PYTHON, mode=0o755)
    for path, text in STANDIN_PKG.items():
        host.write_file(f"/opt/airflow/standin/{path}", text)
    config = {"variables": {"secret_id": secret_id, "watch_interval": 1}}
    host.write_file("/etc/airflow-agent/agent.yaml", ah.agent_yaml(config))

    cursor = host.journal_cursor()
    proc = host.systemctl("start", WATCH_UNIT, check=False)  # returns after READY=1
    journal = host.journal(WATCH_UNIT, since_cursor=cursor)
    assert proc.returncode == 0, journal
    assert host.unit_property(WATCH_UNIT, "ActiveState") == "active"
    assert "2 imported" in host.unit_property(WATCH_UNIT, "StatusText")
    stored = json.loads(host.read_file("/airflow/api-variables.json"))
    assert stored == {"w1": ["watch-value-314159", None], "w2": ["3", "three"]}
    airflow_uid = int(host.run(["id", "-u", "airflow"]).stdout)
    ((pid, uid, cwd, argv),) = _bridges(host)
    assert uid == airflow_uid and cwd == "/var/lib/airflow-agent/variables-tmp"
    assert argv[:2] == ["/usr/bin/python3", "-c"] and "watch-value" not in json.dumps(argv)

    # a change lands within the interval, through the same (warm) bridge
    secret["w1"] = "watch-value-271828"
    sm.put_secret_value(SecretId=secret_id, SecretString=json.dumps(secret))
    host.wait_for(
        lambda: (
            json.loads(host.read_file("/airflow/api-variables.json"))["w1"][0]
            == "watch-value-271828"
        ),
        15,
        "the change",
    )
    assert len(_bridges(host)) == 1

    # the bridge dies: the daemon starts another as airflow
    host.run(["kill", "-9", str(pid)])
    host.wait_for(lambda: len(_bridges(host)) == 2, 30, "a new bridge")
    new_pid = _bridges(host)[1][0]
    host.wait_for(lambda: _alive(host, new_pid), 10, "the new bridge alive")

    host.systemctl("stop", WATCH_UNIT)
    assert host.unit_property(WATCH_UNIT, "ActiveState") == "inactive"
    assert host.unit_property(WATCH_UNIT, "Result") == "success"
    assert not _alive(host, new_pid)
    journal = host.journal(WATCH_UNIT, since_cursor=cursor)
    assert "variables watch stopped" in journal and "exited (status -9)" in journal
    assert "watch-value" not in journal
