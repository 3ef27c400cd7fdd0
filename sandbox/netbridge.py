"""Forward a TCP port from inside a network namespace to the host's loopback.

The test rig's servers (moto, the IMDSv2 stand-in) listen on the host's 127.0.0.1; the agent
under test runs inside the systemd test host, whose network namespace has only its own
loopback. This program opens a listening socket on 127.0.0.1:PORT *inside* the target
namespace (setns for one moment, then straight back), and forwards every connection it accepts
to 127.0.0.1:PORT on the host. Nothing else is reachable through it.

Run by sandbox/systemd_host.py as its own process, ended by PID:

    python netbridge.py --netns /proc/PID/ns/net --port 8080 [--port 8081 ...]
    python netbridge.py --netns /proc/PID/ns/net --addr 169.254.169.254 --forward 80:8080

``--port P`` listens on P and forwards to the host's P; ``--forward L:H`` listens on L and
forwards to the host's H (an IMDS at 169.254.169.254:80 served by a rig on 127.0.0.1:H);
``--addr`` is the address inside the namespace the listeners bind (default 127.0.0.1; it must
already exist there).

The other way, ``--expose ADDR:PORT`` listens on the machine's 127.0.0.1 (a port the kernel
picks) and opens each upstream connection inside the namespace, to ADDR:PORT there: how
`python -m sandbox up` puts the stack's load balancer (inside its private link) on this
machine's loopback for a browser or curl. It then prints ``READY PORT``.

It prints ``READY`` once all listeners exist, and exits when its stdin reaches EOF (the parent
died or closed it), so a crashed test run does not leave it behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import socket
import subprocess
import sys
import threading
from typing import Callable, List, Optional, Tuple

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    # os.setns exists only from Python 3.12; the agent's floor is 3.9.
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def _in_netns(netns_path: str):
    """The calling thread inside the network namespace at netns_path for the block's length.

    A socket keeps the namespace it was created in, so a thread switches in only to create
    one and switches back at once; if switching back fails the process must not go on (it
    would forward traffic from the wrong namespace), so it exits.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, CLONE_NEWNET)
        try:
            yield
        finally:
            try:
                _setns(own, CLONE_NEWNET)
            except OSError as exc:  # pragma: no cover - cannot happen with a valid fd
                sys.stderr.write(f"netbridge: cannot return to own netns: {exc}\n")
                os._exit(3)
    finally:
        os.close(own)
        os.close(target)


def open_listener_in(netns_path: str, port: int, addr: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket bound to addr:port inside the network namespace at netns_path."""
    with _in_netns(netns_path):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(64)
    return sock


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        # Half-close so the peer sees EOF while the other direction may still flow.
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _splice(conn: socket.socket, upstream: socket.socket) -> None:
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
    back.start()
    _pump(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def _handle(conn: socket.socket, port: int) -> None:  # port: the host's
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        conn.close()
        return
    _splice(conn, upstream)


def _handle_exposed(conn: socket.socket, netns_path: str, target: Tuple[str, int]) -> None:
    try:
        with _in_netns(netns_path):
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        conn.close()
        return
    try:
        upstream.settimeout(10)
        upstream.connect(target)  # from inside the namespace the socket was made in
    except OSError:
        upstream.close()
        conn.close()
        return
    _splice(conn, upstream)


def _serve(listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


class ForwarderError(RuntimeError):
    """A forwarder that did not report READY in time (its stderr is in the message)."""


def _start(args: List[str], what: str, timeout: float) -> Tuple[subprocess.Popen, str]:
    """This program as its own process with args, once it says READY: (process, the rest of
    its READY line). It dies with the thread that calls this (PR_SET_PDEATHSIG) and when its
    stdin (kept by the caller) closes; ended by PID (sandbox.proc.end_process)."""
    # imported here: this file also runs as a plain script, without the repo on sys.path
    from sandbox.proc import die_with_parent, end_process

    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
        close_fds=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    word, _, rest = (proc.stdout.readline().decode() if ready else "").strip().partition(" ")
    if word != "READY":
        end_process(proc)
        raise ForwarderError(f"{what} did not start: {proc.stderr.read().decode(errors='replace')}")
    return proc, rest


def start_forwarder(
    netns_path: str, addr: str, listen_port: int, host_port: int, timeout: float = 10
) -> subprocess.Popen:
    """Forward addr:listen_port inside the namespace at netns_path to the machine's
    127.0.0.1:host_port (see _start for its life)."""
    args = [
        "--netns",
        netns_path,
        "--addr",
        addr,
        "--forward",
        f"{int(listen_port)}:{int(host_port)}",
    ]
    return _start(args, f"forwarder of {host_port}", timeout)[0]


def start_exposer(
    netns_path: str, addr: str, port: int, timeout: float = 10
) -> Tuple[subprocess.Popen, int]:
    """Put addr:port inside the namespace at netns_path on the machine's 127.0.0.1, at a port
    the kernel picks: (process, that port). See _start for its life."""
    proc, port_text = _start(
        ["--netns", netns_path, "--expose", f"{addr}:{int(port)}"],
        f"exposer of {addr}:{port}",
        timeout,
    )
    return proc, int(port_text)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", required=True, help="path of the target netns, /proc/PID/ns/net")
    ap.add_argument("--addr", default="127.0.0.1", help="listen address inside the netns")
    ap.add_argument("--port", type=int, action="append", default=[], help="same port both ends")
    ap.add_argument(
        "--forward", action="append", default=[], metavar="L:H", help="listen on L, forward to H"
    )
    ap.add_argument(
        "--expose", metavar="ADDR:PORT", help="listen on the machine's 127.0.0.1, connect to "
        "ADDR:PORT inside the netns; prints READY and the port it listens on"
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.expose:
        if args.port or args.forward:
            ap.error("--expose goes alone")
        addr, _, port = args.expose.rpartition(":")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        target = (addr, int(port))
        handle = lambda conn: _handle_exposed(conn, args.netns, target)  # noqa: E731
        threading.Thread(target=_serve, args=(listener, handle), daemon=True).start()
        sys.stdout.write(f"READY {listener.getsockname()[1]}\n")
    else:
        pairs = [(p, p) for p in args.port]
        for spec in args.forward:
            listen, _, host = spec.partition(":")
            pairs.append((int(listen), int(host)))
        if not pairs:
            ap.error("give at least one --port or --forward")
        for listen_port, host_port in pairs:
            sock = open_listener_in(args.netns, listen_port, args.addr)
            handle = lambda conn, hp=host_port: _handle(conn, hp)  # noqa: E731
            threading.Thread(target=_serve, args=(sock, handle), daemon=True).start()
        sys.stdout.write("READY\n")
    sys.stdout.flush()
    # Lives exactly as long as the parent keeps our stdin open.
    sys.stdin.buffer.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
