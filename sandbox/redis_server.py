"""redis-server as a plain child process on a free 127.0.0.1 port, ended by its PID.

The Celery broker of the drain tests, the demo and the benchmark: no persistence
(`--save '' --appendonly no`), bound to loopback only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from sandbox.proc import die_with_parent, end_process, wait_for
from sandbox.tiers import heavy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@heavy("redis")
class RedisServer:
    def __init__(self, port: Optional[int] = None):
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None
        self._dir = Path(tempfile.mkdtemp(prefix="aea-redisrig-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        with open(self._dir / "redis.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self._dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # not outliving a killed test run
            )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError((self._dir / "redis.log").read_text()[-2000:])
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_for(up, 10, f"redis-server on port {self.port}")
        return self

    def cli(self, *args: str) -> str:
        """One RESP command; the reply's text (simple strings and integers unwrapped)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            cmd = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
            s.sendall(cmd.encode())
            data = s.recv(65536).decode()
        return data[1:].strip() if data[:1] in "+:" else data.strip()

    def llen(self, key: str) -> int:
        return int(self.cli("LLEN", key))

    def stop(self) -> None:
        end_process(self.proc)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
