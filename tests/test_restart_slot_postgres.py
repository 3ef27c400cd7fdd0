"""The fleet-wide restart slot against a real PostgreSQL 15 (sandbox/airflow_cluster.Postgres)
with the co-process in the Airflow venv's python, as on an instance:
- N=1: a second holder waits (and says so) until the first releases, then holds slot 0;
- N=2: two holders hold slots 0 and 1; a third waits and goes uncoordinated at its timeout;
- a holder SIGKILLed (the agent, or only its co-process) frees its slot at once;
- an unreachable database: uncoordinated after the timeout, with a warning naming why and
  no password;
- a login role with no privilege at all (like the workers' own user) holds a slot;
- two confapply daemons of one role (two instances) never restart at the same time, from
  their own log lines.
Each test uses its own cluster name, so the slots of one never meet another's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from agent.airflow.restart_slot import restart_slot
from agent.config import config_from_dict
from sandbox.proc import wait_for
from sandbox.redis_server import free_port
from sandbox.systemctl_standin import ActiveUnits

pytestmark = [pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
HOLDER_PASSWORD = "slot0holder0secret"


@pytest.fixture(scope="module")
def pg():
    from sandbox.airflow_cluster import Postgres

    server = Postgres().start()
    try:
        yield server
    finally:
        server.stop()


def make_cfg(tmp_path, url: str, **coordination):
    from sandbox.airflow_cluster import AIRFLOW_VENV

    env_file = tmp_path / f"airflow-{secrets.token_hex(3)}.env"
    env_file.write_text(f"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN={url}\n")
    section = {
        "python": str(AIRFLOW_VENV / "bin" / "python"),
        "user": None,  # this rig's venv lives under /root: the tests' own user runs it
        "timeout": 60.0,
        "poll_interval": 0.2,
        **coordination,
    }
    return config_from_dict(
        {
            "cluster": f"t{secrets.token_hex(4)}",
            "state_dir": str(tmp_path / f"state-{secrets.token_hex(3)}"),
            "env": {"file": str(env_file)},
            "coordination": section,
        }
    )


class Holder(threading.Thread):
    """restart_slot in a thread: holds until `release` is set."""

    def __init__(self, cfg, role: str, name: str):
        super().__init__(daemon=True)
        self.cfg, self.role, self.holder = cfg, role, name
        self.release = threading.Event()
        self.slot = None
        self.held_at = None

    def run(self) -> None:
        with restart_slot(self.cfg, self.role, self.holder) as slot:
            self.held_at = time.monotonic()
            self.slot = slot
            self.release.wait(120)


def messages(caplog) -> List[str]:
    return [r.getMessage() for r in caplog.records]


def test_one_slot_the_second_holder_waits_until_the_first_releases(pg, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_cfg(tmp_path, pg.url)
    with restart_slot(cfg, "webserver", "host-a") as first:
        assert (first.index, first.slots, first.uncoordinated) == (0, 1, False)
        second = Holder(cfg, "webserver", "host-b")
        second.start()
        wait_for(
            lambda: "restart slot webserver: waiting (all 1 slot(s) busy)" in messages(caplog),
            30,
            "the second holder to report that it waits",
        )
        # both sessions are in the database, named after their holders
        names = pg.psql("airflow", "SELECT application_name FROM pg_stat_activity")
        assert "airflow-agent restart slot webserver host-a" in names
        assert "airflow-agent restart slot webserver host-b" in names
        assert second.slot is None
        released_at = time.monotonic()
    wait_for(lambda: second.slot is not None, 30, "the second holder to hold the slot")
    assert second.held_at >= released_at
    assert (second.slot.index, second.slot.uncoordinated) == (0, False)
    assert second.slot.waited > 0
    second.release.set()
    second.join(30)
    msgs = messages(caplog)
    assert any(m.startswith("restart slot webserver 0/1 held (waited ") for m in msgs)
    assert sum(m.startswith("restart slot webserver 0/1 released (held ") for m in msgs) == 2


def test_two_slots_two_hold_and_a_third_goes_uncoordinated_at_its_timeout(pg, tmp_path, caplog):
    cfg = make_cfg(tmp_path, pg.url, slots={"worker": 2}, timeout=2.0)
    with restart_slot(cfg, "worker", "a") as a, restart_slot(cfg, "worker", "b") as b:
        assert {a.index, b.index} == {0, 1} and a.slots == b.slots == 2
        # another role's slots are its own
        with restart_slot(cfg, "scheduler", "s") as s:
            assert (s.index, s.slots) == (0, 1)
        start = time.monotonic()
        with restart_slot(cfg, "worker", "c") as c:
            assert c.uncoordinated
        assert time.monotonic() - start >= 2.0
        assert "none free after 2 s: all 2 slot(s) busy" in c.why
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("restart slot worker uncoordinated" in r.getMessage() for r in warnings)


HOLD_SCRIPT = """
import sys
from agent.airflow.restart_slot import restart_slot
from agent.config import load_config
with restart_slot(load_config(sys.argv[1]), "scheduler", "doomed") as slot:
    print("held", slot.index, flush=True)
    sys.stdin.read()
