"""The stand-ins of RDS, ElastiCache and the ALB (sandbox/stack/standins.py), from the template.

Configured from the template's resolved properties (the secrets' values filled in as the
launch's create_in_aws would), reached from a systemd test host on the private link by the
template's own endpoint names and URLs:
- the database by the DbConnSecret URL (`sslmode=require`), with psycopg2 from the Airflow
  venv; a wrong password and a plain (non-TLS) connection are refused;
- the broker by the BrokerUrlSecret URL (`rediss://:token@...?ssl_cert_reqs=required`), with
  redis-py from the Airflow venv, trusting the sandbox CA through the system store; without the
  token, or without the CA in the store, it is refused;
- the load balancer forwards to both targets (one registered while it runs), and a target
  that fails its health check is taken out of service.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sandbox.airflow_cluster import AIRFLOW_VENV
from sandbox.proc import wait_for
from sandbox.stack.model import StackModel
from sandbox.stack.network import GATEWAY, Switch
from sandbox.stack.standins import ECHO_TARGET, Broker, LoadBalancer, Postgres
from sandbox.stack.tls import SandboxCa
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.airflow, pytest.mark.redis]

PY = str(AIRFLOW_VENV / "bin" / "python")
DB_CHECK = (
    "import sys, sqlalchemy\n"
    "e = sqlalchemy.create_engine(sys.stdin.read().strip())\n"
    "with e.connect() as c:\n"
    "    print(c.execute(sqlalchemy.text('select current_user, ssl from pg_stat_ssl "
    "where pid = pg_backend_pid()')).one())\n"
)
BROKER_CHECK = "import sys, redis\nprint(redis.Redis.from_url(sys.stdin.read().strip()).ping())\n"


@pytest.fixture(scope="module")
def model() -> StackModel:
    m = StackModel.load()
    # what create_in_aws records when it generates the two secrets
    m.secret_values[m.ref("DbMasterSecret")] = json.dumps(
        {"username": "airflow", "password": "dbPassw0rdOnlyLettersDigits"}
    )
    m.secret_values[m.ref("BrokerAuthSecret")] = json.dumps({"token": "T" * 64})
    return m


def _py(host: SystemdHost, code: str, stdin: str, check: bool = True) -> str:
    p = host.run([PY, "-c", code], input=stdin, check=check, timeout=60)
    return p.stdout + p.stderr


def test_database_and_broker_from_the_template(model: StackModel, tmp_path: Path) -> None:
    ca = SandboxCa(tmp_path / "ca").create()
    db_url = model.properties("DbConnSecret")["SecretString"]
    broker_url = model.properties("BrokerUrlSecret")["SecretString"]
    assert "sslmode=require" in db_url and broker_url.startswith("rediss://:TTTT")
    (tmp_path / "h").mkdir()
    with (
        Switch() as switch,
        Postgres.from_model(model, switch, ca) as db,
        Broker.from_model(model, switch, ca) as broker,
        SystemdHost(tmp_path / "h", name="aea-standins") as host,
    ):
        assert (db.user, db.dbname, db.port) == ("airflow", "airflow", 5432)
        assert (broker.port, broker.tls, broker.settings) == (
            6379,
            True,
            {"maxmemory-policy": "noeviction"},
        )
        switch.attach(host)
        names = " ".join(sorted(model.endpoints().values()))
        host.write_file("/etc/hosts", f"127.0.0.1 localhost\n{GATEWAY} {names}\n")
        assert _py(host, DB_CHECK, db_url).strip() == "('airflow', True)"
        wrong = db_url.replace("dbPassw0rd", "nope")
        assert "password authentication failed" in _py(host, DB_CHECK, wrong, check=False)
        plain = db_url.replace("sslmode=require", "sslmode=disable")
        assert "no encryption" in _py(host, DB_CHECK, plain, check=False)

        # the CA is not trusted yet: certificate verification fails
        assert "CERTIFICATE_VERIFY_FAILED" in _py(host, BROKER_CHECK, broker_url, check=False)
        host.write_file("/usr/local/share/ca-certificates/aea-sandbox-ca.crt", ca.cert.read_bytes())
        host.run(["update-ca-certificates"])
        assert _py(host, BROKER_CHECK, broker_url).strip() == "True"
        no_token = broker_url.replace("T" * 64, "")
        out = _py(host, BROKER_CHECK, no_token, check=False)
        assert "redis.exceptions.AuthenticationError" in out, out
        assert broker.cli("CONFIG", "GET", "maxmemory-policy").split() == [
            "maxmemory-policy",
            "noeviction",
        ]
    ca.remove()


def test_load_balancer_from_the_template(model: StackModel, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    lb_host = model.endpoint_host("LoadBalancer")
    with (
        Switch() as switch,
        SystemdHost(tmp_path / "a", name="aea-tg-a") as a,
        SystemdHost(tmp_path / "b", name="aea-tg-b") as b,
    ):
        addrs = [switch.attach(a), switch.attach(b)]
        for h, addr in ((a, addrs[0]), (b, addrs[1])):
            h.write_file("/etc/hosts", f"127.0.0.1 localhost\n{GATEWAY} {lb_host}\n")
            h.run(["systemd-run", "--unit", "api", "python3", "-c", ECHO_TARGET, h.name, addr])
        lb = LoadBalancer.from_model(model, switch, addrs[:1])
        cfg = lb.config()
        assert f"bind {GATEWAY}:80\n" in cfg
        assert "option httpchk GET /api/v2/monitor/health" in cfg
        assert "inter 15s rise 2 fall 3" in cfg and "timeout client 120s" in cfg
        assert f"server t0 {addrs[0]}:8080 check" in cfg
        lb.interval = 1  # the template's 15 s, shortened so the test sees a target go down
        with lb:
            lb.register(addrs[1])  # a webserver launched later joins the target group
            get = (
                "import urllib.request;print(urllib.request.urlopen('http://%s/').read().decode())"
            )
            seen = {a.run(["python3", "-c", get % lb_host]).stdout.strip() for _ in range(6)}
            assert seen == {"aea-tg-a", "aea-tg-b"}
            wait_for(lambda: lb.target_health() == dict.fromkeys(addrs, "UP"), 20, "both UP")
            b.systemctl("stop", "api.service")
            wait_for(lambda: lb.target_health()[addrs[1]] == "DOWN", 30, "b DOWN")
            seen = {a.run(["python3", "-c", get % lb_host]).stdout.strip() for _ in range(4)}
            assert seen == {"aea-tg-a"}
    assert (
        subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("br0")
        == 0
    )
