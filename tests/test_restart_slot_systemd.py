"""The restart slot from the real confapply unit, under its shipped sandbox, on a systemd test
host: the co-process runs as user airflow in the Airflow venv's python and reaches a real
PostgreSQL 15 (on the machine's loopback, bridged into the host) with the env file's URL.

While the test holds the scheduler role's one slot (same cluster, same database), a config
change makes confapply wait (journal: `waiting (all 1 slot(s) busy)`) and restart nothing;
once the test lets go, confapply holds the slot, restarts the role's units inside its `held` /
`released` lines, and the journal's own timestamps show it held only after the test released.

Rig only (a drop-in, nothing in systemd/ changes): this machine's Python lives under
/root/.pyenv, so the confapply unit gets `ProtectHome=no` and /root is made traversable inside
the host's overlay, as sandbox/airflow_cluster.py does for the Airflow units.
"""

from __future__ import annotations

import json
import time

import pytest

from agent.airflow.restart_slot import restart_slot
from agent.config import config_from_dict
from agent.platform.envfile import encode_env, parse_env
from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]

UNITS = ["airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
CONFAPPLY = "airflow-agent-confapply.service"
ENV_FILE = "/etc/sysconfig/airflow.env"


@pytest.fixture(scope="module")
def rig(tmp_path_factory, aws_server, imds_server, ssm):
    from sandbox.airflow_cluster import Postgres

    pg = Postgres().start()
    try:
        aws_server.reset()
        imds_server.reset()
        ah.put_params(
            ssm,
            {
                "FOO": "initial",
                "STANDIN_READY_DELAY": "0",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url,
            },
        )
        with SystemdHost(tmp_path_factory.mktemp("slot-host"), name="aea-slot") as h:
            ah.prepare(h, aws_server, imds_server, {"coordination": {"poll_interval": 0.3}})
            h.bridge_port(pg.port)
            ah.give_airflow_venv(h, CONFAPPLY)
            ah.agent(h, aws_server, imds_server, "bootstrap", "--role", "scheduler")
            for u in UNITS:
                h.wait_active(u)
            h.wait_active(CONFAPPLY)
            yield h, pg
    finally:
        pg.stop()


def test_confapply_waits_for_the_slot_and_restarts_only_once_it_holds_it(rig, tmp_path):
    from sandbox.airflow_cluster import AIRFLOW_VENV

    host, pg = rig
    env = parse_env(host.read_file(ENV_FILE))
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == pg.url
    # the test holds the slot from the machine: the same database, the host's cluster name
    (tmp_path / "airflow.env").write_bytes(
        encode_env({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url})
    )
    agent_yaml = json.loads(host.read_file("/etc/airflow-agent/agent.yaml"))
    cfg = config_from_dict(
        {
            "cluster": agent_yaml["cluster"],
            "env": {"file": str(tmp_path / "airflow.env")},
            "coordination": {"python": str(AIRFLOW_VENV / "bin" / "python"), "user": None},
        }
    )
    cursor = host.journal_cursor()
    with restart_slot(cfg, "scheduler", "the-test") as mine:
        assert (mine.index, mine.uncoordinated) == (0, False)
        host.write_file(
            ENV_FILE, encode_env({**env, "FOO": "changed"}), mode=0o640, owner="root:airflow"
        )
        host.wait_for(
            lambda: (
                "restart slot scheduler: waiting (all 1 slot(s) busy)"
                in host.journal(CONFAPPLY, since_cursor=cursor)
            ),
            60,
            "confapply to wait for the scheduler's slot",
            interval=0.2,
        )
        # confapply is blocked in the wait: nothing restarted
        for u in UNITS:
            assert ah_starts(host, cursor, u) == 0
        released_at = time.time()
    host.wait_for(
        lambda: "released (held" in host.journal(CONFAPPLY, since_cursor=cursor),
        60,
        "confapply to hold the slot, restart and release it",
        interval=0.2,
    )
    lines = host.journal(CONFAPPLY, since_cursor=cursor, output="short-unix").splitlines()

    def first(text: str) -> float:
        return next(float(line.split()[0]) for line in lines if text in line)

    held = first("restart slot scheduler 0/1 held (waited ")
    released = first("restart slot scheduler 0/1 released (held ")
    assert held >= released_at
    for u in UNITS:
        assert held <= first(f"restarting {u}") and first(f"{u} restarted and active") <= released
        assert ah_starts(host, cursor, u) == 1
    assert "uncoordinated" not in host.journal(CONFAPPLY, since_cursor=cursor)


def ah_starts(host, cursor: str, unit: str) -> int:
    return host.journal(unit + ".service", since_cursor=cursor).count("(stand-in) pid")