"""


def children_of(pid: int) -> List[int]:
    """The slot co-processes `pid` started."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"advisory" in cmdline:
                    out.append(int(entry))
    return out


def test_a_killed_holder_frees_its_slot_at_once(pg, tmp_path):
    cfg = make_cfg(tmp_path, pg.url)
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(
        json.dumps(
            {
                "cluster": cfg.cluster,
                "env": {"file": cfg.env.file},
                "coordination": {
                    "python": cfg.coordination.python,
                    "user": None,
                    "poll_interval": 0.2,
                },
            }
        )
    )
    # 1. the agent holding the slot is SIGKILLed: its co-process dies with it
    agent = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(config_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        text=True,
    )
    try:
        assert agent.stdout.readline().strip() == "held 0"
        co = children_of(agent.pid)
        assert len(co) == 1
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    finally:
        agent.kill()
        agent.wait()
    start = time.monotonic()
    with restart_slot(cfg, "scheduler", "next") as slot:
        assert (slot.index, slot.uncoordinated) == (0, False)
        assert time.monotonic() - start < 10
        # 2. only the co-process of a holder is SIGKILLed: the slot goes with its session
        mine = children_of(os.getpid())
        assert len(mine) == 1
        os.kill(mine[0], signal.SIGKILL)
        start = time.monotonic()
        with restart_slot(cfg, "scheduler", "after") as again:
            assert (again.index, again.uncoordinated) == (0, False)
        assert time.monotonic() - start < 10
    wait_for(lambda: not os.path.exists(f"/proc/{co[0]}"), 10, "the dead agent's co-process")


def test_an_unreachable_database_is_uncoordinated_after_the_timeout(tmp_path, caplog):
    url = f"postgresql+psycopg2://airflow:{HOLDER_PASSWORD}@127.0.0.1:{free_port()}/airflow"
    cfg = make_cfg(tmp_path, url, timeout=2.0)
    start = time.monotonic()
    with restart_slot(cfg, "webserver", "lonely") as slot:
        assert slot.uncoordinated
    assert 2.0 <= time.monotonic() - start < 2.0 + 15
    assert "database unreachable: OperationalError" in slot.why
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("restart slot webserver uncoordinated after" in r.getMessage() for r in warned)
    assert HOLDER_PASSWORD not in caplog.text and HOLDER_PASSWORD not in slot.why


