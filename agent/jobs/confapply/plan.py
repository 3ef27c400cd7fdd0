"""The pure core of confapply: content hash, burst coalescing, restart decisions.

No I/O and no clock of its own (times are passed in), so every rule here is unit-tested
directly; `agent.jobs.confapply.daemon` is the shell that watches files and drives systemctl.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# A missing file hashes differently from an empty one, so deleting the file is a change.
_MISSING = b"\x00missing"
_PRESENT = b"\x01present"

# ActiveState values of a unit that is meant to be running: these get restarted. An
# `inactive` unit was stopped on purpose (drained, held by the boot gate, stopped by an
# operator) and reads the new file whenever it is next started, so it is left alone.
RESTART_STATES = ("active", "activating", "reloading", "deactivating", "failed")


def content_hash(contents: Sequence[Tuple[str, Optional[bytes]]]) -> str:
    """sha256 over (path, content) pairs in the given order; None means the file is missing.

    Each part is length-prefixed so no two different inputs can produce the same byte stream.
    """
    h = hashlib.sha256(b"confapply-v1\0")
    for path, data in contents:
        p = path.encode("utf-8", "surrogateescape")
        h.update(len(p).to_bytes(8, "big") + p)
        if data is None:
            h.update(_MISSING)
        else:
            h.update(_PRESENT + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def watched_files(env_file: str, extra: Iterable[str]) -> List[str]:
    """The env file first, then the configured extras, without duplicates, order kept."""
    out: List[str] = []
    for f in [env_file, *extra]:
        if f not in out:
            out.append(f)
    return out


def is_relevant(paths: Iterable[Optional[str]], watched: Iterable[str]) -> bool:
    """True when a filesystem event touching `paths` (src, dest) concerns a watched file.

    An atomic replace (temp file + rename) arrives as a *moved* event whose dest is the file.
    """
    w = set(watched)
    return any(p in w for p in paths if p)


@dataclass
class Coalescer:
    """Debounce with a maximum wait: a burst of changes becomes one check.

    The check is due `debounce` seconds after the last change, but never later than `max_wait`
    after the first change of the burst, so a file rewritten forever still gets applied.
    """

    debounce: float
    max_wait: float
    first: Optional[float] = None
    last: Optional[float] = None
    count: int = 0

    def note(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1

    @property
    def pending(self) -> bool:
        return self.first is not None

    def due_at(self) -> Optional[float]:
        if self.first is None or self.last is None:
            return None
        return min(self.last + self.debounce, self.first + self.max_wait)

    def due(self, now: float) -> bool:
        at = self.due_at()
        return at is not None and now >= at

    def take(self) -> int:
        """Start the check: forget the burst (changes from now on form the next one)."""
        n = self.count
        self.first = self.last = None
        self.count = 0
        return n


def needs_apply(applied_hash: Optional[str], current_hash: str, dirty: bool = False) -> bool:
    """Restart when the content differs from what was applied, or when the last apply failed
    part-way (`dirty`): then some unit already runs, or failed with, newer content, so even a
    return to the applied content must be applied again."""
    return dirty or applied_hash != current_hash


def units_to_restart(units: Sequence[str], states: Dict[str, str]) -> Tuple[List[str], List[str]]:
    """(restart these in order, skip these) given each unit's ActiveState."""
    restart = [u for u in units if states.get(u) in RESTART_STATES]
    skip = [u for u in units if u not in restart]
    return restart, skip


def should_reset_and_retry(result: str, retried: bool) -> bool:
    """After a failed restart: `reset-failed` and try once more only for a start-limit hit."""
    return result == "start-limit-hit" and not retried


@dataclass
class ApplyOutcome:
    """What one apply cycle did; `ok` only when every restart succeeded."""

    hash: str
    restarted: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def summary(self) -> str:
        parts = [f"restarted {','.join(self.restarted) or 'none'}"]
        if self.skipped:
            parts.append(f"skipped (not running) {','.join(self.skipped)}")
        if self.failed:
            parts.append("failed " + ", ".join(f"{u} ({why})" for u, why in self.failed.items()))
        if self.interrupted:
            parts.append("interrupted by stop")
        return "; ".join(parts)
