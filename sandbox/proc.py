"""Start a rig server as a child process on a free loopback port and end it by its PID."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns a truthy value or `timeout` passes; return the value.

    The predicate may raise until its condition holds; the last such exception is named in the
    TimeoutError and chained to it, so a timeout says why.
    """
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:g}s waiting for {what} (last: {last_exc})"
            ) from last_exc
        time.sleep(interval)


class ServerProcess:
    """A `python -m <module> --port-file F` child; `.port` once it is listening."""

    def __init__(self, module: str, args: Optional[List[str]] = None, log_name: str = ""):
        self.module = module
        # the servers are test infrastructure: the 3.9 unit run borrows the 3.11 venv's
        # Python for them (moto's server app is newer there), the product stays on 3.9
        self.python = os.environ.get("RIG_PYTHON") or sys.executable
        self.args = args or []
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self._dir = tempfile.mkdtemp(prefix="aea-rig-")
        self.log_path = Path(self._dir) / f"{log_name or module.rsplit('.', 1)[-1]}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        port_file = Path(self._dir) / "port"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", self.module, "--port-file", str(port_file), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(REPO_ROOT),
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited: {self.log_path.read_text()[-2000:]}")
            text = port_file.read_text() if port_file.exists() else ""
            if not text.strip():
                return False
            self.port = int(text)
            return self.get("/_rig/health") == "ok"

        wait_for(ready, timeout, f"{self.module} to listen")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- control API -----------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as resp:
            payload = resp.read()
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})


def serve_forever(server, port_file: str) -> None:
    """Write the bound port for the parent, then serve until SIGTERM."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, port_file)
    with contextlib.suppress(SystemExit):
        server.serve_forever()
