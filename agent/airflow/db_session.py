"""What the agent's co-processes in the Airflow venv share to hold a metadata-database session:
the restart slot (agent.airflow.restart_slot) and the metrics publisher's lock and counts
(agent.jobs.metrics.database) run `PRELUDE + their own script` in the Airflow venv's python
(it has SQLAlchemy and psycopg2; the agent's venv has no database driver), as the airflow user.

The prelude reads the request (one JSON line on stdin: the URL never in argv, environment or a
file), defines `say(**kw)` (one JSON line to the agent), `why(exc)` (an error's type and first
line with every `hide` string blanked: the URL's password never reaches the agent's logs) and
`connect(timeout)`: a session named in pg_stat_activity, with TCP keepalives on both ends, so
the database ends the session (and the advisory locks it holds) of an instance that vanished
within about a minute (KEEPALIVES: 20 s idle, then 6 probes 5 s apart).
"""

from __future__ import annotations

from typing import Optional

POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg2")
KEEPALIVES = {"idle": 20, "interval": 5, "count": 6}

PRELUDE = r"""
import json, random, sys, time
req = json.loads(sys.stdin.readline())

def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

def why(exc):
    text = (str(exc).strip().splitlines() or [""])[0]
    for s in req["hide"]:
        text = text.replace(s, "***")
    return (type(exc).__name__ + ": " + text)[:300]

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

def connect(connect_timeout):
    ka = req["keepalives"]
    engine = sa.create_engine(
        req["url"], poolclass=NullPool, isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": connect_timeout,
                      "application_name": req["name"][:63], "keepalives": 1,
                      "keepalives_idle": ka["idle"], "keepalives_interval": ka["interval"],
                      "keepalives_count": ka["count"]})
    conn = engine.connect()
    # server side: the database ends the session of a holder that vanished
    for name, value in ka.items():
        conn.exec_driver_sql("SET tcp_keepalives_%s = %d" % (name, value))
    return conn
"""


def password_of(url: str) -> Optional[str]:
    """The password part of a URL (to blank it in the co-process's messages)."""
    netloc = url.split("://", 1)[-1].split("/", 1)[0]
    if "@" not in netloc:
        return None
    userinfo = netloc.rsplit("@", 1)[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None
