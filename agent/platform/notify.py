"""sd_notify for `Type=notify` daemons: READY, STATUS, WATCHDOG, STOPPING.

A thin wrapper over sdnotify, which connects to `$NOTIFY_SOCKET` when constructed and does
nothing without it (what we want outside systemd). `detach_from_children()` removes the
notify variables from this process's environment once the notifier holds its socket, so the
processes a daemon starts (systemctl, the Airflow bridge) do not inherit them: systemd would log
(and ignore) notifications from a PID that is not the unit's main one.
"""

from __future__ import annotations

import os

# what systemd hands a notify service; only the main process should act on them
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """sd_notify: READY, STATUS, WATCHDOG, STOPPING. Silent outside a notify unit."""

    def __init__(self):
        try:
            import sdnotify

            self._n = sdnotify.SystemdNotifier()
        except ImportError:  # pragma: no cover - sdnotify is a hard dependency
            self._n = None

    def _send(self, msg: str) -> None:
        if self._n is not None:
            self._n.notify(msg)

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")


def detach_from_children() -> None:
    """Drop the notify variables from os.environ (a Notifier made before keeps its socket)."""
    for name in NOTIFY_ENV:
        os.environ.pop(name, None)
