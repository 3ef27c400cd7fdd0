"""The fleet-wide restart slot: at most `coordination.slots[role]` instances of a role restart
their Airflow units at once (a config push reaches every instance within minutes).

Coordination goes through Airflow's metadata database, the one store every role reaches (the
template's webservers do not reach Redis): PostgreSQL session advisory locks, slot i of a role
being the bigint key `slot_key(cluster, role, i)`. A co-process in the Airflow venv's python
(`coordination.python`, as `coordination.user`, never root; the agent's own venv has no
database driver) reads the instance's `[database] sql_alchemy_conn` (resolved from the env file
as Airflow resolves it: the master user on the scheduler and api-servers, the workers' own
least-privilege user on workers; advisory locks need no privilege) as JSON on stdin, never
argv, environment or a file. It connects with server-side TCP keepalives (a session whose
instance vanished ends within about a minute, and its slot with it), names itself in
pg_stat_activity (`application_name`: the role and the holder), tries `pg_try_advisory_lock`
on slots 0..N-1 every `coordination.poll_interval` (+-25 % jitter) until one is free, says
which, and blocks until its stdin closes: the context manager's exit, or the agent's death
(it also dies with the agent: PR_SET_PDEATHSIG). The lock goes with the session, so a killed
holder frees its slot at once. There is no queue: a waiting instance takes whichever slot
frees first. Each waiting or holding instance keeps one database connection open meanwhile.

When no slot can be had, the restart goes ahead *uncoordinated* with a WARNING naming why (a
config push must converge; with the metadata database down Airflow is not scheduling either):
- at once when there is nothing to coordinate through: the env file cannot be read or gives
  no sql_alchemy_conn, it is not PostgreSQL, or the co-process cannot run (python or user
  missing, no driver);
- after `coordination.timeout` when the URL cannot be resolved (its `_CMD` or `_SECRET` form
  fails: retried every poll_interval), the database is unreachable, or every slot stays busy.
`coordination.enabled: false` makes every restart uncoordinated (logged at INFO). A session
lost while a slot is held (the database restarted) loses the slot; the restart goes on.

Log lines: `restart slot <role> <i>/<N> held (waited S s) by <holder>` once the lock is held,
then `... released (held S s)` just before it is let go: so across the fleet's journals one
holder's "released" always precedes the next one's "held", and every restart of a pass lies
between its own two lines. Waiting and uncoordinated restarts are logged too. The URL and its
password are registered as secrets (scrubbed from every log line); the co-process reports
errors by type and first line with the password blanked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import time
from typing import Callable, Iterator, List, Optional

from agent.airflow.config_options import OptionError
from agent.airflow.db_session import KEEPALIVES, POSTGRES_SCHEMES, PRELUDE, password_of
from agent.airflow.option_sources import SERVICE_PATH, sql_alchemy_conn
from agent.airflow.restart_slot_plan import Acquisition, Slot, slot_keys
from agent.errors import AgentError
from agent.logs import register_secrets
from agent.platform import process
from agent.platform.process import PIPE, RunAs

log = logging.getLogger(__name__)

# how long a released co-process may take to unlock and exit before it is killed
RELEASE_WAIT = 10.0

SLOT_SCRIPT = (
    PRELUDE
    + r"""
deadline = time.monotonic() + req["timeout"]
said = None
while True:
    left = deadline - time.monotonic()
    try:
        with connect(max(2, min(10, int(left)))) as conn:
            while True:
                for i, key in enumerate(req["keys"]):
                    got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key})
                    if got.scalar():
                        say(state="held", slot=i)
                        sys.stdin.read()  # until the agent lets go (or dies)
                        try:
                            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                        finally:
                            sys.exit(0)
                reason = "all %d slot(s) busy" % len(req["keys"])
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if reason != said:
                    say(state="waiting", why=reason)
                    said = reason
                time.sleep(min(left, req["poll"] * random.uniform(0.75, 1.25)))
    except Exception as exc:
        reason = "database unreachable: " + why(exc)
    left = deadline - time.monotonic()
    if left <= 0:
        say(state="timeout", why=reason)
        sys.exit(0)
    if reason != said:
        say(state="waiting", why=reason)
        said = reason
    time.sleep(min(left, req["poll"] * random.uniform(0.75, 1.25)))
