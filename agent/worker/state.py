"""The worker's state record (`worker.json`), its one lock, and its public copy for the boot gate.

Every actor that starts, stops or restarts the local Celery worker takes `worker.lock` (a flock
in the state dir), reads the record, asks agent.worker.state_plan whether it may do what it
means to, writes the new state and does its systemd action before letting go. So confapply
cannot restart a worker a drain has begun to drain (the drain records `draining` before it
cancels a consumer), undrain cannot start a worker on a terminating instance, and nobody starts
a drained or never-deployed worker. Lock order: a drain/undrain holds drain.lock first, then
takes this one; nothing takes them the other way round.

The unit's own boot gate (`ExecCondition=airflow-agent worker-gate` in airflow-worker.service)
runs as the unit's user, not root (a root process there would get the Airflow env file), so it
cannot read the 0700 state dir: every save also writes a public copy, `<state_dir>-gate/worker`
(root 0644 in a root 0755 directory; the state and whether the worker may run, nothing
secret), which `worker-gate` reads when the record itself is out of its reach.

A record that does not exist yet is `state_plan.initial_state` (fresh before the first
revision marker, else running), saved by the first actor that takes the lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Tuple

from agent.errors import AgentError, DeadlineError
from agent.platform.fsutil import FileLock, atomic_write
from agent.state import StateDoc, StateStore, register
from agent.worker import state_plan as sp

log = logging.getLogger(__name__)

LOCK_WAIT = 600.0  # the longest any holder keeps the lock: a confapply restart, an undrain


class WorkerRefused(AgentError):
    """An actor asked for something the worker's record forbids (e.g. a start while terminating)."""


@dataclass
class WorkerDoc(StateDoc):
    name: ClassVar[str] = "worker"
    version: ClassVar[int] = 1

    state: str = sp.RUNNING
    terminating: Optional[str] = None  # termination | spot: the instance is going away
    terminating_since: Optional[float] = None
    may_run: bool = True
    changed_at: Optional[float] = None
    changed_by: Optional[str] = None
    reason: Optional[str] = None
    history: List[Dict[str, Any]] = field(default_factory=list)


register(
    WorkerDoc,
    status_key="worker",
    title="worker state",
    shown=("state", "terminating", "may_run", "changed_by", "reason"),
    optional=True,
)


def gate_path(cfg) -> Path:
    """The record's public copy: `<state_dir>-gate/worker`."""
    return Path(str(cfg.state_dir).rstrip("/") + "-gate") / "worker"


def initial_doc(cfg) -> WorkerDoc:
    state = sp.initial_state(cfg.deploy.boot_gate, os.path.exists(cfg.deploy.first_revision_marker))
    return WorkerDoc(state=state, may_run=sp.may_run(state, None), reason="no record yet")


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Held:
    """The record while its lock is held: read it, change it (saved and published at once)."""

    def __init__(self, record: WorkerRecord, actor: str, doc: WorkerDoc, saved: bool):
        self.record = record
        self.actor = actor
        self.doc = doc
        self._saved = saved

    @property
    def may_run(self) -> bool:
        return sp.may_run(self.doc.state, self.doc.terminating)

    def describe(self) -> str:
        return sp.describe(self.doc.state, self.doc.terminating)

    def apply(self, intent: str, why: str = "", cause: Optional[str] = None) -> sp.Change:
        """Move the record by `intent`; WorkerRefused (naming the actor) when it forbids it."""
        doc = self.doc
        try:
            change = sp.transition(doc.state, doc.terminating, intent, cause)
        except sp.Refused as exc:
            raise WorkerRefused(f"{self.actor} refused: {exc}") from None
        if change.changed or not self._saved:
            self._commit(change.state, change.terminating, why or intent)
        return change

    def ensure_saved(self, why: str) -> None:
        """Save the record when it is not on disk yet (the initial state), so the unit's gate
        reads from its public copy what the actors decide from."""
        if not self._saved:
            self._commit(self.doc.state, self.doc.terminating, why)

    def _commit(self, state: str, terminating: Optional[str], why: str) -> None:
        doc = self.doc
        now = self.record.clock()
        old = doc.state
        if terminating and not doc.terminating:
            doc.terminating_since = now
        doc.state, doc.terminating = state, terminating
        doc.may_run = sp.may_run(state, terminating)
        doc.changed_at, doc.changed_by, doc.reason = now, self.actor, why
        doc.history = sp.append_history(
            doc.history, sp.history_entry(now, self.actor, old, state, terminating, why)
        )
        self.record.save(doc)
        self._saved = True
        log.info("worker state: %s -> %s by %s (%s)", old, self.describe(), self.actor, why)

    def require_start(self, why: str) -> None:
        """START, or WorkerRefused: what undrain, ApplicationStart, bootstrap, role do first."""
        self.apply(sp.START, why)