def test_a_role_without_any_privilege_holds_a_slot(pg, tmp_path):
    role = f"slot_{secrets.token_hex(3)}"
    pg.psql("airflow", f"CREATE ROLE {role} LOGIN PASSWORD '{HOLDER_PASSWORD}'")
    pg.psql("airflow", f"REVOKE ALL ON SCHEMA public FROM {role}")
    assert pg.psql("airflow", f"SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'") == "f"
    url = pg.url.replace("//postgres@", f"//{role}:{HOLDER_PASSWORD}@")
    cfg = make_cfg(tmp_path, url)
    with restart_slot(cfg, "worker", "w1") as slot:
        assert (slot.index, slot.uncoordinated) == (0, False)
        held = pg.psql(
            "airflow",
            "SELECT a.usename FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted",
        )
        assert role in held.splitlines()


# -- confapply: two instances of one role ------------------------------------------------------


class Runtime:
    """What confapply asks of its daemon runtime (no watchdog here)."""

    stopping = False

    def now(self) -> float:
        return time.monotonic()

    def status(self, text: str) -> None:
        pass

    def busy(self, seconds):
        return contextlib.nullcontext()

    def beat(self) -> None:
        pass


class TimedSystemctl(ActiveUnits):
    """Units that are always active; a restart takes `seconds` and is recorded (start, end)."""

    def __init__(self, seconds: float, spans: List[Tuple[str, float, float]], name: str):
        super().__init__()
        self.seconds, self.spans, self.name = seconds, spans, name

    def restart(self, unit: str) -> None:
        start = time.monotonic()
        time.sleep(self.seconds)  # the restart's own duration
        self.spans.append((self.name, start, time.monotonic()))


def test_two_confapply_instances_of_one_role_never_restart_at_once(pg, tmp_path, caplog):
    from agent.jobs.confapply.daemon import Confapply

    caplog.set_level(logging.INFO)
    base = make_cfg(tmp_path, pg.url)
    spans: List[Tuple[str, float, float]] = []
    daemons = []
    for name in ("i-aaa", "i-bbb"):
        cfg = make_cfg(tmp_path, pg.url)
        cfg.cluster = base.cluster  # one cluster: the same slots
        daemons.append(Confapply(cfg, "webserver", TimedSystemctl(1.0, spans, name), Runtime()))
    outcomes = [None, None]

    def apply(i: int) -> None:
        outcomes[i] = daemons[i].apply("h" * 64)

    threads = [threading.Thread(target=apply, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None and o.ok and o.restarted == ["airflow-api-server"] for o in outcomes)
    assert len(spans) == 2
    (_, s1, e1), (_, s2, e2) = sorted(spans, key=lambda s: s[1])
    assert e1 <= s2, f"restarts overlap: {spans}"
    held = [r for r in caplog.records if "restart slot webserver 0/1 held" in r.getMessage()]
    released = [
        r for r in caplog.records if "restart slot webserver 0/1 released" in r.getMessage()
    ]
    assert len(held) == len(released) == 2
    # from the log lines' own timestamps: the second held only after the first released
    assert released[0].created <= held[1].created


# -- confapply on its daemon runtime: the watchdog while it waits, SIGTERM during the wait ------

WATCHDOG_USEC = 400_000  # WatchdogSec 0.4 s: a pass counts as alive 0.2 s after a sign of life


@pytest.fixture
def notify(tmp_path_factory, monkeypatch):
    from sandbox.notify_socket import NotifySocket

    sock = NotifySocket(tmp_path_factory.mktemp("n"))
    monkeypatch.setenv("NOTIFY_SOCKET", sock.path)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield sock
    sock.close()


@pytest.mark.parametrize("end", ["release", "sigterm"])
def test_confapply_keeps_the_watchdog_fed_while_it_waits_for_a_slot(
    pg, tmp_path, caplog, notify, end
):
    """A daemon whose role's one slot is held elsewhere: WATCHDOG=1 goes on while it waits.
    release: it then restarts its unit; sigterm: the wait ends at once, nothing restarted."""
    from agent.jobs.confapply.daemon import Confapply
    from agent.runtime.daemon import DaemonRuntime

    caplog.set_level(logging.INFO)
    cfg = make_cfg(tmp_path, pg.url)
    cfg.confapply.debounce, cfg.confapply.max_wait = 0.05, 0.5
    env_file = Path(cfg.env.file)
    spans: List[Tuple[str, float, float]] = []
    rt = DaemonRuntime("confapply", watchdog_fallback=cfg.confapply.watchdog_interval)
    daemon = Confapply(cfg, "webserver", TimedSystemctl(0.1, spans, "me"), rt)
    errors: List[BaseException] = []

    def scenario() -> None:
        with restart_slot(cfg, "webserver", "elsewhere") as other:
            assert other.index == 0
            notify.wait_for(lambda: notify.count("READY=1") == 1, 30, "READY=1")
            env_file.write_text(env_file.read_text() + "FOO=2\n")
            wait_for(
                lambda: "restart slot webserver: waiting (all 1 slot(s) busy)" in messages(caplog),
                30,
                "confapply to wait for the slot",
            )
            pings = notify.count("WATCHDOG=1")
            threading.Event().wait(1.0)  # five WatchdogSec of waiting for the slot
            assert notify.count("WATCHDOG=1") >= pings + 4, "the watchdog stopped while waiting"
            assert spans == []
            if end == "sigterm":
                stopped_at = time.monotonic()
                os.kill(os.getpid(), signal.SIGTERM)
                wait_for(lambda: notify.count("STOPPING=1") == 1, 10, "STOPPING=1")
                assert time.monotonic() - stopped_at < 5
                return
        wait_for(lambda: len(spans) == 1, 30, "the restart after the slot was released")
        os.kill(os.getpid(), signal.SIGTERM)

    def body() -> None:
        try:
            scenario()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=body)
    t.start()
    try:
        rc = rt.run(daemon)
    finally:
        t.join(60)
    if errors:
        raise errors[0]
    assert rc == 0
    msgs = messages(caplog)
    if end == "sigterm":
        assert spans == []
        assert any("the wait was interrupted" in m for m in msgs)
        assert not any("restarting anyway" in m for m in msgs)
    else:
        assert any(m.startswith("restart slot webserver 0/1 held (waited ") for m in msgs)


