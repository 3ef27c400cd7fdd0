"""The event spool: `<state_dir>/events.spool`, one JSON line per event (agent.events.plan),
mode 0600 in the root-only state dir; no secret is ever in it (a metric, a number, a time, a
role).

Every process of the agent appends to it (a drain in the deploy hook, the lifecycle and
confapply daemons, env sync's timer), and one flusher at a time removes what it sent. Both
hold `events.lock` (a flock, waited for at most `LOCK_WAIT`) for the few file operations
only, never across the CloudWatch call, so an append never waits on AWS. Events are removed by
id, so an append or a trim that happens while a flush is sending loses nothing.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

from agent.events.plan import Event, bounded, parse_spool
from agent.platform.fsutil import FileLock, atomic_write

SPOOL = "events.spool"
LOCK = "events.lock"
FLUSH_LOCK = "events.flush.lock"
LOCK_WAIT = 2.0  # the lock is held for file operations only: milliseconds


class SpoolBusy(OSError):
    """The spool's lock was not free within LOCK_WAIT."""


class Spool:
    def __init__(self, state_dir: str, most: int):
        self.dir = Path(state_dir)
        self.path = self.dir / SPOOL
        self.most = most

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = FileLock(self.dir / LOCK)
        if not lock.acquire(time.monotonic() + LOCK_WAIT):
            raise SpoolBusy(f"{self.dir / LOCK} held for more than {LOCK_WAIT:g}s")
        try:
            yield
        finally:
            lock.release()

    def _read(self) -> Tuple[List[Event], int]:
        try:
            fd = os.open(str(self.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return [], 0
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
            return parse_spool(f.read())

    def _write(self, events: List[Event]) -> None:
        atomic_write(self.path, "".join(e.to_line() for e in events).encode(), mode=0o600)

    def pending(self) -> bool:
        """Anything in the spool (one stat, no lock): whether a flush has work."""
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def append(self, event: Event) -> int:
        """Add `event`; the number of oldest events dropped to keep `most`."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            events, bad = self._read()
            if len(events) < self.most and not bad:
                fd = os.open(
                    str(self.path),
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                try:
                    os.write(fd, event.to_line().encode())
                finally:
                    os.close(fd)
                return 0
            kept, dropped = bounded(events + [event], self.most)
            self._write(kept)
            return dropped

    def read(self) -> List[Event]:
        if not self.dir.is_dir():
            return []  # nothing was ever recorded here
        with self._locked():
            return self._read()[0]

    def remove(self, ids: Iterable[str]) -> int:
        """Remove the events with these ids (sent, or refused for good); how many are left."""
        gone = set(ids)
        with self._locked():
            events, _bad = self._read()
            left = [e for e in events if e.id not in gone]
            self._write(left)
            return len(left)

    @contextlib.contextmanager
    def flusher(self) -> Iterator[bool]:
        """True when this process is the one flusher now (never waits: another flushes)."""
        lock = FileLock(self.dir / FLUSH_LOCK)
        held = lock.acquire(time.monotonic())
        try:
            yield held
        finally:
            if held:
                lock.release()
