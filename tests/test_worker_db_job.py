"""`airflow-agent worker-db-user` (agent/jobs/worker_db/job.py) against moto, without Postgres.

The master URL comes from the env file the way Airflow reads it (here the template's form:
AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_SECRET through the Secrets Manager backend), the worker's
user from its own secret; both reach the setup script only as JSON on stdin, run as a non-root
user (a stand-in interpreter records what it got). No secret in argv, environment or log.
tests/test_worker_db_user_airflow.py runs the real script on real PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from agent.config import config_from_dict
from agent.errors import AgentError, ConfigError
from agent.jobs.worker_db import job
from agent.jobs.worker_db.config import WorkerDbConfig, check_worker_db, user_from_secret
from agent.jobs.worker_db.plan import grant_statements

MASTER = "postgresql+psycopg2://airflow:m4sterpw0rd@db.example:5432/airflow"
WORKER_PW = "w0rkerpassw0rd9"
STANDIN = """#!{python}
import json, os, sys
data = sys.stdin.read()
with open(os.path.join({out!r}, "got.json"), "w") as f:
    json.dump({{"stdin": data, "argv": sys.argv, "env": dict(os.environ), "uid": os.getuid()}}, f)
print("worker database user airflow_worker created, 8 grants")
"""


@pytest.fixture
def shared_dir():
    """A directory user nobody can reach (pytest's tmp_path is under root's 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="aea-wdb-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def setup(tmp_path, aws, shared_dir):
    sm = aws.client("secretsmanager")
    sm.create_secret(Name="airflow/test/config/sql_alchemy_conn", SecretString=MASTER)
    sm.create_secret(
        Name="airflow/test/db-worker",
        SecretString=json.dumps({"username": "airflow_worker", "password": WORKER_PW}),
    )
    env_file = tmp_path / "airflow.env"
    kwargs = json.dumps({"config_prefix": "airflow/test/config", "region_name": "us-east-1"})
    env_file.write_text(
        'AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_SECRET="sql_alchemy_conn"\n'
        'AIRFLOW__SECRETS__BACKEND="airflow.providers.amazon.aws.secrets.secrets_manager.'
        'SecretsManagerBackend"\n'
        f"AIRFLOW__SECRETS__BACKEND_KWARGS='{kwargs}'\n"
    )
    out = shared_dir / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    python = shared_dir / "python"
    python.write_text(STANDIN.format(python="/usr/bin/python3", out=str(out)))
    os.chmod(python, 0o755)
    cfg = config_from_dict(
        {"cluster": "test", "state_dir": str(tmp_path / "state"), "env": {"file": str(env_file)}}
    )
    cfg.worker_db = WorkerDbConfig(
        secret_id="airflow/test/db-worker", python=str(python), user="nobody"
    )
    return cfg, out


def test_the_setup_gets_master_and_worker_credentials_on_stdin_only(setup, caplog):
    caplog.set_level("INFO", logger="agent")
    cfg, out = setup
    assert job.run(argparse.Namespace(), cfg) == 0
    got = json.loads((out / "got.json").read_text())
    assert got["uid"] == 65534  # nobody, not root
    req = json.loads(got["stdin"])
    assert req == {
        "url": MASTER,
        "user": "airflow_worker",
        "password": WORKER_PW,
        "grants": grant_statements("airflow_worker"),
    }
    visible = json.dumps([got["argv"], got["env"]]) + caplog.text
    for secret in (WORKER_PW, "m4sterpw0rd"):
        assert secret not in visible
    assert "worker database user airflow_worker created" in caplog.text


def test_nothing_to_do_without_a_secret(setup):
    cfg, out = setup
    cfg.worker_db.secret_id = None
    assert job.run(argparse.Namespace(), cfg) == 0
    assert not (out / "got.json").exists()


def test_a_failing_setup_is_an_error(setup, shared_dir):
    cfg, _ = setup
    bad = shared_dir / "bad-python"
    bad.write_text("#!/bin/sh\necho 'FATAL: role cannot be created' >&2\nexit 1\n")
    os.chmod(bad, 0o755)
    cfg.worker_db.python = str(bad)
    with pytest.raises(AgentError, match="setup failed: FATAL: role cannot be created"):
        job.run(argparse.Namespace(), cfg)


def test_root_is_refused(setup):
    cfg, _ = setup
    cfg.worker_db.user = "root"
    with pytest.raises(ConfigError, match="uid 0"):
        job.run(argparse.Namespace(), cfg)


@pytest.mark.parametrize(
    "secret", [{}, {"username": "airflow_worker"}, {"username": "x;drop", "password": "p"}]
)
def test_bad_worker_secrets_are_refused(secret):
    with pytest.raises(ValueError):
        user_from_secret(secret)


def test_section_checks():
    assert check_worker_db(WorkerDbConfig()) is None
    assert check_worker_db(WorkerDbConfig(user="root"))[0] == "worker_db.user"
    assert check_worker_db(WorkerDbConfig(python="python3"))[0] == "worker_db.python"
    assert check_worker_db(WorkerDbConfig(timeout=0))[0] == "worker_db.timeout"
