"""The supervisor's control socket: how `python -m sandbox deploy` asks the running stack for
a deployment.

The stack's objects (its instances' hosts, each instance's CodeDeploy stand-in directory, the
template's deployment groups and their order) live in the supervisor, `python -m sandbox up`;
so the deployment runs there, as `deploy_everywhere` runs it for the tests, one request at a
time. The socket is a Unix socket in the run directory, mode 0600 (root's, like the run
directory): a local root command talks to it, nothing else.

The protocol is JSON lines. The client sends one request, `{"deploy": "/abs/bundle.zip"}`;
the server answers with `{"progress": "..."}` lines (an instance's lifecycle event as it
ends) and one last `{"result": {...}}` or `{"error": "..."}` line, then closes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

CONTROL_SOCKET = "control.sock"


class ControlError(RuntimeError):
    """The supervisor could not be asked, or refused the request; the message says why."""


def deployment_summary(deployments: Dict[str, Any]) -> Dict[str, Any]:
    """{instance: {"succeeded", "message"}} of deploy_everywhere's result (JSON-able)."""
    return {
        name: {"succeeded": bool(d.succeeded), "message": d.message or ""}
        for name, d in deployments.items()
    }


class ControlServer:
    """Serves requests on `path` in a thread of its own until stop(); `deploy(bundle,
    deployment_id, progress)` is the stack's deployment (deploy_everywhere with the stack)."""

    def __init__(
        self, path: Path, deploy: Callable[[Path, str, Callable[[str], None]], Dict[str, Any]]
    ) -> None:
        self.path = Path(path)
        self._deploy = deploy
        self._count = itertools.count(1)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ControlServer:
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no window in which another user could connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(4)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        sock = self._sock  # its own reference: stop() drops the attribute while this waits
        assert sock is not None
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # stop() closed the socket
            with conn:  # one request at a time: two deployments must not interleave
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        out = conn.makefile("w", encoding="utf-8")

        def send(doc: Dict[str, Any]) -> None:
            out.write(json.dumps(doc) + "\n")
            out.flush()

        try:
            line = conn.makefile("r", encoding="utf-8").readline()
            try:
                request = json.loads(line)
                bundle = Path(request["deploy"])
            except (ValueError, KeyError, TypeError):
                send({"error": f"not a request this supervisor serves: {line.strip()[:200]!r}"})
                return
            if not bundle.is_absolute() or not bundle.is_file():
                send({"error": f"{bundle}: not an absolute path of a file"})
                return
            deployment_id = f"d-SANDBOX{next(self._count)}x{int(time.time())}"
            send({"progress": f"deployment {deployment_id}: {bundle}"})
            try:
                result = self._deploy(bundle, deployment_id, lambda text: send({"progress": text}))
            except Exception as exc:  # noqa: BLE001 - the client is told; the supervisor goes on
                send({"error": f"{type(exc).__name__}: {exc}"})
                return
            send({"result": result})
        except OSError:
            pass  # the client went away; the deployment (if any) ran to its end regardless

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        self.path.unlink(missing_ok=True)


def request(path: Path, doc: Dict[str, Any], timeout: float = 3600) -> Iterator[Dict[str, Any]]:
    """Send one request to the supervisor's socket; yields its answer's lines as they come."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot reach the supervisor at {path}: {exc.strerror}") from None
    with sock:
        sock.sendall((json.dumps(doc) + "\n").encode())
        for line in sock.makefile("r", encoding="utf-8"):
            if line.strip():
                yield json.loads(line)
