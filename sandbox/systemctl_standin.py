"""A systemctl stand-in for confapply driven in process (tests that need a real daemon runtime,
database or notify socket but not a real systemd): every unit is active, answers MainPID 4242,
and a restart is whatever the subclass makes of it (recorded, timed, gated)."""

from __future__ import annotations

from typing import List


class ActiveUnits:
    def __init__(self) -> None:
        self.restarted: List[str] = []

    def active_state(self, unit: str) -> str:
        return "active"

    def restart(self, unit: str) -> None:
        self.restarted.append(unit)

    def wait_active(self, unit: str, timeout: float) -> None:
        return None

    def show(self, unit: str, *props: str) -> dict:
        return {}

    def main_pid(self, unit: str) -> int:
        return 4242

    def reset_failed(self, unit: str) -> None:
        return None
