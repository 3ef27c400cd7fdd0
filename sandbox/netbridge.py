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
from typing import List, Optional

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    # os.setns exists only from Python 3.12; the agent's floor is 3.9.
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_listener_in(netns_path: str, port: int, addr: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket bound to addr:port inside the network namespace at netns_path.

    A socket keeps the namespace it was created in, so the calling thread switches in only to
    create it and switches back at once; if switching back fails the process must not go on
    (it would forward host traffic from the wrong namespace), so it exits.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, CLONE_NEWNET)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, port))
            sock.listen(64)
        finally:
            try:
                _setns(own, CLONE_NEWNET)
            except OSError as exc:  # pragma: no cover - cannot happen with a valid fd
                sys.stderr.write(f"netbridge: cannot return to own netns: {exc}\n")
                os._exit(3)
    finally:
        os.close(own)
        os.close(target)
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


def _handle(conn: socket.socket, port: int) -> None:  # port: the host's
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        conn.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
    back.start()
    _pump(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def _serve(listener: socket.socket, port: int) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_handle, args=(conn, port), daemon=True).start()


class ForwarderError(RuntimeError):
    """A forwarder that did not report READY in time (its stderr is in the message)."""


def start_forwarder(
    netns_path: str, addr: str, listen_port: int, host_port: int, timeout: float = 10
) -> subprocess.Popen:
    """Run this program as its own process forwarding addr:listen_port inside the namespace at
    netns_path to the machine's 127.0.0.1:host_port, once it says READY; ended by PID
    (sandbox.proc.end_process). It dies with the thread that calls this (PR_SET_PDEATHSIG) and
    when its stdin (kept by the caller) closes."""
    # imported here: this file also runs as a plain script, without the repo on sys.path
    from sandbox.proc import die_with_parent, end_process

    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--netns",
            netns_path,
            "--addr",
            addr,
            "--forward",
            f"{int(listen_port)}:{int(host_port)}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
        close_fds=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready or proc.stdout.readline().strip() != b"READY":
        end_process(proc)
        raise ForwarderError(
            f"forwarder of {host_port} did not start: {proc.stderr.read().decode(errors='replace')}"
        )
    return proc


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", required=True, help="path of the target netns, /proc/PID/ns/net")
    ap.add_argument("--addr", default="127.0.0.1", help="listen address inside the netns")
    ap.add_argument("--port", type=int, action="append", default=[], help="same port both ends")
    ap.add_argument(
        "--forward", action="append", default=[], metavar="L:H", help="listen on L, forward to H"
    )
    args = ap.parse_args(argv)
    pairs = [(p, p) for p in args.port]
    for spec in args.forward:
        listen, _, host = spec.partition(":")
        pairs.append((int(listen), int(host)))
    if not pairs:
        ap.error("give at least one --port or --forward")
    listeners = [(open_listener_in(args.netns, lp, args.addr), hp) for lp, hp in pairs]
    for sock, port in listeners:
        threading.Thread(target=_serve, args=(sock, port), daemon=True).start()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    # Lives exactly as long as the parent keeps our stdin open.
    sys.stdin.buffer.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
