"""Pure core of the worker database user: what a Celery worker may do in the metadata DB.

In Airflow 3 a task never opens the metadata database: it talks to the api-server's execution
API. What the worker process itself still writes is Celery's result backend (`[celery]
result_backend`, by default `db+` + sql_alchemy_conn): the `celery_taskmeta` and
`celery_tasksetmeta` tables and their id sequences, which the scheduler's executor reads back.
So the worker's user gets exactly those, plus SELECT on `alembic_version` (the first boot's
`airflow db check-migrations` reads it) and on `log_template` (every DB-checking Airflow CLI
command reads its last row at start, e.g. the DAG import check a deployment's AfterInstall
runs on the worker; measured on Airflow 3.3.2: "permission denied for table log_template"
without it; the rows are the log file name templates, no secret), and INSERT into the audit
`log` (the worker's CLI records its start; measured on Airflow 3.3.2: without it, "permission
denied for table log" at every start), and nothing else: not the connection, variable or
task-instance tables the master user owns.

`SETUP_SCRIPT` runs in the Airflow venv's python (it has SQLAlchemy, psycopg2 and Celery), as a
user that holds no secret on disk: it reads {"url", "user", "password"} as JSON on stdin, creates
Celery's tables with Celery's own models (a limited user could not: no CREATE in the schema),
creates or updates the role, and grants `grant_statements(user)`. Idempotent.
"""

from __future__ import annotations

import re
from typing import List

CELERY_TABLES = ("celery_taskmeta", "celery_tasksetmeta")
CELERY_SEQUENCES = ("task_id_sequence", "taskset_id_sequence")
READ_TABLES = ("alembic_version", "log_template")
# the audit log: `airflow celery worker` records its own start there (cli_action_loggers);
# INSERT only (+ the id it RETURNs), so a task can neither read nor change the audit trail
AUDIT_TABLE, AUDIT_SEQUENCE = "log", "log_id_seq"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_user(user: str) -> str:
    """A role name safe to put in SQL unquoted (lower-case letters, digits, _)."""
    if not _IDENT.match(user) or user in ("postgres", "public", "rdsadmin"):
        raise ValueError(f"not a usable database user name: {user!r}")
    return user


def grant_statements(user: str) -> List[str]:
    """GRANTs for the worker's user, after REVOKE of whatever it held (idempotent)."""
    u = check_user(user)
    return [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {u}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {u}",
        f"GRANT USAGE ON SCHEMA public TO {u}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(CELERY_TABLES)} TO {u}",
        f"GRANT USAGE, SELECT ON SEQUENCE {', '.join(CELERY_SEQUENCES)} TO {u}",
        f"GRANT SELECT ON {', '.join(READ_TABLES)} TO {u}",
        f"GRANT INSERT, SELECT (id) ON {AUDIT_TABLE} TO {u}",
        f"GRANT USAGE ON SEQUENCE {AUDIT_SEQUENCE} TO {u}",
    ]


SETUP_SCRIPT = r"""
import json, sys
from celery.backends.database.session import SessionManager
import sqlalchemy as sa

req = json.load(sys.stdin)
engine = sa.create_engine(req["url"].removeprefix("db+"))
SessionManager().prepare_models(engine)  # Celery's result tables, as Celery makes them
raw = engine.raw_connection()
try:
    cur = raw.cursor()
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (req["user"],))
    verb = "ALTER" if cur.fetchone() else "CREATE"
    # DDL takes no bind parameters: the driver quotes the password as a literal
    cur.execute(verb + " ROLE " + req["user"] + " LOGIN PASSWORD %s", (req["password"],))
    for stmt in req["grants"]:
        cur.execute(stmt)
    raw.commit()
finally:
    raw.close()
done = {"ALTER": "updated", "CREATE": "created"}[verb]
print("worker database user %s %s, %d grants" % (req["user"], done, len(req["grants"])))
"""
