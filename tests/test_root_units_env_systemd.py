"""No root agent unit loads the Airflow env file (issue 12), on the real systemd test host.

The env file is written by `env sync` from SSM parameters, so whoever can write a parameter
under `<path>/env/` chooses its names and values. A root unit with `EnvironmentFile=` would
hand them to a root process: `PYTHONPATH` (a `sitecustomize` runs as root), `LD_PRELOAD`,
`AIRFLOW_AGENT_CONFIG` (another agent config), `AWS_EC2_METADATA_SERVICE_ENDPOINT` (fake
termination notices). The agent reads the file itself (agent/platform/envfile.parse_env) and
passes its values only to the Airflow children that run as user airflow.

Here the project is installed as cfn-init installs it (sandbox/agent_host.py: the real unit
files), /etc/sysconfig/airflow.env holds Airflow settings plus such hostile names, and:
- every long-running root agent unit (confapply, lifecycle watch, variables watch) is started
  and its main process's /proc/<pid>/environ holds no `AIRFLOW*` variable and none of the
  file's names, and no `sitecustomize` from the file's PYTHONPATH ran as root;
- the oneshot root units (env, variables) load no EnvironmentFile (`systemctl show`);
- the values still reach the child that needs them: variables watch's Airflow bridge, run as
  airflow, has the file's settings in its environment and imports the secret; the oneshot
  `variables sync` still imports through it.
"""

from __future__ import annotations

import json
from typing import Dict

import pytest

from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost
from tests.test_variables_systemd import API_PYTHON, STANDIN_PKG

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

ENV_FILE = "/etc/sysconfig/airflow.env"
SECRET_ID = "airflow/test/root-units-env"
DAEMONS = [
    "airflow-agent-confapply.service",
    "airflow-agent-lifecycle.service",
    "airflow-agent-variables-watch.service",
]
ONESHOTS = [
    "airflow-agent-env.service",
    "airflow-agent-variables.service",
    "airflow-agent-task-credentials.service",
]
MARKER = "aea-marker-4f2c9e"
EVIL = "/opt/aea-evil"
# a sitecustomize on the file's PYTHONPATH: any Python started with it says so, with its uid
SITECUSTOMIZE = """
import os, sys
sys.stderr.write("AEA-SITECUSTOMIZE uid=%d\\n" % os.getuid())
sys.stderr.flush()
"""


def _file_values(agent_config: str) -> Dict[str, str]:
    return {
        "AIRFLOW_HOME": "/airflow",
        "AIRFLOW__CELERY__BROKER_URL": "redis://127.0.0.1:9/0",
        "AIRFLOW__CORE__AEA_MARKER": MARKER,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://u:p@127.0.0.1:9/airflow",
        # what a parameter writer would use to take over a root process that loaded the file
        "PYTHONPATH": EVIL,
        "LD_PRELOAD": f"{EVIL}/absent.so",
        "AIRFLOW_AGENT_CONFIG": agent_config,
    }


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server):
    aws_server.reset()
    imds_server.reset()
    with SystemdHost(tmp_path_factory.mktemp("root-units-env"), name="aea-rootenv") as h:
        config = {
            "role": {"override": "worker"},
            "variables": {"secret_id": SECRET_ID, "method": "api", "watch_interval": 1},
            "lifecycle": {"poll_interval": 1},
        }
        ah.prepare(h, aws_server, imds_server, config=config)
        # the Airflow interpreter for method api: a stand-in bridge (tests/test_variables_systemd)
        h.write_file("/opt/airflow/venv/bin/python", API_PYTHON, mode=0o755)
        for path, text in STANDIN_PKG.items():
            h.write_file(f"/opt/airflow/standin/{path}", text)
        h.write_file(f"{EVIL}/sitecustomize.py", SITECUSTOMIZE)
        # a valid agent config, so a unit that followed AIRFLOW_AGENT_CONFIG would still start
        h.write_file(f"{EVIL}/agent.yaml", ah.agent_yaml(config))
        values = _file_values(f"{EVIL}/agent.yaml")
        text = "".join(f'{k}="{v}"\n' for k, v in values.items())
        h.write_file(ENV_FILE, text, mode=0o640, owner="root:airflow")
        aws_server.client("secretsmanager").create_secret(
            Name=SECRET_ID, SecretString=json.dumps({"rv1": "root-env-value-1"})
        )
        yield h


