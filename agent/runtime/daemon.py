"""The one loop every daemon runs on: confapply, lifecycle watch, variables watch, metrics.

A daemon supplies only its own decisions (a `Daemon`): `step()` does one pass and returns the
seconds until the next one, `status()` is its one-line state. `DaemonRuntime.run()` does the
rest, the same way for all of them:

- SIGTERM/SIGINT only set the stop event; the loop notices between passes, sends STOPPING=1,
  calls `close()` and returns 0 (a pass in progress finishes; the daemon may look at
  `runtime.stopping` inside a long pass to stop early).
- READY=1 (with STATUS=) after the first pass, so `systemctl start` returns once the daemon has
  done its initial work; STATUS= again whenever `status()` changes.
- WATCHDOG=1 from a pinger thread every WatchdogSec/4, but only while the loop is alive:
  sleeping in the runtime's own wait (which cannot hang), or within WatchdogSec/2 of the last
  sign of life of a pass (its start, `beat()`, or the end of a declared `busy(seconds)`
  section). A pass that hangs stops the pings and systemd's WatchdogSec kills the unit (and
  Restart= starts it again) at most 1.5 x WatchdogSec after its last sign of life; a pass that
  shows no life for less than WatchdogSec never leaves that long a gap between pings.
- the sleep between passes wakes early on stop, or on `nudge()` (an event another thread of
  the daemon saw, e.g. a file change);
- time comes from an injected `Clock` (now, wait on an event, a periodic callback), so tests
  can run the whole loop, pinger included, on virtual time;
- after each pass the agent's events it recorded are flushed (agent.events.publish), as a busy
  section bounded by `metrics.events.flush_timeout`;
- agent.yaml is watched (agent/runtime/config_watch.py): the file the daemon's config was
  loaded from (`config=`, else the daemon's own `cfg`) is hashed before each pass and every
  `CHECK_INTERVAL` s of the sleep; once it holds different content that loads, the loop ends
  as on SIGTERM (the pass in progress finishes, STOPPING=1, `close()`) and `run()` returns
  `EXIT_CONFIG_CHANGED` (75), which the units' `Restart=` answers by starting the daemon on the
  new file. Content that does not load is reported (log, STATUS=) and the daemon keeps running.

The notify variables are removed from os.environ once the notifier holds its socket, so the
processes a daemon starts (systemctl, the Airflow bridge) do not inherit them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

from agent.errors import EXIT_OK
from agent.platform.notify import Notifier, detach_from_children
from agent.runtime.config_watch import CHECK_INTERVAL, EXIT_CONFIG_CHANGED, ConfigWatch

log = logging.getLogger(__name__)

_FROM_ENV = object()


class Clock:
    """Real time: a monotonic now, an event wait that wakes early, a periodic thread."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(timeout)

    def every(self, interval: float, fn: Callable[[], None], halt: threading.Event) -> None:
        """Call `fn` now and every `interval` seconds until `halt` is set, in a thread."""

        def loop() -> None:
            while not halt.is_set():
                fn()
                halt.wait(interval)

        threading.Thread(target=loop, name="watchdog-ping", daemon=True).start()


def watchdog_interval(
    watchdog_usec: Optional[str], fallback: Optional[float], watchdog_pid: Optional[str] = None
) -> Optional[float]:
    """Seconds between WATCHDOG=1 pings: a quarter of systemd's $WATCHDOG_USEC, else `fallback`.

    A quarter, with liveness bounded at twice the interval (half of WatchdogSec): the gap between
    two pings is then never longer than the longest a pass went without a sign of life.

    A WATCHDOG_PID naming another process means the watchdog is not ours (sd_watchdog_enabled).
    """
    if watchdog_pid and watchdog_pid.strip() != str(os.getpid()):
        watchdog_usec = None
    if watchdog_usec:
        try:
            usec = int(watchdog_usec)
        except ValueError:
            usec = 0
        if usec > 0:
            return usec / 4e6
    return fallback if fallback is not None and fallback > 0 else None


class Liveness:
    """The pinger's one question: has the loop shown life recently enough?"""

    def __init__(self, clock: Clock, bound: float):
        self.clock = clock
        self.bound = bound
        self._beat = clock.now()
        self._busy_until = float("-inf")
        self._waiting = False

    def beat(self) -> None:
        self._beat = self.clock.now()

    @contextlib.contextmanager
    def busy(self, seconds: float) -> Iterator[None]:
        """A section that may block up to `seconds` (e.g. a bounded `systemctl restart`)."""
        previous = self._busy_until
        self._busy_until = max(previous, self.clock.now() + seconds)
        try:
            yield
        finally:
            self._busy_until = previous
            self.beat()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False
            self.beat()

    def alive(self) -> bool:
        if self._waiting:
            return True
        now = self.clock.now()
        return now - self._beat < self.bound or now < self._busy_until


class Daemon:
    """What a daemon supplies; `DaemonRuntime.run()` drives it. A daemon whose `cfg` (an
    AgentConfig) came from a file has that file watched (see the module docstring)."""

    def start(self) -> None:
        """Before the first pass (e.g. start watching files)."""

    def step(self) -> float:
        """One pass; the seconds until the next (the sleep wakes early on stop or nudge)."""
        raise NotImplementedError

    def status(self) -> str:
        """One line for systemd's STATUS=."""
        return ""

    def close(self) -> None:
        """After the last pass, on stop or on an error."""


