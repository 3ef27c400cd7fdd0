"""`airflow-agent worker-db-user`: create or update the Celery workers' own database user.

Run as root on the scheduler role after `airflow db migrate` (the template's first boot). The
master URL is Airflow's own `[database] sql_alchemy_conn`, read from the env file the way
Airflow reads it (plain, `_CMD` as airflow_config.command_user, `_SECRET` through the Secrets
Manager backend) with the instance role; the worker's user and password come from the
`worker_db.secret_id` secret. Both go, as JSON on stdin (never argv, environment or a file),
to agent.jobs.worker_db.plan.SETUP_SCRIPT run by the Airflow venv's python as
`worker_db.user` (not root). Nothing secret is logged; the script's one line of output is.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from agent.airflow.option_sources import sql_alchemy_conn
from agent.errors import AgentError, ConfigError
from agent.jobs.worker_db.config import user_from_secret
from agent.jobs.worker_db.plan import SETUP_SCRIPT, grant_statements
from agent.logs import register_secrets
from agent.platform import process
from agent.platform.aws import AwsClients
from agent.platform.process import RunAs

log = logging.getLogger(__name__)

SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """No options: everything comes from agent.yaml (worker_db) and the env file."""


def _master_url(cfg: Any) -> str:
    url = sql_alchemy_conn(cfg)
    if url is None:
        raise AgentError(f"{cfg.env.file} gives no [database] sql_alchemy_conn in any form")
    return url


def _worker_user(cfg: Any) -> tuple:
    answer = (
        AwsClients(cfg).client("secretsmanager").get_secret_value(SecretId=cfg.worker_db.secret_id)
    )
    try:
        secret = json.loads(answer.get("SecretString") or "")
    except ValueError:
        raise AgentError(f"secret {cfg.worker_db.secret_id} is not JSON") from None
    try:
        user, password = user_from_secret(secret if isinstance(secret, dict) else {})
    except ValueError as exc:
        raise AgentError(f"secret {cfg.worker_db.secret_id}: {exc}") from None
    register_secrets([password])
    return user, password


def run(args: argparse.Namespace, cfg: Any) -> int:
    wd = cfg.worker_db
    if wd.secret_id is None:
        log.info("worker_db.secret_id is not set: no worker database user to manage")
        return 0
    try:
        run_as = RunAs.lookup(wd.user)
    except KeyError as exc:
        raise ConfigError(f"{cfg.source}: key 'worker_db.user': {exc.args[0]}") from None
    if run_as.uid == 0:
        raise ConfigError(f"{cfg.source}: key 'worker_db.user' is uid 0; it must not be root")
    master = _master_url(cfg)
    user, password = _worker_user(cfg)
    request = {"url": master, "user": user, "password": password, "grants": grant_statements(user)}
    result = process.run(
        [wd.python, "-c", SETUP_SCRIPT],
        timeout=wd.timeout,
        env={"PATH": SERVICE_PATH, "HOME": run_as.home, "USER": wd.user, "LANG": "C.UTF-8"},
        user=run_as,
        umask=0o077,
        cwd="/",
        input=json.dumps(request).encode(),
        die_with_parent=True,
        label=f"the worker database user's setup (as {wd.user})",
    )
    if result.returncode != 0:
        # the driver's messages may quote the statement, never the password (a bound value)
        tail = (result.stderr.strip().splitlines() or [""])[-1][:300]
        raise AgentError(f"the worker database user's setup failed: {tail}")
    log.info("%s", result.stdout.strip())
    return 0