def _environ(host: SystemdHost, pid: int) -> Dict[str, str]:
    blob = host.read_file(f"/proc/{pid}/environ")
    out = {}
    for item in blob.split(b"\0"):
        if item:
            k, _, v = item.decode("utf-8", "surrogateescape").partition("=")
            out[k] = v
    return out


def _bridge_pids(host: SystemdHost) -> list:
    text = host.read_file("/airflow/stand-in-bridge.jsonl").decode()
    return [json.loads(line)[0] for line in text.splitlines()]


@pytest.mark.parametrize("unit", DAEMONS)
def test_root_daemon_environment_holds_nothing_from_the_env_file(host, unit):
    names = set(_file_values("-"))
    assert host.unit_property(unit, "User") == ""  # root: the units this is about
    cursor = host.journal_cursor()
    proc = host.systemctl("start", unit, check=False)  # Type=notify: returns after READY=1
    journal = host.journal(unit, since_cursor=cursor)
    assert proc.returncode == 0, journal
    host.wait_active(unit)
    pid = host.main_pid(unit)
    assert pid > 0
    env = _environ(host, pid)
    assert env, f"{unit}: empty environ for pid {pid}"
    leaked = sorted(k for k in env if k.startswith("AIRFLOW") or k in names)
    assert leaked == [], f"{unit} (pid {pid}) got {leaked} from {ENV_FILE}"
    assert MARKER not in "\0".join(env.values())
    journal = host.journal(unit, since_cursor=cursor)
    assert "AEA-SITECUSTOMIZE uid=0" not in journal, journal
    assert host.unit_property(unit, "EnvironmentFiles") == ""


def test_the_airflow_bridge_alone_gets_the_files_values(host):
    """variables watch (root) hands the file's values to its bridge, which runs as airflow."""
    unit = "airflow-agent-variables-watch.service"
    if host.unit_property(unit, "ActiveState") != "active":
        host.systemctl("start", unit)
    host.wait_for(
        lambda: "imported" in host.unit_property(unit, "StatusText"), 30, "the first import"
    )
    stored = json.loads(host.read_file("/airflow/api-variables.json"))
    assert stored["rv1"] == ["root-env-value-1", None]
    airflow_uid = int(host.run(["id", "-u", "airflow"]).stdout)
    pid = _bridge_pids(host)[-1]
    status = host.read_file(f"/proc/{pid}/status").decode()
    assert f"Uid:\t{airflow_uid}\t" in status
    env = _environ(host, pid)
    assert env["AIRFLOW__CORE__AEA_MARKER"] == MARKER
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:9/0"
    assert "NOTIFY_SOCKET" not in env
    # the daemon's own environment still holds none of it
    assert "AIRFLOW__CORE__AEA_MARKER" not in _environ(host, host.main_pid(unit))
    host.systemctl("stop", unit)


@pytest.mark.parametrize("unit", ONESHOTS)
def test_root_oneshot_units_load_no_environment_file(host, unit):
    assert host.unit_property(unit, "User") == ""
    assert host.unit_property(unit, "EnvironmentFiles") == ""
    lines = host.systemctl("cat", unit).stdout.splitlines()
    assert not [x for x in lines if x.strip().startswith("EnvironmentFile")]


def test_variables_oneshot_still_imports_through_airflow(host, aws_server):
    sm = aws_server.client("secretsmanager")
    sm.put_secret_value(SecretId=SECRET_ID, SecretString=json.dumps({"rv1": "root-env-value-2"}))
    unit = "airflow-agent-variables.service"
    cursor = host.journal_cursor()
    proc = host.systemctl("start", unit, check=False)
    journal = host.journal(unit, since_cursor=cursor)
    assert proc.returncode == 0, journal
    stored = json.loads(host.read_file("/airflow/api-variables.json"))
    assert stored["rv1"] == ["root-env-value-2", None]
    assert "AEA-SITECUSTOMIZE uid=0" not in journal
