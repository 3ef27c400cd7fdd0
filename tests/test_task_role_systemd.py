"""Tasks lose the instance's powers (issue 12 item 5), on the real systemd test host.

The project is installed as cfn-init installs it (sandbox/agent_host.py: the real unit files),
and the instance metadata service is where it is on EC2: the rig's strict IMDSv2 server served
at 169.254.169.254:80 inside the host (SystemdHost.serve_link_local), handing out the instance
role's credentials. The embedded AWS (moto, real HTTP) holds the task role agent.yaml names.
- The real `airflow-agent task-credentials` oneshot, pulled in by the worker unit's start,
  reaches that IMDS (region, instance id, the instance role's credentials: its requests are in
  the IMDS server's log), assumes the task role and writes /run/airflow-aws/credentials.json
  root:airflow 0640; `status --json` shows the role and expiry, never a key.
- A task process of the real airflow-worker unit (its ExecStartPost, same cgroup, user and
  sandbox as the worker's tasks) cannot open a TCP connection to 169.254.169.254:80, while the
  same probe in a unit without the worker's IPAddressDeny= reaches it (so the probe can tell).
- That task's boto3, configured by nothing but the unit's environment, gets its credentials
  from the agent's credential_process and its STS caller identity is the task role's session.

The rig's own variables (AWS_ACCESS_KEY_ID for moto in DefaultEnvironment) are unset for the
two units involved, so credentials come only from where they come on an instance.
"""

from __future__ import annotations

import json

import pytest

from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

WORKER = "airflow-worker.service"
CREDS_UNIT = "airflow-agent-task-credentials.service"
TASK_ROLE = "airflow-test-task"
PROBE_PATH = "/usr/local/lib/aea-task-probe.py"
PROBE_OUT = "/airflow/standin/task-probe.json"
# A "task": tries IMDS on the wire, then asks STS who it is with whatever boto3 finds.
PROBE = r"""
import json, os, socket, sys
out = {"uid": os.getuid()}
try:
    socket.create_connection(("169.254.169.254", 80), timeout=3).close()
    out["imds"] = "connected"
except OSError as exc:
    out["imds"] = "refused: %r" % (exc,)
if "--imds-only" not in sys.argv:
    try:
        import boto3
        session = boto3.session.Session()
        creds = session.get_credentials()
        out["method"] = creds.method if creds else None
        out["region"] = session.region_name
        out["arn"] = session.client("sts").get_caller_identity()["Arn"]
    except Exception as exc:
        out["error"] = "%s: %s" % (type(exc).__name__, exc)
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    json.dump(out, f)
os.replace(path + ".tmp", path)
"""
# as on EC2: the agent's instance credentials come from IMDS at the link-local address
CREDS_DROPIN = """[Service]
UnsetEnvironment=AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SHARED_CREDENTIALS_FILE AWS_CONFIG_FILE
Environment=AWS_EC2_METADATA_SERVICE_ENDPOINT=http://169.254.169.254/
"""
# the worker unit as shipped (stand-in ExecStart from agent_host) plus a task-like probe; the
# boot gate is not what this test is about, so it is open
WORKER_DROPIN = f"""[Service]
UnsetEnvironment=AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_EC2_METADATA_SERVICE_ENDPOINT
ExecCondition=
ExecStartPost=/opt/airflow-agent/venv/bin/python {PROBE_PATH} {PROBE_OUT}
"""


