"""Child processes of the sandbox: wait for a condition, end a child by its PID, and start a
rig server as a child on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
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


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended. A zombie (ended, not yet reaped by its
    parent, e.g. a test's Popen child) has ended, though `kill(pid, 0)` still finds it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def die_with_parent() -> None:
    """preexec_fn of a child that must not outlive this process, even when it is SIGKILLed
    (PR_SET_PDEATHSIG = SIGKILL: the kernel kills the child when the forking thread dies)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def end_process(
    proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, grace: float = 10.0
) -> Optional[int]:
    """End a child this process started, by its PID: `sig`, then SIGKILL if it is still alive
    after `grace` seconds. A child that already exited is only reaped. Returns its exit status
    (None when there is no child)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


class ServerProcess:
    """A `python -m <module> --port-file F` child; `.port` once it is listening."""

    def __init__(self, module: str, args: Optional[List[str]] = None, log_name: str = ""):
        self.module = module
        self.args = args or []
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self._dir = tempfile.mkdtemp(prefix="aea-rig-")
        self.log_path = Path(self._dir) / f"{log_name or module.rsplit('.', 1)[-1]}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        os.makedirs(self._dir, exist_ok=True)  # again after a stop()
        port_file = Path(self._dir) / "port"
        port_file.unlink(missing_ok=True)  # a restart's port, not the last run's
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--port-file", str(port_file), *self.args],
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
        """End the server by PID, then remove its directory (port file, log): nothing of a
        run stays behind in /tmp."""
        end_process(self.proc)
        shutil.rmtree(self._dir, ignore_errors=True)

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
