"""The drain document (`drain.json`): the drain state machine's persisted state, and the
lock (`drain.lock`) that lets one drain/undrain at a time write it.

The type is `agent.jobs.drain.plan.DrainState` (pure, no I/O); this module registers it.
Its `from_dict` answers None for anything that is not a drain state this agent wrote, which
the store reports as a named StateDocError (and `load` treats as no drain recorded).
"""

from __future__ import annotations

from typing import Callable

from agent.errors import DeadlineError
from agent.jobs.drain.plan import DrainState
from agent.platform.fsutil import FileLock
from agent.state import StateStore, register

NAME = "drain"

register(DrainState, name=NAME, version=1, status_key="drain")


class DrainLock(FileLock):
    """One drain/undrain at a time per instance (deploy hook and lifecycle may race)."""

    def __init__(self, store: StateStore):
        super().__init__(store.dir / "drain.lock")

    def acquire(self, until: float, clock: Callable[[], float], sleep) -> bool:
        """Held, or DeadlineError when another holder kept it past `until`."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not super().acquire(until, clock, sleep):
            raise DeadlineError(f"another drain/undrain holds {self.path}; gave up waiting")
        return True