def test_a_worker_waiting_for_its_slot_never_holds_up_a_drain(pg, tmp_path, caplog):
    """The worker's slot is taken outside its record's lock: while confapply waits for the
    slot, a drain gets the record at once; once the slot frees, the running worker restarts
    (a Celery warm shutdown under the record's lock, as before)."""
    from agent.jobs.confapply.daemon import Confapply
    from agent.state import StateStore
    from agent.worker.state import WorkerRecord

    caplog.set_level(logging.INFO)
    cfg = make_cfg(tmp_path, pg.url)
    marker = tmp_path / "airflow" / ".deployed-revision"
    marker.parent.mkdir()
    marker.write_text("d-1\n")
    cfg.deploy.first_revision_marker = str(marker)
    spans: List[Tuple[str, float, float]] = []
    daemon = Confapply(cfg, "worker", TimedSystemctl(0.1, spans, "w"), Runtime())
    outcome = []
    with restart_slot(cfg, "worker", "elsewhere"):
        t = threading.Thread(target=lambda: outcome.append(daemon.apply("h" * 64)))
        t.start()
        wait_for(
            lambda: "restart slot worker: waiting (all 1 slot(s) busy)" in messages(caplog),
            30,
            "confapply to wait for the worker's slot",
        )
        start = time.monotonic()
        with WorkerRecord(cfg, StateStore(cfg.state_dir)).hold("drain", wait=5) as held:
            assert held.may_run
        assert time.monotonic() - start < 1
        assert spans == []
    t.join(30)
    assert outcome and outcome[0].ok and outcome[0].restarted == ["airflow-worker"]
    assert len(spans) == 1
