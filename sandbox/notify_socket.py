"""A NOTIFY_SOCKET like systemd's: a unix datagram socket that collects sd_notify messages.

Bind it in a test's directory, point `NOTIFY_SOCKET` at `path`, and read what the daemon sent
(`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`). Like systemd, it reads all the time:
a thread takes every datagram as it arrives. That matters because a sender blocks once the
receiver's queue holds `net.unix.max_dgram_qlen` datagrams (10 by default): a socket read only
when a test looks would stall a daemon that pings once a second within ten seconds, and a stop
would then wait on the test instead of the daemon. `drain()` also takes what is queued at the
moment it is called, so a message sent before the call is always in its answer; "no WATCHDOG=1
after time T" is checked by counting at T and later.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from pathlib import Path
from typing import Callable, List

from sandbox.proc import wait_for

# how long the reader waits for a datagram before it looks at the closed flag again
READ_POLL = 0.05


class NotifySocket:
    def __init__(self, directory: Path, name: str = "notify"):
        self.path = str(Path(directory) / name)
        if len(self.path.encode()) > 100:  # sun_path holds 108 bytes
            raise ValueError(f"socket path too long for AF_UNIX: {self.path}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: List[str] = []
        # one reader at a time, so the messages keep the order they were sent in
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read_all_the_time, daemon=True)
        self._reader.start()

    def _take_queued(self) -> None:
        with self._lock:
            while not self._closed.is_set():
                try:
                    self.messages.append(self.sock.recv(65536).decode())
                except BlockingIOError:
                    return

    def _read_all_the_time(self) -> None:
        while not self._closed.is_set():
            try:
                readable, _, _ = select.select([self.sock], [], [], READ_POLL)
            except (OSError, ValueError):  # closed under us
                return
            if readable:
                self._take_queued()

    def drain(self) -> List[str]:
        """Every message received so far, in order (one datagram = one message)."""
        self._take_queued()
        with self._lock:
            return list(self.messages)

    def count(self, line: str) -> int:
        """How many messages hold `line` (e.g. "WATCHDOG=1") as one of their lines."""
        return sum(1 for m in self.drain() if line in m.split("\n"))

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        wait_for(predicate, timeout, what, interval=0.02)

    def close(self) -> None:
        self._closed.set()
        self._reader.join(5)
        with self._lock:
            self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
