"""Pure core of the fleet-wide restart slot (agent.airflow.restart_slot): the `coordination`
section of agent.yaml, the advisory-lock keys, and the agent's side of one acquisition.

Stdlib only, so agent.config can import it. `Acquisition` turns what the co-process reports
(one JSON object a line) and the clock into a `Slot`; it is driven on virtual time in tests.
The co-process runs as the Airflow user, so its output is not trusted: a line that is not one
of the reports below, or a slot outside 0..N-1, ends the acquisition as uncoordinated.

Reports: {"state": "waiting", "why": ...} (all slots busy, or the database unreachable: said
again only when the reason changes), {"state": "held", "slot": i}, {"state": "timeout", "why":
...} (the co-process gave up at its deadline).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

# how long past `coordination.timeout` the agent waits for the co-process's last word (its
# start, its last connection attempt) before it ends it and restarts uncoordinated
REPORT_GRACE = 15.0


@dataclass
class CoordinationConfig:
    # false: every restart is uncoordinated (logged at INFO, not as a warning)
    enabled: bool = True
    # role -> how many instances of it may restart at once; a role not named: 1
    slots: Dict[str, int] = field(default_factory=dict)
    # how long a restart waits for a slot (or for the database), then goes uncoordinated
    timeout: float = 900.0
    # between two tries for a slot (jittered +-25 %) or to reach the database
    poll_interval: float = 2.0
    # the Airflow venv's interpreter: it has SQLAlchemy and the PostgreSQL driver
    python: str = "/opt/airflow/venv/bin/python"
    # who runs it (never root: the URL comes from the env file); null: as the agent
    user: Optional[str] = "airflow"

    def slots_for(self, role: str) -> int:
        return self.slots.get(role, 1)


def check_coordination(c: CoordinationConfig, roles: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(dotted key, why) for the first bad key of the section, else None."""
    for role, n in c.slots.items():
        if role not in roles:
            return f"coordination.slots.{role}", f"is not a role; roles are {', '.join(roles)}"
        if n < 1:
            return f"coordination.slots.{role}", f"must be at least 1, got {n}"
    if not c.timeout > 0:
        return "coordination.timeout", f"must be positive, got {c.timeout}"
    if not c.poll_interval > 0:
        return "coordination.poll_interval", f"must be positive, got {c.poll_interval}"
    if not c.python.startswith("/"):
        return "coordination.python", f"must be an absolute path, got {c.python!r}"
    if c.user in ("root", "0", ""):
        return "coordination.user", "must not be root (it connects with the env file's URL)"
    return None


def slot_key(cluster: str, role: str, index: int) -> int:
    """The PostgreSQL advisory lock key (a signed bigint) of one slot of a role in a cluster."""
    text = f"airflow-agent restart slot\0{cluster}\0{role}\0{index}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big", signed=True)


def slot_keys(cluster: str, role: str, n: int) -> list:
    return [slot_key(cluster, role, i) for i in range(n)]


@dataclass(frozen=True)
class Slot:
    """What a restart holds: slot `index` of `slots` for `role`, after `waited` seconds; index
    None means uncoordinated, and `why` says why."""

    role: str
    index: Optional[int]
    slots: int
    waited: float
    why: str = ""

    @property
    def uncoordinated(self) -> bool:
        return self.index is None

    def describe(self) -> str:
        if self.index is None:
            return f"restart slot {self.role} uncoordinated"
        return f"restart slot {self.role} {self.index}/{self.slots}"


class Acquisition:
    """The agent's side of one wait for a slot: started at `start`, gives up at `deadline`."""

    def __init__(self, role: str, slots: int, timeout: float, start: float):
        self.role = role
        self.slots = slots
        self.start = start
        self.deadline = start + timeout
        self.why = ""  # the last reason for waiting the co-process gave

    def uncoordinated(self, why: str, now: float) -> Slot:
        return Slot(self.role, None, self.slots, max(0.0, now - self.start), why)

    def expired(self, now: float) -> bool:
        """True once even the co-process's grace for its last word has passed."""
        return now >= self.deadline + REPORT_GRACE

    def report(self, line: str, now: float) -> Optional[Slot]:
        """A Slot when `line` settles the acquisition; None when it only says why it waits
        (`self.why`)."""
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        state = doc.get("state") if isinstance(doc, dict) else None
        why = doc.get("why") if isinstance(doc, dict) else None
        why = why[:300] if isinstance(why, str) else ""
        if state == "waiting":
            self.why = why
            return None
        if state == "timeout":
            return self.uncoordinated(f"none free after {now - self.start:.0f} s: {why}", now)
        if state == "held":
            index = doc.get("slot")
            if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < self.slots:
                return Slot(self.role, index, self.slots, max(0.0, now - self.start))
        return self.uncoordinated("the slot's co-process said something unexpected", now)

    def gone(self, now: float, detail: str = "") -> Slot:
        """The co-process ended (or was ended) before it held a slot."""
        if self.expired(now):
            what = f"no answer within {now - self.start:.0f} s"
        else:
            what = "the slot's co-process exited before holding a slot"
        return self.uncoordinated(what + (f": {detail}" if detail else ""), now)
