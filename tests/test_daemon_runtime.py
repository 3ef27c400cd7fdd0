"""The daemon runtime (agent/runtime/daemon.py) on virtual time: the loop, READY/STATUS/STOPPING,
the sleep that wakes on stop or nudge, signals, and the watchdog rule — pings only while the loop
shows life, so a hung pass gets the unit killed and a slow-but-alive one never does.

`VirtualClock` runs everything in the test's thread: the pinger is a periodic callback fired
while virtual time advances, in a runtime wait or inside a pass that "blocks" by advancing the
clock itself. What the runtime sends is recorded with its virtual time. A few tests at the end
use a real NOTIFY_SOCKET and real time, for what only they show.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest

from agent.config import config_from_dict, load_config
from agent.platform.notify import Notifier
from agent.runtime.config_watch import CHECK_INTERVAL, EXIT_CONFIG_CHANGED, SETTLE
from agent.runtime.daemon import Clock, Daemon, DaemonRuntime, Liveness, watchdog_interval
from sandbox.notify_socket import NotifySocket


class VirtualClock(Clock):
    """now() is virtual; wait() advances it (stopping early when the event is set by something
    that ran meanwhile); periodic callbacks and one-off actions fire at their virtual times."""

    def __init__(self, start: float = 1000.0):
        self.t = start
        self.timers: List[list] = []  # [next_at, interval, fn, halt]
        self.actions: List[Tuple[float, Callable[[], None]]] = []

    def now(self) -> float:
        return self.t

    def every(self, interval: float, fn: Callable[[], None], halt: threading.Event) -> None:
        fn()
        self.timers.append([self.t + interval, interval, fn, halt])

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self.actions.append((when, fn))

    def advance(self, seconds: float, event: Optional[threading.Event] = None) -> bool:
        end = self.t + seconds
        while not (event is not None and event.is_set()):
            live = [tm for tm in self.timers if not tm[3].is_set()]
            times = [tm[0] for tm in live] + [a[0] for a in self.actions]
            nxt = min((x for x in times if x <= end), default=None)
            if nxt is None:
                self.t = end
                break
            self.t = max(self.t, nxt)
            for when, fn in [a for a in self.actions if a[0] <= nxt]:
                self.actions.remove((when, fn))
                fn()
            for tm in live:
                if tm[0] <= nxt:
                    tm[0] += tm[1]
                    tm[2]()
        return event is not None and event.is_set()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return self.advance(timeout, event)


class TimedNotifier(Notifier):
    """Records each sd_notify message with the virtual time it was sent at."""

    def __init__(self, clock: VirtualClock):
        super().__init__()
        self.clock = clock
        self.sent: List[Tuple[float, str]] = []

    def _send(self, msg: str) -> None:
        self.sent.append((self.clock.now(), msg))

    def times(self, line: str) -> List[float]:
        return [t for t, m in self.sent if line in m.split("\n")]

    def lines(self) -> List[str]:
        return [m for _t, m in self.sent]


class Scripted(Daemon):
    """A daemon whose passes run `script(pass_number)` and return its delay."""

    def __init__(self, script: Callable[[int], float], status: Callable[[int], str] = str):
        self.script = script
        self.status_of = status
        self.passes: List[float] = []
        self.clock: Optional[VirtualClock] = None
        self.started = self.closed = 0

    def start(self) -> None:
        self.started += 1

    def step(self) -> float:
        self.passes.append(self.clock.now() if self.clock else 0.0)
        return self.script(len(self.passes))

    def status(self) -> str:
        return self.status_of(len(self.passes))

    def close(self) -> None:
        self.closed += 1


def make(usec: Optional[str] = None, fallback: Optional[float] = None):
    clock = VirtualClock()
    notifier = TimedNotifier(clock)
    rt = DaemonRuntime(
        "test", notifier=notifier, clock=clock, watchdog_usec=usec, watchdog_fallback=fallback
    )
    return clock, notifier, rt


def run(rt: DaemonRuntime, clock: VirtualClock, daemon: Scripted) -> int:
    daemon.clock = clock
    return rt.run(daemon)


# -- the loop ------------------------------------------------------------------------------


def test_ready_after_the_first_pass_status_on_change_and_stopping_at_the_end():
    clock, notifier, rt = make()

    def script(n: int) -> float:
        if n == 1:
            # READY=1 must not have gone out before the first pass finished
            assert notifier.lines() == []
        if n == 5:
            rt.request_stop()
        return 2.0

    d = Scripted(script, status=lambda n: "idle" if n < 3 else f"pass {n}")
    assert run(rt, clock, d) == 0
    assert d.passes == [1000.0, 1002.0, 1004.0, 1006.0, 1008.0]
    # READY=1 carries the first status; STATUS= only when it changes; STOPPING=1 last
    assert notifier.lines() == [
        "READY=1\nSTATUS=idle",
        "STATUS=pass 3",
        "STATUS=pass 4",
        "STATUS=pass 5",
        "STOPPING=1",
    ]
    assert (d.started, d.closed) == (1, 1)


def test_the_sleep_wakes_early_on_stop_and_on_nudge():
    clock, notifier, rt = make()
    clock.at(1010.0, rt.nudge)
    clock.at(1025.0, rt.request_stop)
    d = Scripted(lambda n: 100.0)
    assert run(rt, clock, d) == 0
    # the nudge started the second pass at once; the stop ended the 100 s sleep at 1025
    assert d.passes == [1000.0, 1010.0]
    assert clock.t == 1025.0
    assert notifier.sent[-1] == (1025.0, "STOPPING=1")


def test_a_nudge_during_a_pass_is_not_lost():
    clock, _notifier, rt = make()

    def script(n: int) -> float:
        if n == 1:
            rt.nudge()  # e.g. a file event while the pass was busy
        if n == 2:
            rt.request_stop()
        return 60.0

    d = Scripted(script)
    run(rt, clock, d)
    assert d.passes == [1000.0, 1000.0]


def test_sigterm_and_sigint_only_set_the_stop_event_and_handlers_are_restored():
    for signum in (signal.SIGTERM, signal.SIGINT):
        clock, notifier, rt = make()
        before = signal.getsignal(signum)

        def script(n: int, signum=signum) -> float:
            if n == 2:
                os.kill(os.getpid(), signum)  # handled in this (main) thread
                clock.advance(0.5)
                # the pass goes on: the handler only set the flag
                assert rt.stopping and notifier.lines()[-1] != "STOPPING=1"
            return 1.0

        d = Scripted(script)
        assert run(rt, clock, d) == 0
        assert len(d.passes) == 2 and rt.signal_received == signum
        assert notifier.lines()[-1] == "STOPPING=1" and d.closed == 1
        assert signal.getsignal(signum) is before


def test_a_pass_that_raises_reports_it_stops_closes_and_propagates():
    clock, notifier, rt = make(usec="4000000")
    before = signal.getsignal(signal.SIGTERM)

    def script(n: int) -> float:
        if n == 3:
            raise RuntimeError("broken")
        return 1.0

    d = Scripted(script)
    with pytest.raises(RuntimeError, match="broken"):
        run(rt, clock, d)
    assert notifier.lines()[-2:] == ["STATUS=failed: RuntimeError: broken", "STOPPING=1"]
    assert d.closed == 1 and signal.getsignal(signal.SIGTERM) is before
    # the pinger is halted: time going on sends nothing more
    n = len(notifier.sent)
    clock.advance(60)
    assert len(notifier.sent) == n


# -- the watchdog ----------------------------------------------------------------------------

WATCHDOG_SEC = 10.0  # systemd's WatchdogSec in these tests: pings every 2.5 s, bound 5 s


def killed_at(pings: List[float], start: float, end: float) -> Optional[float]:
    """When systemd would kill the unit: the first moment WatchdogSec passes without a ping."""
    last = start
    for t in pings + [end]:
        if t - last > WATCHDOG_SEC:
            return last + WATCHDOG_SEC
        last = t
    return None


def test_watchdog_pings_while_idle_and_stop_when_a_pass_hangs():
    clock, notifier, rt = make(usec=str(int(WATCHDOG_SEC * 1e6)))
    hang_at = []

    def script(n: int) -> float:
        if n == 20:
            hang_at.append(clock.t)
            clock.advance(1000)  # blocked: no sign of life for 1000 s
            rt.request_stop()
        return 1.0

    run(rt, clock, Scripted(script))
    pings = notifier.times("WATCHDOG=1")
    (hung,) = hang_at
    # pings every WatchdogSec/4 while healthy: systemd never kills it then
    assert [t for t in pings if t <= hung] == [1000.0 + 2.5 * k for k in range(8)]
    assert killed_at([t for t in pings if t <= hung], 1000.0, hung) is None
    # once it hangs: pings only within WatchdogSec/2 of the pass's start, then none
    after = [t for t in pings if t > hung]
    assert after == [1020.0, 1022.5] and after[-1] < hung + WATCHDOG_SEC / 2
    # so systemd kills it within 1.5 x WatchdogSec of the hang, long before the pass returns
    kill = killed_at(pings, 1000.0, hung + 1000)
    assert kill is not None and hung + WATCHDOG_SEC <= kill <= hung + 1.5 * WATCHDOG_SEC


def test_a_slow_pass_within_watchdog_sec_is_never_killed():
    clock, notifier, rt = make(usec=str(int(WATCHDOG_SEC * 1e6)))
    passes = []

    def script(n: int) -> float:
        passes.append(clock.t)
        clock.advance(WATCHDOG_SEC - 0.1)  # each pass blocks just under WatchdogSec
        if n == 30:
            rt.request_stop()
        return 0.05

    run(rt, clock, Scripted(script))
    pings = notifier.times("WATCHDOG=1")
    assert killed_at(pings, 1000.0, clock.t) is None
    assert len(pings) >= 30


def test_beats_and_busy_sections_keep_a_long_pass_alive_and_only_them():
    clock, notifier, rt = make(usec=str(int(WATCHDOG_SEC * 1e6)))
    marks = {}

    def script(n: int) -> float:
        if n == 2:
            marks["beats"] = clock.t
            for _ in range(40):  # 160 s of work that shows life every 4 s
                clock.advance(4.0)
                rt.beat()
            marks["busy"] = clock.t
            with rt.busy(100.0):  # a bounded wait, e.g. systemctl restart
                clock.advance(90.0)
            marks["overrun"] = clock.t
            with rt.busy(100.0):
                clock.advance(300.0)  # ... that overran its bound
            marks["end"] = clock.t
            rt.request_stop()
        return 1.0

    run(rt, clock, Scripted(script))
    pings = notifier.times("WATCHDOG=1")
    assert killed_at([t for t in pings if t <= marks["overrun"]], 1000.0, marks["overrun"]) is None
    # past the busy section's bound the pings stop until the pass returns
    late = [t for t in pings if marks["overrun"] + 100.0 <= t < marks["end"]]
    assert late == []
    kill = killed_at(pings, 1000.0, marks["end"])
    assert kill is not None and kill <= marks["overrun"] + 100.0 + WATCHDOG_SEC


def test_liveness_rule():
    clock = VirtualClock()
    live = Liveness(clock, bound=5.0)
    assert live.alive()
    clock.t += 4.9
    assert live.alive()
    clock.t += 0.2
    assert not live.alive()
    live.beat()
    assert live.alive()
    with live.waiting():
        clock.t += 1000
        assert live.alive()
    assert live.alive()  # leaving the wait is a sign of life
    with live.busy(30):
        clock.t += 29
        assert live.alive()
        clock.t += 2
        assert not live.alive()
    assert live.alive()


def test_watchdog_interval_from_systemd_or_fallback():
    pid = str(os.getpid())
    assert watchdog_interval("60000000", 10.0) == 15.0
    assert watchdog_interval("60000000", None, pid) == 15.0
    # systemd names another process: not our watchdog
    assert watchdog_interval("60000000", None, str(os.getpid() + 1)) is None
    assert watchdog_interval("60000000", 1.0, "1") == 1.0
    assert watchdog_interval(None, 10.0) == 10.0
    assert watchdog_interval("garbage", 10.0) == 10.0
    assert watchdog_interval("0", None) is None
    assert watchdog_interval(None, 0.0) is None
    assert watchdog_interval(None, None) is None


def test_without_a_watchdog_nothing_pings():
    clock, notifier, rt = make()
    clock.at(1100.0, rt.request_stop)
    run(rt, clock, Scripted(lambda n: 10.0))
    assert notifier.times("WATCHDOG=1") == []
    assert rt.interval is None


# -- a real NOTIFY_SOCKET ----------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path_factory, monkeypatch):
    sock = NotifySocket(tmp_path_factory.mktemp("n"))
    monkeypatch.setenv("NOTIFY_SOCKET", sock.path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield sock
    sock.close()


def test_children_do_not_inherit_the_notify_variables_and_the_runtime_still_notifies(
    notify_socket,
):
    rt = DaemonRuntime("test")
    assert rt.interval == 0.05  # read from WATCHDOG_USEC before it left the environment
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ
    code = "import os; print(os.environ.get('NOTIFY_SOCKET'), os.environ.get('WATCHDOG_USEC'))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.stdout.split() == ["None", "None"]
    rt.status("still here")
    assert notify_socket.drain() == ["STATUS=still here"]


def test_a_stop_after_more_pings_than_a_datagram_queue_holds_is_prompt(notify_socket):
    """The sandbox's NOTIFY_SOCKET reads all the time, as systemd does. A sender blocks once
    `net.unix.max_dgram_qlen` datagrams wait unread (10 by default); a socket read only when
    a test looked made the variables watch daemon hang on SIGTERM in CI (its pinger blocked in
    send, holding the lock the stop takes). Here: 0.05 s pings for qlen + 20 intervals, nothing
    read, then a stop that must end the loop at once."""
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    rt = DaemonRuntime("test")

    class Idle(Daemon):
        def step(self) -> float:
            return 0.05

    done = threading.Event()

    def run() -> None:
        rt.run(Idle())
        done.set()

    threading.Thread(target=run, daemon=True).start()
    pings_sent_unread = qlen + 20
    threading.Event().wait(pings_sent_unread * rt.interval)  # nobody looks at the socket
    rt.request_stop()
    assert done.wait(5), "the daemon's stop waited on its NOTIFY_SOCKET reader"
    msgs = notify_socket.drain()
    assert msgs.count("WATCHDOG=1") >= qlen and msgs[-1] == "STOPPING=1"


def test_real_time_pings_stop_on_a_hang_and_stopping_is_the_last_message(notify_socket):
    rt = DaemonRuntime("test")
    entered, release = threading.Event(), threading.Event()
    hang = threading.Event()

    class Hanging(Daemon):
        def step(self) -> float:
            if hang.is_set():
                hang.clear()
                entered.set()
                release.wait(30)
            return 0.05

    def scenario() -> None:
        sock = notify_socket
        try:
            sock.wait_for(lambda: sock.count("WATCHDOG=1") >= 3, 10, "pings")
            hang.set()
            assert entered.wait(10)
            threading.Event().wait(0.4)  # the bound (0.1 s) and then some
            quiet = sock.count("WATCHDOG=1")
            threading.Event().wait(1.0)  # twenty ping intervals
            assert sock.count("WATCHDOG=1") == quiet
            release.set()
            sock.wait_for(lambda: sock.count("WATCHDOG=1") > quiet, 10, "pings after the hang")
        finally:
            release.set()
            os.kill(os.getpid(), signal.SIGTERM)

    errors: List[BaseException] = []

    def body() -> None:
        try:
            scenario()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    assert rt.run(Hanging()) == 0
    t.join(30)
    if errors:
        raise errors[0]
    msgs = notify_socket.drain()
    # the pinger starts before the first pass (which may be long); READY=1 after it
    assert msgs.count("READY=1") == 1 and msgs[-1] == "STOPPING=1"
    assert msgs.count("STOPPING=1") == 1


# -- agent.yaml changes: the runtime ends the daemon for systemd to start it on the new file --


def loaded(tmp_path, text: str = "cluster: one\n", name: str = "agent.yaml"):
    """A real config file and the AgentConfig load_config made of it."""
    path = tmp_path / name
    path.write_text(text)
    return path, load_config(str(path))


class Configured(Scripted):
    def __init__(self, cfg, script: Callable[[int], float]):
        super().__init__(script)
        self.cfg = cfg  # as confapply, lifecycle watch and variables watch keep theirs


def test_a_changed_agent_yaml_ends_the_daemon_with_the_restart_code_within_a_sleep(tmp_path):
    path, cfg = loaded(tmp_path)
    clock, notifier, rt = make()
    clock.at(1030.0, lambda: path.write_text("cluster: two\n"))
    d = Configured(cfg, lambda n: 600.0)
    assert run(rt, clock, d) == EXIT_CONFIG_CHANGED == 75
    # noticed in the 600 s sleep: seen at the first check after the write, acted on at the
    # next one (the settle rule), STOPPING=1 and close() as on SIGTERM
    assert d.passes == [1000.0]
    assert 1030.0 + SETTLE <= clock.t <= 1030.0 + 2 * CHECK_INTERVAL
    assert notifier.lines()[-2:] == [f"STATUS={path} changed: restarting to load it", "STOPPING=1"]
    assert d.closed == 1 and rt.config_changed and not rt.stopping


def test_touch_and_identical_rewrites_change_nothing(tmp_path):
    path, cfg = loaded(tmp_path)
    clock, _notifier, rt = make()
    for t in (1010.0, 1020.0, 1031.0):
        clock.at(t, lambda: (path.write_text("cluster: one\n"), os.utime(path)))
    clock.at(1100.0, rt.request_stop)
    d = Configured(cfg, lambda n: 5.0)
    assert run(rt, clock, d) == 0
    assert len(d.passes) == 20 and not rt.config_changed


def test_the_change_is_checked_before_each_pass_too(tmp_path):
    """A daemon that never sleeps still sees it before a pass (never during one), and acts only
    once the same new content has stood for SETTLE seconds."""
    path, cfg = loaded(tmp_path)
    clock, _notifier, rt = make()
    written = []

    def script(n: int) -> float:
        if n == 2:
            path.write_text("cluster: two\n")
            written.append(clock.now())
        clock.advance(0.25)  # a pass that takes its time
        return 0.0

    d = Configured(cfg, script)
    assert run(rt, clock, d) == EXIT_CONFIG_CHANGED
    # seen before pass 3; passes went on until it had stood SETTLE seconds, then no more
    assert clock.t - written[0] >= SETTLE
    assert len(d.passes) == 2 + int(SETTLE / 0.25)


def test_content_that_does_not_load_keeps_the_daemon_running_and_says_so(tmp_path, caplog):
    path, cfg = loaded(tmp_path)
    clock, notifier, rt = make()
    clock.at(1010.0, lambda: path.write_text("cluster: [unclosed\n"))
    clock.at(1030.0, lambda: path.write_text("drain: {timeout: -1}\n"))
    clock.at(1050.0, lambda: path.write_text("cluster: one\n"))  # reverted: all quiet again
    clock.at(1070.0, rt.request_stop)
    d = Configured(cfg, lambda n: 5.0)
    with caplog.at_level(logging.ERROR):
        assert run(rt, clock, d) == 0
    assert not rt.config_changed
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2  # once per distinct bad content, not once per check
    assert "not valid YAML" in errors[0] and "drain.timeout" in errors[1]
    lines = notifier.lines()
    assert any("cannot be loaded; still on the old one" in m for m in lines)
    assert "cannot be loaded" not in lines[-2]  # the revert cleared it


def test_a_half_written_file_is_not_acted_on_until_it_settles(tmp_path):
    path, cfg = loaded(tmp_path)
    clock, _notifier, rt = make()
    # an in-place rewrite seen mid-way (valid YAML, but not the final content), then final
    clock.at(1009.5, lambda: path.write_text("cluster: tw\n"))
    clock.at(1010.5, lambda: path.write_text("cluster: two\n"))
    d = Configured(cfg, lambda n: 600.0)
    assert run(rt, clock, d) == EXIT_CONFIG_CHANGED
    assert clock.t >= 1010.5 + SETTLE


def test_a_repointed_symlink_counts_and_a_config_from_no_file_is_not_watched(tmp_path):
    one = tmp_path / "roles" / "worker.yaml"
    one.parent.mkdir()
    one.write_text("cluster: w\n")
    (tmp_path / "roles" / "scheduler.yaml").write_text("cluster: s\n")
    link = tmp_path / "agent.yaml"
    link.symlink_to(one)
    cfg = load_config(str(link))
    clock, _notifier, rt = make()

    def repoint() -> None:
        link.unlink()
        link.symlink_to(tmp_path / "roles" / "scheduler.yaml")

    clock.at(1020.0, repoint)
    assert run(rt, clock, Configured(cfg, lambda n: 600.0)) == EXIT_CONFIG_CHANGED
    # config_from_dict (tests, no file): nothing to watch, the sleep is one wait
    clock, _notifier, rt = make()
    clock.at(1500.0, rt.request_stop)
    d = Configured(config_from_dict({}), lambda n: 600.0)
    assert run(rt, clock, d) == 0 and rt.config_watch is None


def test_a_named_file_that_disappears_is_a_problem_and_an_unnamed_one_means_defaults(
    tmp_path, monkeypatch
):
    path, cfg = loaded(tmp_path)  # named: --config
    clock, notifier, rt = make()
    clock.at(1010.0, path.unlink)
    clock.at(1060.0, rt.request_stop)
    assert run(rt, clock, Configured(cfg, lambda n: 5.0)) == 0
    assert any("cannot be loaded" in m for m in notifier.lines())
    # the default path, absent at start (defaults): cfn-init writing it later is a change
    default = tmp_path / "default.yaml"
    monkeypatch.setattr("agent.config.DEFAULT_CONFIG_PATH", str(default))
    monkeypatch.delenv("AIRFLOW_AGENT_CONFIG", raising=False)
    cfg = load_config()
    assert cfg.loaded_from.sha256 is None and not cfg.loaded_from.named
    clock, _notifier, rt = make()
    clock.at(1010.0, lambda: default.write_text("cluster: written\n"))
    assert run(rt, clock, Configured(cfg, lambda n: 600.0)) == EXIT_CONFIG_CHANGED


def test_a_problem_found_while_sleeping_shows_in_status_at_once(tmp_path):
    path, cfg = loaded(tmp_path)
    clock, notifier, rt = make()
    clock.at(1010.0, lambda: path.write_text("units: {chef: [x]}\n"))
    clock.at(1100.0, rt.request_stop)
    d = Configured(cfg, lambda n: 600.0)
    assert run(rt, clock, d) == 0
    shown = [(t, m) for t, m in notifier.sent if "cannot be loaded" in m]
    assert shown and 1010.0 <= shown[0][0] <= 1010.0 + CHECK_INTERVAL
    assert shown[0][1] == f"STATUS=1; {path} changed but cannot be loaded; still on the old one"
    assert d.passes == [1000.0]


def test_an_unexpected_error_of_the_watch_keeps_the_daemon_running(tmp_path, monkeypatch):
    path, cfg = loaded(tmp_path)
    clock, notifier, rt = make()

    def broken(loaded):
        raise RuntimeError("odd filesystem")

    monkeypatch.setattr("agent.runtime.config_watch.config_file_change", broken)
    clock.at(1050.0, rt.request_stop)
    assert run(rt, clock, Configured(cfg, lambda n: 5.0)) == 0
    assert any("cannot be loaded" in m for m in notifier.lines())
