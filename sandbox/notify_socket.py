"""A NOTIFY_SOCKET like systemd's: a unix datagram socket that collects sd_notify messages.

Bind it in a test's directory, point `NOTIFY_SOCKET` at `path`, and read what the daemon sent
(`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`). Reads never block: `drain()` takes what
has arrived so far, so "no WATCHDOG=1 after time T" is checked by counting at T and later.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, List

from sandbox.proc import wait_for


class NotifySocket:
    def __init__(self, directory: Path, name: str = "notify"):
        self.path = str(Path(directory) / name)
        if len(self.path.encode()) > 100:  # sun_path holds 108 bytes
            raise ValueError(f"socket path too long for AF_UNIX: {self.path}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: List[str] = []

    def drain(self) -> List[str]:
        """Every message received so far, in order (one datagram = one message)."""
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return self.messages

    def count(self, line: str) -> int:
        """How many messages hold `line` (e.g. "WATCHDOG=1") as one of their lines."""
        return sum(1 for m in self.drain() if line in m.split("\n"))

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        wait_for(predicate, timeout, what, interval=0.02)

    def close(self) -> None:
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