@pytest.fixture(scope="module")
def task_role_arn(aws_server):
    aws_server.reset()
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    role = aws_server.client("iam").create_role(
        RoleName=TASK_ROLE, AssumeRolePolicyDocument=json.dumps(trust)
    )
    return role["Role"]["Arn"]


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server, task_role_arn):
    imds_server.reset()
    with SystemdHost(tmp_path_factory.mktemp("task-role"), name="aea-taskrole") as h:
        config = {
            "role": {"override": "worker"},
            "task_credentials": {"role_arn": task_role_arn},
            "imds": {"endpoint": "http://169.254.169.254/"},
        }
        ah.prepare(h, aws_server, imds_server, config=config)
        assert h.serve_link_local(imds_server.port) == "http://169.254.169.254:80"
        h.write_file(
            "/etc/sysconfig/airflow.env",
            'AIRFLOW_HOME="/airflow"\n',
            mode=0o640,
            owner="root:airflow",
        )
        h.write_file(PROBE_PATH, PROBE, mode=0o755)
        h.write_file(f"/etc/systemd/system/{CREDS_UNIT}.d/50-imds.conf", CREDS_DROPIN)
        h.write_file(f"/etc/systemd/system/{WORKER}.d/60-task-probe.conf", WORKER_DROPIN)
        h.systemctl("daemon-reload")
        cursor = h.journal_cursor()
        proc = h.systemctl("start", WORKER, check=False)
        journal = h.journal(CREDS_UNIT, since_cursor=cursor) + h.journal(
            WORKER, since_cursor=cursor
        )
        assert proc.returncode == 0, journal
        h.wait_active(WORKER)
        yield h


def _probe(host: SystemdHost) -> dict:
    return json.loads(host.wait_for(lambda: _read(host, PROBE_OUT), 30, "the task probe"))


def _read(host: SystemdHost, path: str):
    proc = host.run(["cat", path], check=False)
    return proc.stdout if proc.returncode == 0 else None


def test_the_agent_unit_reaches_imds_and_writes_the_task_credentials(host, imds_server):
    assert host.unit_property(CREDS_UNIT, "Result") == "success"
    # the agent found the region, instance id and its role's credentials at 169.254.169.254
    paths = [e["path"] for e in imds_server.log() if e["status"] == 200]
    assert any("iam/security-credentials/" in p for p in paths), paths
    assert any(p.rstrip("/").endswith("placement/region") for p in paths), paths
    st = host.run(["stat", "-c", "%a %U %G", "/run/airflow-aws/credentials.json"]).stdout
    assert st.strip() == "640 root airflow"
    config = host.read_file("/run/airflow-aws/config").decode()
    assert "credential_process = /usr/bin/cat /run/airflow-aws/credentials.json" in config


def test_a_task_cannot_reach_imds_and_acts_as_the_task_role(host, task_role_arn):
    got = _probe(host)
    airflow_uid = int(host.run(["id", "-u", "airflow"]).stdout)
    assert got["uid"] == airflow_uid
    assert got["imds"].startswith("refused"), got
    assert "error" not in got, got
    assert got["method"] == "custom-process"  # the agent's credential_process, nothing else
    assert got["region"] == "us-east-1"
    assert got["arn"] == (
        f"arn:aws:sts::123456789012:assumed-role/{TASK_ROLE}/airflow-test-i-0123456789abcdef0"
    )


def test_the_probe_reaches_imds_from_a_unit_without_the_deny(host):
    """The control: the same probe, as airflow, in a unit without IPAddressDeny=."""
    out = "/airflow/standin/control-probe.json"
    host.run(
        [
            "systemd-run",
            "--wait",
            "--pipe",
            "-q",
            "-p",
            "User=airflow",
            "/opt/airflow-agent/venv/bin/python",
            PROBE_PATH,
            out,
            "--imds-only",
        ]
    )
    assert json.loads(host.read_file(out))["imds"] == "connected"


def test_status_shows_the_role_and_expiry_never_a_key(host, aws_server, imds_server, task_role_arn):
    creds = json.loads(host.read_file("/run/airflow-aws/credentials.json"))
    status = ah.agent(host, aws_server, imds_server, "status", "--json").stdout
    doc = json.loads(status)["task_credentials"]
    assert doc["role_arn"] == task_role_arn
    assert isinstance(doc["expiration"], (int, float)) and doc["last_result"] == "refreshed"
    journal = host.journal(CREDS_UNIT)
    state = host.read_file("/var/lib/airflow-agent/task-credentials.json").decode()
    for text in (status, journal, state):
        assert creds["SecretAccessKey"] not in text
        assert creds["SessionToken"] not in text
        assert creds["AccessKeyId"] not in text
