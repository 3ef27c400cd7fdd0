"""systemctl behind one small object, so every job controls units the same way.

The command is configurable (`systemctl` in agent.yaml) so a test or the sandbox can point it
elsewhere; the tests that prove jobs work drive a real systemd. It runs through
agent.platform.process; sd_notify is in agent.platform.notify.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Iterable, Optional, Sequence

from agent.errors import AgentError, DeadlineError
from agent.platform import process

log = logging.getLogger(__name__)


class SystemctlError(process.ProcessError):
    """A systemctl call failed; the message carries its stderr."""


class Systemctl:
    def __init__(self, command: Sequence[str] = ("systemctl",), timeout: float = 120.0):
        self.command = list(command)
        self.timeout = timeout

    def _run(
        self, *args: str, check: bool = True, timeout: Optional[float] = None
    ) -> process.Result:
        # unit names and verbs only: systemctl's argv and stderr hold nothing secret
        return process.run(
            self.command + list(args),
            timeout=timeout or self.timeout,
            check=check,
            quote_stderr=True,
            label=" ".join(["systemctl", *args]),
            error=SystemctlError,
        )

    # -- queries ---------------------------------------------------------------------------

    def show(self, unit: str, *props: str) -> Dict[str, str]:
        proc = self._run("show", unit, "--property=" + ",".join(props), check=False)
        out: Dict[str, str] = {}
        for line in proc.stdout.splitlines():
            k, sep, v = line.partition("=")
            if sep:
                out[k] = v
        return out

    def active_state(self, unit: str) -> str:
        return self.show(unit, "ActiveState").get("ActiveState", "unknown")

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID").get("MainPID") or 0)

    def is_enabled(self, unit: str) -> str:
        proc = self._run("is-enabled", unit, check=False)
        return proc.stdout.strip() or "unknown"

    def exists(self, unit: str) -> bool:
        return self.show(unit, "LoadState").get("LoadState") not in (None, "not-found")

    def manager_unreachable_reason(self) -> Optional[str]:
        """None when the service manager answers, else why it could not be asked."""
        try:
            probe = self._run("show", "--property=Version", check=False, timeout=10)
        except AgentError as exc:
            return str(exc)
        if probe.returncode != 0 or "Version=" not in probe.stdout:
            why = (probe.stderr or probe.stdout).strip()[:300]
            return why or f"systemctl rc {probe.returncode}"
        return None

    def unit_states(self, units: Iterable[str]) -> Dict[str, Dict[str, str]]:
        props = ("ActiveState", "SubState", "MainPID", "UnitFileState", "Result", "NRestarts")
        return {u: self.show(u, *props) for u in units}

    # -- actions ---------------------------------------------------------------------------

    def start(self, *units: str, no_block: bool = False) -> None:
        self._run("start", *(["--no-block"] if no_block else []), *units)

    def stop(self, *units: str, timeout: Optional[float] = None) -> None:
        self._run("stop", *units, timeout=timeout)

    def restart(self, unit: str) -> None:
        self._run("restart", unit)

    def enable(self, *units: str, now: bool = False) -> None:
        self._run("enable", *(["--now"] if now else []), *units)

    def disable(self, *units: str, now: bool = False) -> None:
        self._run("disable", *(["--now"] if now else []), *units)

    def reset_failed(self, unit: str) -> None:
        self._run("reset-failed", unit, check=False)

    def wait_active(
        self,
        unit: str,
        timeout: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wait until `unit` is active; DeadlineError naming its state when it is not in time."""
        deadline = clock() + timeout
        state = "unknown"
        while clock() < deadline:
            state = self.active_state(unit)
            if state == "active":
                return
            if state == "failed":
                break
            sleep(0.2)
        raise DeadlineError(f"{unit} is {state}, not active, after waiting up to {timeout:.0f}s")


def systemctl_from_config(cfg) -> Systemctl:
    return Systemctl(cfg.systemctl)
