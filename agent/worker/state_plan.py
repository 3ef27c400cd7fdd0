"""The worker's state, pure: which states exist, who may move it where, and whether the worker
may run. No I/O; agent.worker.state is the shell (the record on disk, its lock, its public copy).

One record says what the local Celery worker is *meant* to be doing, so the actors that start,
stop and restart it (drain, undrain, confapply, lifecycle watch, the deploy hook, bootstrap,
`role --apply`) stop undoing one another: each reads and changes the record under one lock and
acts only as it allows.

States:

    fresh     enabled but never deployed to (boot gate): must not consume yet
    running   consuming; the only state in which the worker may be started or restarted
    paused    up but not consuming (a rebalance's stop-consuming, or a drain that passed its
              deadline with drain.on_deadline fail); undrain resumes it
    draining  a drain is cancelling consumers / waiting for tasks / stopping the unit
    drained   stopped by a drain; ApplicationStart or undrain starts it again

Plus one flag, `terminating` (its cause: "termination" for an Auto Scaling termination hook
wait, "spot" for a Spot interruption notice). It is a flag and not a state because the drain
that follows a termination still goes draining -> drained, and `status` must show both. It is
one-way: nothing clears it (the instance is going away); while it is set, nothing starts the
worker again.

Transitions (`transition(record, intent)`):

    DRAIN     any -> draining (fresh stays fresh when the drain finds nothing running)
    STOPPED   any -> drained (fresh stays fresh: a never-deployed worker is not "drained")
    PAUSE     any -> paused
    START     fresh/running/paused/draining/drained -> running; refused when terminating
    TERMINATE sets the flag (state unchanged)

`may_run(record)` (the boot gate of the worker unit, confapply's restart): running and not
terminating. A record that does not exist yet starts as `initial_state(...)`: fresh when the
boot gate applies and no revision marker exists, else running (a worker deployed by an agent
that predates the record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

FRESH = "fresh"
RUNNING = "running"
PAUSED = "paused"
DRAINING = "draining"
DRAINED = "drained"
STATES = (FRESH, RUNNING, PAUSED, DRAINING, DRAINED)

TERMINATION = "termination"
SPOT = "spot"
CAUSES = (TERMINATION, SPOT)

# intents
DRAIN = "drain"
STOPPED = "stopped"
PAUSE = "pause"
START = "start"
TERMINATE = "terminate"
INTENTS = (DRAIN, STOPPED, PAUSE, START, TERMINATE)

HISTORY_KEEP = 20

# drain.json phases (agent.jobs.drain.plan) -> the intent they mean for the worker
DRAIN_PHASE_INTENTS = {
    "cancelling": DRAIN,
    "waiting": DRAIN,
    "stopping": DRAIN,
    "stopped": STOPPED,
    "deadline": PAUSE,
    "paused": PAUSE,
}


class Refused(Exception):
    """The record does not allow what an actor asked for; the message says why."""


@dataclass
class Change:
    """The outcome of one transition: the new state and flag, and whether anything changed."""

    state: str
    terminating: Optional[str]
    changed: bool


def initial_state(boot_gate: bool, marker_exists: bool) -> str:
    """The state of a worker that has no record yet."""
    return FRESH if boot_gate and not marker_exists else RUNNING


def may_run(state: str, terminating: Optional[str]) -> bool:
    """True when the worker may be started or restarted now."""
    return state == RUNNING and not terminating


def hold_reason(state: str, terminating: Optional[str]) -> str:
    """Why the worker must not run (one phrase), or "" when it may."""
    if terminating:
        what = (
            "a Spot interruption notice" if terminating == SPOT else "an Auto Scaling termination"
        )
        return f"the instance is terminating ({what}); the worker is never started again"
    return {
        FRESH: "no CodeDeploy revision yet; ApplicationStart starts it",
        PAUSED: "paused (not consuming); undrain resumes it",
        DRAINING: "a drain is in progress",
        DRAINED: "drained; ApplicationStart or undrain starts it",
    }.get(state, "")


def transition(
    state: str, terminating: Optional[str], intent: str, cause: Optional[str] = None
) -> Change:
    """Apply `intent` to (state, terminating); Refused when the record forbids it."""
    if state not in STATES:
        raise ValueError(f"unknown worker state {state!r}")
    if intent == TERMINATE:
        if cause not in CAUSES:
            raise ValueError(f"terminate needs a cause ({', '.join(CAUSES)}), got {cause!r}")
        new_flag = terminating or cause  # the first cause seen stays
        return Change(state, new_flag, new_flag != terminating)
    if intent == START:
        if terminating:
            raise Refused(hold_reason(state, terminating))
        return Change(RUNNING, terminating, state != RUNNING)
    if intent == DRAIN:
        new = DRAINING
    elif intent == STOPPED:
        new = FRESH if state == FRESH else DRAINED
    elif intent == PAUSE:
        new = PAUSED
    else:
        raise ValueError(f"unknown intent {intent!r}")
    return Change(new, terminating, new != state)


def drain_intent(phase: str) -> Optional[str]:
    """The intent a drain phase means for the worker (None for a phase that means nothing)."""
    return DRAIN_PHASE_INTENTS.get(phase)


def history_entry(
    at: float, actor: str, old: str, new: str, terminating: Optional[str], why: str
) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"at": at, "by": actor, "from": old, "to": new, "why": why[:200]}
    if terminating:
        entry["terminating"] = terminating
    return entry


def append_history(history: List[Dict[str, Any]], entry: Dict[str, Any]) -> List[Dict[str, Any]]:
    return (list(history) + [entry])[-HISTORY_KEEP:]


def describe(state: str, terminating: Optional[str]) -> str:
    """One line for logs and STATUS=: the state, the flag, and whether the worker may run."""
    text = state + (f" (terminating: {terminating})" if terminating else "")
    reason = hold_reason(state, terminating)
    return text + (f": must not run, {reason}" if reason else ": may run")