"""
)


def _resolve_url(cfg, acq: Acquisition, clock, stop) -> tuple[Optional[str], str]:
    """(url, "") or (None, why uncoordinated). Retried until the deadline while it errs."""
    while True:
        try:
            url = sql_alchemy_conn(cfg)
        except OptionError as exc:  # a _CMD or _SECRET form that failed: perhaps for now
            if clock() >= acq.deadline or stop():
                return None, f"cannot resolve [database] sql_alchemy_conn: {exc}"
            if acq.why != str(exc):
                acq.why = str(exc)
                log.warning("restart slot %s: %s; retrying until the timeout", acq.role, exc)
            time.sleep(min(cfg.coordination.poll_interval, max(0.0, acq.deadline - clock())))
            continue
        except AgentError as exc:  # the env file cannot be read
            return None, str(exc)
        if url is None:
            return None, f"{cfg.env.file} gives no [database] sql_alchemy_conn"
        scheme = url.split("://", 1)[0]
        if scheme not in POSTGRES_SCHEMES:
            return None, f"sql_alchemy_conn is {scheme}, not PostgreSQL (advisory locks)"
        return url, ""


def _spawn(cfg, request: dict):
    c = cfg.coordination
    run_as = None
    env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": "/"}
    if c.user is not None:
        run_as = RunAs.lookup(c.user)  # KeyError when there is no such user
        if run_as.uid == 0:
            raise KeyError(f"user {c.user!r} is uid 0")
        env.update(HOME=run_as.home, USER=c.user)
        run_as = None if run_as.uid == os.geteuid() else run_as
    proc = process.spawn(
        [c.python, "-c", SLOT_SCRIPT],
        env=env,
        user=run_as,
        umask=0o077,
        cwd="/",
        stdin=PIPE,
        stdout=PIPE,
        stderr=PIPE,
        die_with_parent=True,
    )
    try:
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        proc.stdin.flush()
    except OSError:  # it died at once: its stderr is not worth more than that
        process.end(proc)
        raise
    return proc


def _await_report(proc, acq: Acquisition, clock, stop) -> Slot:
    """Read the co-process's reports until one settles the acquisition."""
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    buf, errbuf, open_fds = b"", b"", [out, err]
    while True:
        now = clock()
        if stop():
            return acq.uncoordinated("interrupted (the agent is stopping)", now)
        if acq.expired(now):
            return acq.gone(now)
        if not open_fds:
            proc.wait()
            tail = (errbuf.decode("utf-8", "replace").strip().splitlines() or [""])[-1]
            return acq.gone(now, tail[:200])
        ready, _, _ = select.select(open_fds, [], [], 0.5)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
            elif fd == err:
                errbuf = (errbuf + chunk)[-4096:]
            else:
                buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            before = acq.why
            slot = acq.report(line.decode("utf-8", "replace"), clock())
            if slot is not None:
                return slot
            if acq.why != before:
                log.info("restart slot %s: waiting (%s)", acq.role, acq.why)
        if len(buf) > 65536:
            return acq.uncoordinated("the slot's co-process wrote an overlong line", clock())


def _release(proc) -> None:
    with contextlib.suppress(OSError):
        proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(RELEASE_WAIT)
    process.end(proc)  # a co-process that did not exit is killed: that releases the lock too


@contextlib.contextmanager
def restart_slot(
    cfg,
    role: str,
    holder: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    stop: Callable[[], bool] = lambda: False,
    timeout: Optional[float] = None,
) -> Iterator[Slot]:
    """Hold one of `role`'s restart slots (or go uncoordinated, see the module) for the body.

    `holder` names this instance in logs and pg_stat_activity. `stop` is polled while waiting:
    when it turns true the wait ends uncoordinated at once. The wait may block up to
    `coordination.timeout` (or `timeout`, a caller's shorter bound) + REPORT_GRACE (a caller
    with a watchdog says so first)."""
    c = cfg.coordination
    n = c.slots_for(role)
    acq = Acquisition(role, n, c.timeout if timeout is None else timeout, clock())
    if not c.enabled:
        slot = acq.uncoordinated("coordination.enabled is false", clock())
        log.info("%s: %s", slot.describe(), slot.why)
        yield slot
        return
    proc = None
    url, why = _resolve_url(cfg, acq, clock, stop)
    slot: Optional[Slot] = None
    if url is not None:
        hide: List[str] = [p for p in [password_of(url)] if p]
        register_secrets([url] + hide)
        request = {
            "url": url,
            "hide": hide,
            "keys": slot_keys(cfg.cluster, role, n),
            "timeout": max(0.0, acq.deadline - clock()),
            "poll": c.poll_interval,
            "keepalives": KEEPALIVES,
            "name": f"airflow-agent restart slot {role} {holder}",
        }
        try:
            proc = _spawn(cfg, request)
        except (KeyError, AgentError, OSError) as exc:
            why = f"cannot run the slot's co-process: {exc.args[0] if exc.args else exc}"
        else:
            try:
                slot = _await_report(proc, acq, clock, stop)
            except BaseException:
                process.end(proc)
                raise
            if slot.uncoordinated:
                process.end(proc)
                proc = None
    if slot is None:
        slot = acq.uncoordinated(why, clock())
    if slot.uncoordinated:
        if stop():
            log.info("%s: the wait was interrupted (stopping)", slot.describe())
        else:
            log.warning(
                "%s after %.1f s: %s; restarting anyway", slot.describe(), slot.waited, slot.why
            )
        yield slot
        return
    log.info("%s held (waited %.1f s) by %s", slot.describe(), slot.waited, holder)
    held_at = clock()
    try:
        yield slot
    finally:
        # logged before the unlock, so no other holder's "held" line can precede it
        log.info("%s released (held %.1f s)", slot.describe(), clock() - held_at)
        _release(proc)
