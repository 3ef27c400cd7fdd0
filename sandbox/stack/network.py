"""The launched stack's private link: a "switch" network namespace that joins the test hosts.

TESTING.md "Several instances" is the recipe. `Switch.start()` starts one small process in a
new network namespace of its own (`unshare --net`), and inside it: lo up, bridge br0 with
10.77.0.1/24 (the address the stand-ins and the forwarded moto listen on). `attach(host)` adds
a veth pair vN/eN in the switch, moves eN into the systemd test host's namespace (the host is
already in a namespace of its own), enslaves vN to br0, and gives eN 10.77.0.(10+N)/24 inside
the host. `forward(port)` makes the machine's 127.0.0.1:port reachable at 10.77.0.1:port inside
the switch (so from every host), with sandbox/netbridge.py; `expose(addr, port)` is the other
way, an address on the link (the load balancer stand-in's) on the machine's 127.0.0.1 at a
port the kernel picks. `argv(cmd)` runs a stand-in inside the switch namespace.

Nothing here touches the machine's own network namespace: every `ip` command runs under
`nsenter --net=` of the switch (checked before the first one) or inside a host. Teardown is by
PID: the forwarders, then the switch process; its namespace, br0 and every vN go with it, and
each eN (the other end of a pair) with them.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
from typing import Any, Dict, List, Optional, Sequence

from sandbox.netbridge import ForwarderError, start_exposer, start_forwarder
from sandbox.proc import die_with_parent, end_process
from sandbox.tiers import heavy

PREFIX = "10.77.0"
GATEWAY = f"{PREFIX}.1"
FIRST_HOST = 10


class NetworkError(RuntimeError):
    """The private link could not be built."""


@heavy("systemd")
class Switch:
    """A network namespace with bridge br0 (10.77.0.1/24); see the module docstring."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.addresses: Dict[str, str] = {}  # host name -> its address on the link
        self._forwarders: List[subprocess.Popen] = []
        self._next = 0
        # a group's instances boot in threads at once: one attach/forward at a time
        self._lock = threading.Lock()

    @property
    def netns(self) -> str:
        if self.proc is None or self.proc.poll() is not None:
            raise NetworkError("the switch is not running")
        return f"/proc/{self.proc.pid}/ns/net"

    def argv(self, cmd: Sequence[str]) -> List[str]:
        """cmd run inside the switch's network namespace (nsenter execs it: same PID)."""
        return ["nsenter", f"--net={self.netns}", "--", *cmd]

    def ip(self, *args: str) -> str:
        p = subprocess.run(self.argv(["ip", *args]), capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise NetworkError(f"ip {' '.join(args)} (in the switch): {p.stderr.strip()}")
        return p.stdout

    def start(self) -> Switch:
        # `cat` reading a pipe: it lives exactly as long as we keep its stdin open, and the
        # kernel kills it if this process dies first (die_with_parent).
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--", "cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
            close_fds=True,
        )
        try:
            own = os.readlink("/proc/self/ns/net")
            for _ in range(200):  # until unshare has exec'd cat in the new namespace
                ns = os.readlink(self.netns)
                if ns != own:
                    break
                select.select([], [], [], 0.01)
            else:
                raise NetworkError("the switch process never left the machine's namespace")
            self.ip("link", "set", "lo", "up")
            self.ip("link", "add", "br0", "type", "bridge")
            self.ip("addr", "add", f"{GATEWAY}/24", "dev", "br0")
            self.ip("link", "set", "br0", "up")
        except BaseException:
            self.stop()
            raise
        return self

    def attach(self, host: Any) -> str:
        """Join a SystemdHost to the link; returns its address (10.77.0.(10+N)). Thread-safe."""
        with self._lock:
            return self._attach(host)

    def _attach(self, host: Any) -> str:
        if host.pid is None:
            raise NetworkError(f"host {host.name} is not running")
        n = self._next
        self._next += 1
        addr = f"{PREFIX}.{FIRST_HOST + n}"
        veth, inside = f"v{n}", f"e{n}"
        self.ip("link", "add", veth, "type", "veth", "peer", "name", inside)
        self.ip("link", "set", inside, "netns", str(host.pid))
        self.ip("link", "set", veth, "master", "br0")
        self.ip("link", "set", veth, "up")
        host.run(["ip", "link", "set", "lo", "up"])
        host.run(["ip", "addr", "add", f"{addr}/24", "dev", inside])
        host.run(["ip", "link", "set", inside, "up"])
        self.addresses[host.name] = addr
        return addr

    def forward(self, host_port: int, port: Optional[int] = None, timeout: float = 10) -> str:
        """The machine's 127.0.0.1:host_port at 10.77.0.1:port (default the same port).

        The forwarder dies with the thread that calls this (PR_SET_PDEATHSIG): call it from a
        thread that lives as long as the stack (the supervisor's main thread)."""
        with self._lock:
            return self._forward(host_port, port, timeout)

    def _forward(self, host_port: int, port: Optional[int], timeout: float) -> str:
        lport = int(host_port if port is None else port)
        try:
            proc = start_forwarder(self.netns, GATEWAY, lport, host_port, timeout)
        except ForwarderError as exc:
            raise NetworkError(str(exc)) from None
        self._forwarders.append(proc)
        return f"{GATEWAY}:{lport}"

    def expose(self, addr: str, port: int, timeout: float = 10) -> str:
        """addr:port of the link reachable at the machine's 127.0.0.1:P; returns that address.
        Like forward(), it dies with the calling thread: call it from the supervisor's."""
        with self._lock:
            try:
                proc, local = start_exposer(self.netns, addr, port, timeout)
            except ForwarderError as exc:
                raise NetworkError(str(exc)) from None
            self._forwarders.append(proc)
            return f"127.0.0.1:{local}"

    def stop(self) -> None:
        """End the forwarders and the switch by PID (idempotent)."""
        for proc in self._forwarders:
            end_process(proc)
        self._forwarders = []
        if self.proc is not None:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            end_process(self.proc)

    def __enter__(self) -> Switch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
