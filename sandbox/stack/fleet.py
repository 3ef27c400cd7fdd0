"""The launched stack's instances as the supervisor tracks them (`Member`: moto's instance,
its IMDS server, its systemd test host), and the link shared by instances booting at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from sandbox.imds_server import ImdsServer


@dataclass
class Member:
    """One instance of the stack: moto's instance, its IMDS and its systemd test host."""

    instance_id: str
    role: str
    group: str
    zone: str
    imds: ImdsServer
    instance: Any = None  # sandbox.stack.instance.Instance once started

    @property
    def name(self) -> str:
        return f"{self.role}-{self.instance_id[-6:]}"


class SerialSwitch:
    """The link, with `attach` taken one at a time: instances of a group boot on threads and
    each joins the link (an address and a veth pair apiece) from its own."""

    def __init__(self, switch: Any):
        self._switch = switch
        self._lock = threading.Lock()

    def attach(self, host: Any) -> str:
        with self._lock:
            return self._switch.attach(host)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._switch, name)