class WorkerRecord:
    """The record on disk (state dir) and its lock; `hold(actor)` is the only way to change it."""

    def __init__(
        self,
        cfg,
        store: Optional[StateStore] = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.cfg = cfg
        self.store = store or StateStore(cfg.state_dir)
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep

    def load(self) -> Tuple[WorkerDoc, bool]:
        """(the record, whether it is on disk); the initial record when there is none."""
        doc = self.store.load_doc(WorkerDoc)
        if doc is None:
            return initial_doc(self.cfg), False
        if doc.state not in sp.STATES or (doc.terminating and doc.terminating not in sp.CAUSES):
            # a damaged record must not open the gate: hold until an actor decides again
            log.warning(
                "worker record %s has state %r; treating it as paused",
                self.store.path(WorkerDoc),
                doc.state,
            )
            doc.state = sp.PAUSED
        return doc, True

    @contextlib.contextmanager
    def hold(self, actor: str, wait: float = LOCK_WAIT) -> Iterator[Held]:
        """The record under `worker.lock`, waited for up to `wait` seconds (DeadlineError)."""
        self.store.ensure()
        lock = FileLock(self.store.dir / "worker.lock")
        if not lock.acquire(self.monotonic() + wait, self.monotonic, self.sleep):
            raise DeadlineError(
                f"{actor}: the worker's state is held by {lock.holder() or 'another actor'}; "
                f"gave up after {wait:g}s"
            )
        try:
            lock.write_holder(f"pid {os.getpid()} ({actor}) since {_iso(self.clock())}")
            doc, saved = self.load()
            yield Held(self, actor, doc, saved)
        finally:
            lock.release()

    def save(self, doc: WorkerDoc) -> None:
        self.store.save_doc(doc)
        try:
            publish(gate_path(self.cfg), doc)
        except OSError as exc:
            # the record (saved) is the truth, and every actor decides from it; only the unit's
            # gate reads the copy. A stale copy must not fail a drain half-way: say so loudly.
            log.error(
                "cannot write the worker gate file %s (%s); the worker unit's gate may act "
                "on an older state until the next change",
                gate_path(self.cfg),
                exc,
            )


def publish(path: Path, doc: WorkerDoc) -> None:
    """Write the public copy: a root 0755 directory (created, or checked), a 0644 file."""
    directory = path.parent
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o755)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise OSError(f"{directory} is not a directory of ours that only we can write")
    body = {
        "state": doc.state,
        "terminating": doc.terminating,
        "may_run": sp.may_run(doc.state, doc.terminating),
        "reason": sp.hold_reason(doc.state, doc.terminating),
        "changed_at": doc.changed_at,
    }
    atomic_write(path, json.dumps(body, sort_keys=True).encode() + b"\n", mode=0o644)


def gate_decision(cfg, store: Optional[StateStore] = None) -> Tuple[bool, str]:
    """(may the worker start now, why): from the record, else (not root) its public copy."""
    try:
        doc, _saved = WorkerRecord(cfg, store).load()
        source = "record"
    except PermissionError:
        doc, source = _public_doc(cfg), "public copy"
    if sp.may_run(doc.state, doc.terminating):
        return True, f"worker state {doc.state} ({source}): may run"
    return False, f"worker state {sp.describe(doc.state, doc.terminating)} ({source})"


def _public_doc(cfg) -> WorkerDoc:
    path = gate_path(cfg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return initial_doc(cfg)
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable (%s); holding the worker", path, exc)
        return WorkerDoc(state=sp.PAUSED)
    state = data.get("state") if isinstance(data, dict) else None
    if state not in sp.STATES:
        return WorkerDoc(state=sp.PAUSED)
    terminating = data.get("terminating")
    return WorkerDoc(state=state, terminating=terminating if terminating in sp.CAUSES else None)


def note_drain_phase(cfg, store: StateStore, phase: str, note: str = "") -> None:
    """What a drain phase means for the record (drain.shell calls this at every phase change)."""
    intent = sp.drain_intent(phase)
    if intent is None:
        return
    with WorkerRecord(cfg, store).hold("drain") as held:
        held.apply(intent, f"drain phase {phase}" + (f": {note}" if note else ""))


def mark_terminating(cfg, cause: str, why: str, store: Optional[StateStore] = None) -> None:
    """lifecycle watch: the instance is going away (termination hook wait or Spot notice)."""
    with WorkerRecord(cfg, store).hold("lifecycle watch") as held:
        held.apply(sp.TERMINATE, why, cause=cause)