class DaemonRuntime:
    """Signals, sd_notify, the watchdog pinger and the sleep, for one daemon."""

    def __init__(
        self,
        name: str,
        notifier: Optional[Notifier] = None,
        clock: Optional[Clock] = None,
        watchdog_usec: Any = _FROM_ENV,
        watchdog_fallback: Optional[float] = None,
        config: Any = None,
    ):
        self.name = name
        self.config = config
        self.config_watch: Optional[ConfigWatch] = None
        self.config_changed = False
        self._daemon: Optional[Daemon] = None
        self.clock = clock or Clock()
        if watchdog_usec is _FROM_ENV:
            watchdog_usec = os.environ.get("WATCHDOG_USEC")
            pid = os.environ.get("WATCHDOG_PID")
        else:
            pid = None
        self.interval = watchdog_interval(watchdog_usec, watchdog_fallback, pid)
        self.notifier = notifier if notifier is not None else Notifier()
        # the notifier holds its socket now; children must not notify in our name
        detach_from_children()
        self.liveness = Liveness(self.clock, 2 * (self.interval or 0.0))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.signal_received: Optional[int] = None
        self._status: Optional[str] = None
        # the pinger checks `_halted` under this lock, so no WATCHDOG=1 follows STOPPING=1
        self._ping_lock = threading.Lock()
        self._halted = False

    # -- for the daemon ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def now(self) -> float:
        return self.clock.now()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def nudge(self) -> None:
        """Wake the sleep between passes now (safe from any thread)."""
        self._wake.set()

    def beat(self) -> None:
        """A sign of life inside a long pass (keeps the watchdog pinging)."""
        self.liveness.beat()

    def busy(self, seconds: float):
        """Context manager: a section that may block up to `seconds` without a beat."""
        return self.liveness.busy(seconds)

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self.notifier.status(text)

    # -- the loop ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # only the flag: the loop acts between passes
        self.signal_received = signum
        self.request_stop()

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal.signal works in the main thread only (tests run loops elsewhere)
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _ping(self) -> None:
        with self._ping_lock:
            if not self._halted and self.liveness.alive():
                self.notifier.watchdog()

    def _watch_config(self, daemon: Daemon) -> None:
        cfg = self.config if self.config is not None else getattr(daemon, "cfg", None)
        loaded = getattr(cfg, "loaded_from", None)
        if loaded is not None:
            self.config_watch = ConfigWatch(loaded, self.clock.now)
            log.info("%s: restarts when %s changes", self.name, loaded.path)

    def _config_changed(self) -> bool:
        if self.config_watch is None or not self.config_watch.check():
            return False
        log.info(
            "%s: %s changed; stopping (exit %d) so systemd starts it on the new one",
            self.name,
            self.config_watch.loaded.path,
            EXIT_CONFIG_CHANGED,
        )
        self.config_changed = True
        self.status(f"{self.config_watch.loaded.path} changed: restarting to load it")
        return True

    def _sleep(self, delay: float) -> None:
        """The wait between passes: wakes on stop or nudge, and looks at agent.yaml meanwhile."""
        if self.config_watch is None:
            self.clock.wait(self._wake, delay)
            return
        end = self.clock.now() + delay
        while True:
            remaining = end - self.clock.now()
            if remaining <= 0:
                return
            if self.clock.wait(self._wake, min(remaining, CHECK_INTERVAL)):
                return
            if self._config_changed():
                return
            if self._daemon is not None:
                # a problem found (or gone) while sleeping shows now, not after the next pass
                self.status(self._status_text(self._daemon))

    def _flush_events(self, daemon: Daemon) -> None:
        """The events the pass recorded (agent.events), sent within their flush timeout."""
        cfg = self.config if self.config is not None else getattr(daemon, "cfg", None)
        events = getattr(getattr(cfg, "metrics", None), "events", None)
        if events is None:
            return
        from agent.events.publish import flush_pending

        with self.busy(events.flush_timeout + 10):  # + IMDS's region and credentials
            flush_pending(cfg)

    def _status_text(self, daemon: Daemon) -> str:
        text = daemon.status()
        problem = self.config_watch.problem if self.config_watch is not None else ""
        return f"{text}; {problem}" if text and problem else (text or problem)

    def run(self, daemon: Daemon) -> int:
        previous = self._install_signals()
        halt = threading.Event()
        self._halted = False
        self._daemon = daemon
        self._watch_config(daemon)
        try:
            daemon.start()
            if self.interval:
                self.liveness.beat()
                self.clock.every(self.interval, self._ping, halt)
            first = True
            while not self._stop.is_set():
                # cleared before the pass, so a nudge during it is not lost
                self._wake.clear()
                self.liveness.beat()
                if self.config_changed or (not first and self._config_changed()):
                    break
                delay = daemon.step()
                self._flush_events(daemon)
                text = self._status_text(daemon)
                if first:
                    first = False
                    self._status = text
                    self.notifier.ready(text)
                    log.info(
                        "%s ready (watchdog %s): %s",
                        self.name,
                        f"every {self.interval:g}s" if self.interval else "off",
                        text,
                    )
                else:
                    self.status(text)
                if self._stop.is_set():
                    break
                with self.liveness.waiting():
                    self._sleep(max(0.0, delay))
            if self.signal_received is not None:
                log.info("%s: stopping on signal %d", self.name, self.signal_received)
        except Exception as exc:
            self.notifier.status(f"failed: {type(exc).__name__}: {exc}"[:200])
            raise
        finally:
            halt.set()
            with self._ping_lock:
                self._halted = True
            self.notifier.stopping()
            try:
                daemon.close()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        return EXIT_CONFIG_CHANGED if self.config_changed else EXIT_OK
