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

import boto3
import pytest

from tests.rig import agent_host as ah
from tests.rig.systemd_host import SystemdHost

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
        ah.prepare(h, aws_server, imds_server, config={"variables": {"secret_id": SECRET_ID}})
        h.write_file("/opt/airflow/venv/bin/airflow", STAND_IN, mode=0o755)
        h.write_file(
            "/etc/sysconfig/airflow.env",
            'AIRFLOW_HOME="/airflow"\n',
            mode=0o640,
            owner="root:airflow",
        )
        yield h


def test_timer_service_syncs_as_airflow_under_the_units_hardening(host, aws_server):
    sm = boto3.client(
        "secretsmanager",
        endpoint_url=aws_server.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
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
