"""The `worker_db` section of agent.yaml: the Celery workers' own database user.

Pure (stdlib only) so agent.config can import it. Used on the scheduler role only, after
`airflow db migrate`: `airflow-agent worker-db-user` creates or updates the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from agent.jobs.worker_db.plan import check_user


@dataclass
class WorkerDbConfig:
    # Secrets Manager secret {"username": ..., "password": ...} of the worker's user (the
    # template's WorkerDbSecret); null: `worker-db-user` has nothing to do
    secret_id: Optional[str] = None
    # the Airflow venv's interpreter: it has SQLAlchemy, the Postgres driver and Celery
    python: str = "/opt/airflow/venv/bin/python"
    # who runs it (never root: the master URL comes from the env file's settings)
    user: str = "airflow"
    timeout: float = 300.0


def check_worker_db(wd: WorkerDbConfig) -> Optional[Tuple[str, str]]:
    """(dotted key, why) for the first bad key of the section, else None."""
    if not wd.python.startswith("/"):
        return "worker_db.python", f"must be an absolute path, got {wd.python!r}"
    if wd.user == "root":
        return "worker_db.user", "must not be root (it runs with settings from the env file)"
    if not wd.timeout > 0:
        return "worker_db.timeout", f"must be positive, got {wd.timeout}"
    return None


def user_from_secret(secret: dict) -> Tuple[str, str]:
    """(user, password) of the secret's JSON; ValueError naming what is wrong (no value)."""
    user, password = secret.get("username"), secret.get("password")
    if not isinstance(user, str) or not isinstance(password, str) or not password:
        raise ValueError("the secret must be JSON with string 'username' and 'password'")
    return check_user(user), password
