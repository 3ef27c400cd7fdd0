"""The agent's end of `variables.method: api`: spawn and talk to agent/airflow/bridge_server.py.

The co-process is the Airflow venv's interpreter (`variables.airflow_python`, default the
`python` beside `variables.airflow_command[0]`), run exactly like the Airflow CLI: as
`variables.user`, with the units' EnvironmentFile as its whole environment, umask 077, its
working directory the agent's private temp dir, and a parent-death signal so it never outlives
the agent (SIGKILL included): agent.platform.process prepares both the same way. Its argv is
a fixed one-line loader; the bridge's source arrives as the first stdin line, so nothing of
ours is installed in the Airflow venv and no value is ever on an argv. Its stderr (Airflow's
logs, which can quote values) goes to /dev/null.

Every request has a deadline (`variables.timeout`); a co-process that misses it, answers
garbage or exits is killed and reported, and the caller (`variables watch`) starts a new one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as pysecrets
import selectors
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from agent.airflow import bridge_server as airflow_bridge
from agent.airflow.execution import config_error
from agent.errors import AgentError
from agent.platform import process

log = logging.getLogger(__name__)

# compiles the source sent as the first stdin line; constant, so argv holds nothing of interest
LOADER = (
    "import sys,json;"
    "exec(compile(json.loads(sys.stdin.readline()),'airflow_bridge','exec'),"
    "{'__name__':'__airflow_bridge__'})"
)
# requests are chunked so a long first sync still lets the watch daemon pet its watchdog
CHUNK = 200


def bridge_source() -> str:
    return Path(airflow_bridge.__file__).read_text(encoding="utf-8")


def default_python(airflow_command: Sequence[str]) -> str:
    """`python` in the directory of the Airflow CLI (a venv's bin/)."""
    return str(Path(airflow_command[0]).parent / "python")


class BridgeError(AgentError):
    """The co-process failed as a whole (not one key): it is dead or gone, start another."""


class AirflowBridge:
    def __init__(
        self,
        python: str,
        env: Dict[str, str],
        run_as: Any,
        cwd: Path,
        timeout: float,
        die_with_parent: bool = True,
    ):
        self.python = python
        self.env = dict(env)
        self.run_as = run_as
        self.cwd = cwd
        self.timeout = timeout
        self.die_with_parent = die_with_parent
        self.proc: Optional[subprocess.Popen] = None
        self.requests = 0
        self.airflow_version = "?"
        # the verification key: fresh per co-process, never the state's key
        self.hmac_key = pysecrets.token_bytes(32)
        self._buf = b""

    # -- life cycle

    def start(self) -> AirflowBridge:
        started = time.monotonic()
        try:
            self.proc = process.spawn(
                [self.python, "-c", LOADER],
                env=self.env,
                user=self.run_as,
                umask=0o077,
                cwd=self.cwd,
                stdin=process.PIPE,
                stdout=process.PIPE,
                die_with_parent=self.die_with_parent,
            )
        except process.ProcessError as exc:
            raise config_error("variables.airflow_python", exc) from None
        try:
            self._write(json.dumps(bridge_source()))
            hello = self._read(time.monotonic() + self.timeout, "start")
        except BaseException:
            # e.g. SIGTERM (the oneshot's handler raises) while Airflow is still importing
            self.close(grace=0)
            raise
        if hello.get("op") != "hello" or not hello.get("ok"):
            self.close()
            raise BridgeError(
                "the Airflow bridge could not load Airflow with "
                f"{self.python} ({hello.get('error', 'no hello')}); is it the Airflow venv's "
                "python (variables.airflow_python)?"
            )
        self.airflow_version = str(hello.get("airflow", "?"))
        log.info(
            "airflow bridge started: pid %d, Airflow %s, ready in %.1f s",
            self.proc.pid,
            self.airflow_version,
            time.monotonic() - started,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def close(self, grace: float = 5.0) -> None:
        """Ends the co-process: EOF first (it exits its loop), then SIGKILL if it lingers.
        grace 0: SIGKILL at once (an aborted run; each key is its own transaction, so a kill
        mid-write loses at most that key, which is then not recorded as landed)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
        except OSError:
            pass
        if grace <= 0:
            proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=max(grace, 0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def __enter__(self) -> AirflowBridge:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the pipe

    def _fail(self, what: str) -> BridgeError:
        status = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            status = self.proc.wait()
        self.close()
        how = f" (exit status {status})" if status is not None else ""
        return BridgeError(f"the Airflow bridge {what}{how}; nothing more sent to it")

    def _write(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode("ascii") + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._fail("exited") from None

    def _read(self, deadline: float, op: str) -> Dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise self._fail(
                        f"did not answer {op} within {self.timeout:g} s (variables.timeout); killed"
                    )
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise self._fail(f"exited during {op}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise self._fail(f"answered {op} with something other than a JSON object")
        return reply

    def request(self, doc: Dict[str, Any]) -> Dict[str, Any]:
        if not self.alive():
            raise self._fail("is not running")
        op = doc["op"]
        started = time.monotonic()
        self.requests += 1
        self._write(json.dumps(doc, ensure_ascii=True))
        reply = self._read(started + self.timeout, op)
        if not reply.get("ok"):
            raise self._fail(f"refused {op} ({reply.get('error', '?')})")
        log.debug("airflow bridge %s: %.3f s", op, time.monotonic() - started)
        return reply

    # -- the operations (chunked; `tick` runs between chunks)

    def ping(self) -> None:
        self.request({"op": "ping"})

    def set(self, items: Dict[str, Dict[str, Any]], tick: Callable[[], None]) -> Dict[str, str]:
        failed: Dict[str, str] = {}
        keys = sorted(items)
        for i in range(0, len(keys), CHUNK):
            part = {k: items[k] for k in keys[i : i + CHUNK]}
            failed.update(self.request({"op": "set", "items": part}).get("failed") or {})
            tick()
        return failed

    def delete(self, keys: List[str], tick: Callable[[], None]) -> Dict[str, str]:
        failed: Dict[str, str] = {}
        for i in range(0, len(keys), CHUNK):
            part = keys[i : i + CHUNK]
            failed.update(self.request({"op": "delete", "keys": part}).get("failed") or {})
            tick()
        return failed

    def digests(self, keys: List[str], tick: Callable[[], None]) -> Dict[str, Optional[str]]:
        out: Dict[str, Optional[str]] = {}
        for i in range(0, len(keys), CHUNK * 5):
            part = keys[i : i + CHUNK * 5]
            reply = self.request({"op": "digest", "keys": part, "hmac_key": self.hmac_key.hex()})
            got = reply.get("digests") or {}
            out.update({k: got.get(k) for k in part})
            # a row that exists but cannot be read (e.g. a wrong fernet key): neither a match
            # nor absent
            out.update({k: f"error:{e}" for k, e in (reply.get("failed") or {}).items()})
            tick()
        return out


class BridgeProvider:
    """One co-process per sync run (`variables sync`): started on demand, closed after."""

    def __init__(self, python: str, timeout: float, die_with_parent: bool = True):
        self.python = python
        self.timeout = timeout
        self.die_with_parent = bool(die_with_parent)
        self.started = 0

    def _start(self, env: Dict[str, str], run_as: Any, cwd: Path) -> AirflowBridge:
        self.started += 1
        bridge = AirflowBridge(self.python, env, run_as, cwd, self.timeout, self.die_with_parent)
        return bridge.start()

    def acquire(self, env: Dict[str, str], run_as: Any, cwd: Path) -> AirflowBridge:
        return self._start(env, run_as, cwd)

    def release(self, bridge: AirflowBridge, broken: bool) -> None:
        bridge.close(grace=0 if broken else 5.0)

    def close(self) -> None:
        pass


class WarmBridgeProvider(BridgeProvider):
    """`variables watch`: keeps one co-process between runs. A new one is started when the old
    one died or failed, or when the environment it was started with (the env file: database
    URL, fernet key) or its user no longer match."""

    def __init__(self, python: str, timeout: float, die_with_parent: bool = True):
        super().__init__(python, timeout, die_with_parent)
        self.bridge: Optional[AirflowBridge] = None

    def current(self, env: Dict[str, str], run_as: Any) -> Optional[AirflowBridge]:
        b = self.bridge
        if b is None:
            return None
        if not b.alive():
            status = b.proc.poll() if b.proc else None
            log.warning("airflow bridge pid %s exited (status %s); starting another", b.pid, status)
            b.close()
            self.bridge = None
            return None
        if b.env != env or b.run_as != run_as:
            log.info("the Airflow environment changed; restarting the airflow bridge")
            b.close()
            self.bridge = None
            return None
        return b

    def acquire(self, env: Dict[str, str], run_as: Any, cwd: Path) -> AirflowBridge:
        b = self.current(env, run_as)
        if b is None:
            b = self.bridge = self._start(env, run_as, cwd)
        return b

    def release(self, bridge: AirflowBridge, broken: bool) -> None:
        if broken:
            bridge.close(grace=0)
            if self.bridge is bridge:
                self.bridge = None

    def close(self) -> None:
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None
