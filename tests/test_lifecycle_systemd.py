"""`lifecycle watch` as the product's unit (systemd/airflow-agent-lifecycle.service, Type=notify,
its hardening) in the real systemd test host, draining a real Celery worker that runs as
`airflow-worker.service` (sandbox/celery_worker_host.py), with IMDS and Auto Scaling bridged
into the host's network namespace. The drain's `systemctl stop airflow-worker` is the real one.

The unit is installed as shipped plus a test drop-in that only changes what must differ in a
test: ExecStart (this tree's venv and a test agent.yaml), the endpoints, PrivateTmp=no (the
test's shared directory lives under /tmp, which PrivateTmp would hide) and
ProtectHome=read-only (this venv's interpreter lives under /root/.pyenv).
"""

from __future__ import annotations

import json

import pytest

from sandbox.celery_worker_host import NODE, REPO, VENV_PY, CeleryWorkerHost
from sandbox.lifecycle import make_asg
from sandbox.proc import wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(240)]

UNIT = "airflow-agent-lifecycle.service"
HOOK = "drain-on-terminate"
GROUP = "airflow-workers"
STATE = "/var/lib/airflow-agent/lifecycle.json"


@pytest.fixture(scope="module")
def rig(tmp_path_factory, aws_server, imds_server):
    w = CeleryWorkerHost(tmp_path_factory.mktemp("lifecycle-shared"), queues="default")
    w.start()
    try:
        w.host.bridge_port(aws_server.port)
        w.host.bridge_port(imds_server.port)
        w.host.write_file(
            f"/etc/systemd/system/{UNIT}",
            (REPO / "systemd" / UNIT).read_text(),
        )
    except BaseException:
        w.stop()
        raise
    yield w
    w.stop()


def _install(rig, aws_server, imds_server) -> None:
    cfg = {
        "cluster": "test",
        "state_dir": "/var/lib/airflow-agent",
        "env": {"file": str(rig.env_file), "ssm_paths": ["/airflow/test/"]},
        "drain": {"node_name": NODE, "poll_interval": 0.5, "timeout": 120},
        "lifecycle": {"hook_name": HOOK, "poll_interval": 0.5},
    }
    config = rig.shared / "lifecycle-agent.yaml"
    config.write_text(json.dumps(cfg))
    env = {
        "PYTHONPATH": str(REPO),
        "AWS_ENDPOINT_URL": aws_server.url,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds_server.url + "/",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
    dropin = "[Service]\nExecStart=\n"
    dropin += f"ExecStart={VENV_PY} -m agent --config {config} lifecycle watch\n"
    dropin += "".join(f"Environment={k}={v}\n" for k, v in env.items())
    dropin += "PrivateTmp=no\n"
    # this tree's venv links to a pyenv interpreter under /root (an instance's is /usr/bin)
    dropin += "ProtectHome=read-only\n"
    rig.host.write_file(f"/etc/systemd/system/{UNIT}.d/test.conf", dropin)
    rig.host.systemctl("daemon-reload")


def _state(rig) -> dict:
    try:
        return json.loads(rig.host.read_file(STATE))
    except Exception:  # not written yet
        return {}


def test_unit_drains_real_worker_heartbeats_and_completes_once(
    rig, aws, imds, aws_server, imds_server
):
    make_asg(aws, imds, HOOK, GROUP, heartbeat_timeout=6)
    rig.fresh()
    _install(rig, aws_server, imds_server)
    rig.submit("a", 6)
    rig.submit("b", 6)
    rig.started(2)
    # Type=notify: `systemctl start` returns once the watch has polled and sent READY=1
    started = rig.host.systemctl("start", UNIT, check=False)
    assert started.returncode == 0, rig.host.journal(UNIT)
    assert rig.host.unit_property(UNIT, "ActiveState") == "active"
    assert _state(rig).get("last_poll")
    imds.set_paths({"meta-data/autoscaling/target-lifecycle-state": "Terminated"})
    try:
        wait_for(lambda: _state(rig).get("phase") == "done", 60, "the drain to finish", 0.2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{rig.host.journal(UNIT)}") from None
    journal = rig.host.journal(UNIT)
    done = [a for a in aws.lifecycle_actions() if a["action"] == "CompleteLifecycleAction"]
    hbs = [a for a in aws.lifecycle_actions() if a["action"] == "RecordLifecycleActionHeartbeat"]
    assert len(done) == 1, journal
    assert done[0]["params"]["LifecycleActionResult"] == "CONTINUE"
    ends = [rig.times(k, "end")[0] for k in ("a", "b")]
    assert done[0]["time"] > max(ends)
    assert len(hbs) >= 2
    assert rig.active_state() == "inactive"  # the real `systemctl stop airflow-worker`
    recs = rig.records()
    assert recs == {"a": ["start", "end"], "b": ["start", "end"]}
    assert "CompleteLifecycleAction(CONTINUE) sent" in journal
    # STATUS= reached systemd
    status = rig.host.unit_property(UNIT, "StatusText")
    assert status.startswith("done"), status
    rig.host.systemctl("stop", UNIT)
