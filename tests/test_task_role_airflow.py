"""A real Airflow 3 task cannot reach IMDS and acts as the task role (issue 12 item 5).

sandbox/airflow_cluster.py (PostgreSQL, Redis, the project's units, Airflow 3.3 with the
amazon provider's boto3), the rig's IMDS served at 169.254.169.254:80 inside the host, and
agent.yaml naming a task role created in the embedded AWS. The worker unit is the shipped one
(the rig's fake AWS keys unset for it, as an instance has none; the boot gate open): the real
`airflow-agent task-credentials` oneshot runs before it starts, and a DAG task
- cannot open a TCP connection to 169.254.169.254:80 (the same probe from a unit without the
  worker's IPAddressDeny= connects);
- gets its boto3 credentials from the agent's credential_process, and its STS caller identity
  is the task role's session, not the instance.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.timeout(900)]

TASK_ROLE = "airflow-test-task"
PROBE = "/airflow/out/task-probe.json"
DAG = """
from __future__ import annotations

import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False)
def task_role_probe():
    @task
    def probe():
        import json, os, socket
        out = {"uid": os.getuid()}
        try:
            socket.create_connection(("169.254.169.254", 80), timeout=3).close()
            out["imds"] = "connected"
        except OSError as exc:
            out["imds"] = "refused: %r" % (exc,)
        try:
            import boto3
            session = boto3.session.Session()
            creds = session.get_credentials()
            out["method"] = creds.method if creds else None
            out["arn"] = session.client("sts").get_caller_identity()["Arn"]
        except Exception as exc:
            out["error"] = "%s: %s" % (type(exc).__name__, exc)
        os.makedirs("/airflow/out", exist_ok=True)
        with open("/airflow/out/task-probe.json", "w") as f:
            json.dump(out, f)

    probe()


task_role_probe()
"""
WORKER_DROPIN = """[Service]
# an instance has no AWS keys in its environment: only the unit's AWS_CONFIG_FILE remains
UnsetEnvironment=AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_EC2_METADATA_SERVICE_ENDPOINT
# the boot gate is not what this test is about
ExecCondition=
"""
CONTROL = (
    "import socket\n"
    "try:\n"
    "    socket.create_connection(('169.254.169.254', 80), timeout=3).close(); print('connected')\n"
    "except OSError as exc:\n"
    "    print('refused', exc)\n"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, aws_server, imds_server):
    from sandbox.airflow_cluster import AirflowCluster

    aws_server.reset()
    imds_server.reset()
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
    arn = aws_server.client("iam").create_role(
        RoleName=TASK_ROLE, AssumeRolePolicyDocument=json.dumps(trust)
    )["Role"]["Arn"]
    c = AirflowCluster(
        tmp_path_factory.mktemp("airflow-task-role"),
        aws_server,
        imds_server,
        worker_concurrency=1,
        agent_config={"task_credentials": {"role_arn": arn}},
    )
    c.start()
    try:
        c.host.serve_link_local(imds_server.port)
        c.host.write_file(
            "/etc/systemd/system/airflow-worker.service.d/60-task-role.conf", WORKER_DROPIN
        )
        c.host.systemctl("daemon-reload")
        c.start_core()
        yield c
    finally:
        c.stop()


def test_a_real_task_cannot_reach_imds_and_acts_as_the_task_role(cluster):
    c = cluster
    c.host.write_file("/airflow/dags/task_role_probe.py", DAG, owner="airflow:airflow")
    c.wait_dag("task_role_probe", timeout=180)
    cursor = c.host.journal_cursor()
    c.host.systemctl("start", "airflow-worker.service")
    c.host.wait_active("airflow-worker", 60)
    units = c.host.journal("airflow-agent-task-credentials", since_cursor=cursor)
    assert c.host.unit_property("airflow-agent-task-credentials.service", "Result") == "success", (
        units
    )
    c.trigger("task_role_probe", "probe-1")
    state = c.wait_run("task_role_probe", "probe-1", timeout=300)
    assert state == "success", c.host.journal("airflow-worker", since_cursor=cursor)[-4000:]
    got = json.loads(c.host.read_file(PROBE))
    assert got["uid"] == int(c.host.run(["id", "-u", "airflow"]).stdout)
    assert got["imds"].startswith("refused"), got
    assert "error" not in got, got
    assert got["method"] == "custom-process", got
    assert got["arn"].startswith(
        f"arn:aws:sts::123456789012:assumed-role/{TASK_ROLE}/airflow-test-"
    )


def test_the_same_probe_reaches_imds_outside_the_airflow_units(cluster):
    out = cluster.host.run(
        ["systemd-run", "--wait", "--pipe", "-q", "-p", "User=airflow", "python3", "-c", CONTROL]
    )
    assert out.stdout.strip() == "connected", out.stdout + out.stderr
