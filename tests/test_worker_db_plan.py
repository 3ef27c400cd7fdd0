"""The worker database user's grants (agent/jobs/worker_db/plan.py), without a database.

tests/test_worker_db_user_airflow.py proves them on real PostgreSQL with real Airflow tasks;
here: names that could inject SQL are refused, and the grants name only what a worker needs.
"""

from __future__ import annotations

import re

import pytest

from agent.jobs.worker_db.plan import SETUP_SCRIPT, check_user, grant_statements


@pytest.mark.parametrize(
    "bad", ["", "Airflow", "a-b", "x; DROP TABLE connection", "postgres", "public", "a" * 64, "1a"]
)
def test_unusable_user_names_are_refused(bad):
    with pytest.raises(ValueError):
        check_user(bad)


def test_grants_are_revoked_then_given_on_celery_tables_only():
    stmts = grant_statements("airflow_worker")
    assert stmts[0].startswith("REVOKE ALL ON ALL TABLES") and stmts[1].startswith("REVOKE ALL")
    tables = set()
    for s in stmts[2:]:
        m = re.match(r"GRANT (.+?) ON (?:SEQUENCE |SCHEMA )?(.+) TO airflow_worker$", s)
        assert m, s
        tables |= {t.strip() for t in m.group(2).split(",")}
    assert tables == {
        "public",
        "celery_taskmeta",
        "celery_tasksetmeta",
        "task_id_sequence",
        "taskset_id_sequence",
        "alembic_version",
        "log_template",
        "log",
        "log_id_seq",
    }
    assert "GRANT INSERT, SELECT (id) ON log TO airflow_worker" in stmts  # no reading the audit


def test_the_setup_script_takes_its_secrets_on_stdin_only():
    compile(SETUP_SCRIPT, "<setup>", "exec")
    assert "sys.stdin" in SETUP_SCRIPT and "sys.argv" not in SETUP_SCRIPT
    assert "os.environ" not in SETUP_SCRIPT
