"""How `variables sync` runs Airflow: as `variables.user`, dying with the agent, files private.

- `resolve_run_as`: the user switch (none when the agent already is that user);
- `AirflowCli`: the Airflow CLI through agent.platform.process with the units' environment,
  umask 077, a timeout, and a parent-death signal so a killed sync leaves no import still
  writing; its output is parsed (`exception_names`), never logged, because Airflow may quote
  values;
- `TempDir`: the 0600 import/export files of the cli method, in a private directory under the
  state dir that every run empties first (which cleans up after a SIGKILL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets as pysecrets
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from agent.errors import AgentError, ConfigError
from agent.platform import process
from agent.platform.process import RunAs

log = logging.getLogger(__name__)

TMP_DIR_NAME = "variables-tmp"


def resolve_run_as(user: Optional[str], source: str) -> Optional[RunAs]:
    """None when no switch is needed (user null, or the agent already runs as that user)."""
    if user is None:
        return None
    try:
        run_as = RunAs.lookup(user)
    except KeyError:
        raise ConfigError(f"{source}: key 'variables.user': user {user!r} does not exist") from None
    if run_as.uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise ConfigError(
            f"{source}: key 'variables.user' is {user!r} but the agent runs as uid "
            f"{os.geteuid()} and cannot switch; run it as root or set variables.user: null"
        )
    return run_as


def config_error(key: str, exc: process.ProcessError) -> AgentError:
    """A configured program that cannot be started is a configuration error naming its key;
    anything else stays the process error it is."""
    if exc.reason in (process.NOT_FOUND, process.NOT_EXECUTABLE):
        return ConfigError(f"{key}: {exc.program} {exc.reason}")
    return exc


IMPORT_COUNTS = re.compile(r"^(\d+) of (\d+) variables successfully updated", re.M)
_IMPORT_FAILED = re.compile(r"^Variable import failed: ([A-Za-z_][A-Za-z0-9_.]*)\(", re.M)
_EXC_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*(?:Error|Exception|Exit))\b")


def exception_names(output: str) -> List[str]:
    """Exception class names in Airflow's output; the rest of a line may quote a value."""
    names = set(_IMPORT_FAILED.findall(output))
    for line in output.splitlines():
        m = _EXC_LINE.match(line.strip())
        if m:
            names.add(m.group(1))
    return sorted(names)


class AirflowCli:
    """Runs `variables.airflow_command` with the units' environment, as the configured user."""

    def __init__(
        self,
        command: Sequence[str],
        env: Dict[str, str],
        run_as: Optional[RunAs],
        cwd: Path,
        timeout: float,
    ):
        self.command = list(command)
        self.env = env
        self.run_as = run_as
        self.cwd = cwd
        self.timeout = timeout
        self.calls = 0

    def run(self, *args: str) -> Tuple[int, str]:
        """(exit status, stdout+stderr). The output is for parsing, never for logging."""
        what = "airflow " + " ".join(args[:2])
        self.calls += 1
        started = time.monotonic()
        try:
            result = process.run(
                self.command + list(args),
                timeout=self.timeout,
                env=self.env,
                user=self.run_as,
                umask=0o077,
                cwd=self.cwd,
                merge_stderr=True,
                die_with_parent=True,
                label=what,
            )
        except process.ProcessError as exc:
            if exc.reason == process.TIMEOUT:
                raise process.ProcessError(
                    f"{exc} (variables.timeout)", program=exc.program, reason=exc.reason
                ) from None
            raise config_error("variables.airflow_command", exc) from None
        log.debug("%s: exit %d in %.1f s", what, result.returncode, time.monotonic() - started)
        return result.returncode, result.stdout


# ---------------------------------------------------------------- private temp files


class TempDir:
    """state_dir/variables-tmp: 0700 (0711 when the CLI runs as another user, so it can reach
    its file by name from its working directory; it cannot list the directory, and the state
    dir above stays 0700). Emptied at the start of every run, under the lock."""

    def __init__(self, state_dir: Path, run_as: Optional[RunAs]):
        self.path = state_dir / TMP_DIR_NAME
        self.run_as = run_as

    def prepare(self) -> int:
        mode = 0o711 if self.run_as else 0o700
        self.path.mkdir(mode=mode, exist_ok=True)
        os.chmod(self.path, mode)
        removed = 0
        for entry in self.path.iterdir():
            try:
                entry.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def create(self, prefix: str, data: bytes = b"") -> Tuple[str, int]:
        """A new 0600 file (owned by the CLI's user): (name relative to the dir, open fd)."""
        name = f"{prefix}-{pysecrets.token_hex(8)}.json"
        fd = os.open(
            str(self.path / name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        try:
            if self.run_as is not None:
                try:
                    os.fchown(fd, self.run_as.uid, self.run_as.gid)
                except PermissionError:
                    raise AgentError(
                        f"cannot hand the temp file to user {self.run_as.name} (fchown: "
                        "operation not permitted): running the Airflow CLI as another user "
                        "needs CAP_CHOWN and the @chown system calls in the agent's unit"
                    ) from None
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            self.remove(name)
            raise
        return name, fd

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / name).unlink()


def read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
