"""The metrics daemon's link to Airflow's metadata database: one long-lived co-process in the
Airflow venv's python (`metrics.python`, as `metrics.user`, never root: the agent's own venv
has no database driver), started with the instance's `[database] sql_alchemy_conn` as JSON on
stdin (never argv, environment or a file), as agent.airflow.restart_slot does.

Leader election: the co-process holds one session with server-side and client-side TCP
keepalives. On every tick (a line "tick" on stdin) it tries `pg_try_advisory_lock(key)` unless
its session already holds it; the lock is session-level, so it stays held between ticks and
goes with the session: a killed daemon (its co-process dies with it, PR_SET_PDEATHSIG) frees it
at once, a vanished instance within about a minute. The holder answers each tick with the
counts (one query: `SELECT queue, state, count(*) FROM task_instance WHERE state IN ('running',
'queued') GROUP BY queue, state`, which PostgreSQL answers from the `ti_state` index); the
others answer "standby". Any database error ends the session (and the lock with it); the next
tick reconnects. `statement_timeout` bounds a query; the agent waits `metrics.query_timeout` +
grace for an answer and ends the co-process when none comes (which also frees the lock).
pg_stat_activity shows it as `airflow-agent metrics <host>`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
from typing import Callable, List

from agent.airflow.db_session import KEEPALIVES, POSTGRES_SCHEMES, PRELUDE, password_of
from agent.airflow.option_sources import SERVICE_PATH
from agent.jobs.metrics.plan import ERROR, Report, parse_report
from agent.logs import register_secrets
from agent.platform import process
from agent.platform.process import PIPE, RunAs

# how long past the query timeout the agent waits for an answer (connecting included)
GRACE = 15.0
CONNECT_TIMEOUT = 10

COUNT_SQL = (
    "SELECT queue, state, count(*) FROM task_instance "
    "WHERE state IN ('running', 'queued') GROUP BY queue, state"
)

LINK_SCRIPT = (
    PRELUDE
    + r"""
conn, held = None, False
for line in sys.stdin:
    t0 = time.monotonic()
    queries = 0
    try:
        if conn is None:
            held = False
            conn = connect(req["connect_timeout"])
            conn.exec_driver_sql("SET statement_timeout = %d" % req["statement_timeout_ms"])
        if not held:
            queries += 1
            held = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"),
                                     {"k": req["key"]}).scalar())
        if not held:
            say(role="standby", took=time.monotonic() - t0, queries=queries)
            continue
        queries += 1
        rows = [[q, s, int(n)] for q, s, n in conn.execute(sa.text(req["sql"])).fetchall()]
        say(role="publisher", rows=rows, took=time.monotonic() - t0, queries=queries)
    except Exception as exc:
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        conn, held = None, False  # the session (and the lock) ended or is ended here
        say(role="error", why="metadata database: " + why(exc))
"""
)


class LinkError(Exception):
    """The co-process cannot be started (no python, no user, not PostgreSQL)."""


class DatabaseLink:
    """The running co-process; `tick()` asks it for one election round and the counts."""

    def __init__(self, proc: subprocess.Popen, url_hash: str):
        self.proc = proc
        self.url_hash = url_hash  # which URL it was started with (a changed one restarts it)
        self.buf = b""

    @classmethod
    def start(cls, cfg, url: str, key: int, holder: str, url_hash: str = "") -> DatabaseLink:
        scheme = url.split("://", 1)[0]
        if scheme not in POSTGRES_SCHEMES:
            raise LinkError(f"sql_alchemy_conn is {scheme}, not PostgreSQL (advisory locks)")
        hide: List[str] = [p for p in [password_of(url)] if p]
        register_secrets([url] + hide)
        m = cfg.metrics
        request = {
            "url": url,
            "hide": hide,
            "key": key,
            "sql": COUNT_SQL,
            "keepalives": KEEPALIVES,
            "connect_timeout": CONNECT_TIMEOUT,
            "statement_timeout_ms": int(m.query_timeout * 1000),
            "name": f"airflow-agent metrics {holder}",
        }
        env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": "/"}
        run_as = None
        if m.user is not None:
            try:
                run_as = RunAs.lookup(m.user)
            except KeyError as exc:
                raise LinkError(str(exc.args[0])) from None
            if run_as.uid == 0:
                raise LinkError(f"metrics.user {m.user!r} is uid 0")
            env.update(HOME=run_as.home, USER=m.user)
            run_as = None if run_as.uid == os.geteuid() else run_as
        try:
            proc = process.spawn(
                [m.python, "-c", LINK_SCRIPT],
                env=env,
                user=run_as,
                umask=0o077,
                cwd="/",
                stdin=PIPE,
                stdout=PIPE,
                stderr=subprocess.DEVNULL,
                die_with_parent=True,
            )
        except (OSError, process.ProcessError) as exc:
            raise LinkError(f"cannot run {m.python}: {exc}") from None
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            process.end(proc)
            raise LinkError(f"{m.python} exited at once (no SQLAlchemy?)") from None
        return cls(proc, url_hash)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tick(self, timeout: float, clock: Callable[[], float]) -> Report:
        """One round: the co-process's report, or an error report (and the co-process ended)
        when it does not answer within `timeout` or has exited."""
        try:
            self.proc.stdin.write(b"tick\n")
            self.proc.stdin.flush()
        except OSError:
            return self._dead("the metrics co-process has exited")
        deadline = clock() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - clock()
            if left <= 0:
                return self._dead(f"the metrics co-process gave no answer within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return self._dead("the metrics co-process has exited (no SQLAlchemy?)")
                self.buf += chunk
                if len(self.buf) > 1 << 20:
                    return self._dead("the metrics co-process wrote an overlong line")
        line, self.buf = self.buf.split(b"\n", 1)
        return parse_report(line.decode("utf-8", "replace"))

    def _dead(self, why: str) -> Report:
        self.close()
        return Report(ERROR, why=why)

    def close(self) -> None:
        """End the co-process (its session, and a lock it holds, end with it)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        process.end(self.proc)
