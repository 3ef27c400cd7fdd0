"""The termination lifecycle action of `lifecycle watch`: find the hook, heartbeat, complete once.

While a termination lifecycle hook holds the instance in Terminating:Wait, the watcher keeps
one persisted record of it (`lifecycle.json`'s `lifecycle_action`: hook, group, plan,
heartbeats sent, completed) and `HookAction` moves that record along on each loop pass:

- `setup()`: look up the hook and its HeartbeatTimeout (an unreadable hook is assumed at
  Auto Scaling's default, 3600 s, and looked up again every poll), plan the heartbeats and
  deadlines (agent/jobs/lifecycle/plan.py), and return the drain's deadline;
- `advance()`: a heartbeat when one is due (a failed one is retried a quarter interval later),
  and when the drain ended, or heartbeating must stop before the hook's global timeout,
  CompleteLifecycleAction(CONTINUE), retried with backoff and persisted at once when sent so a
  crash cannot send it twice;
- `wake_at()`: when the loop must wake for the next heartbeat.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional

from agent.errors import AgentError
from agent.events.publish import record
from agent.jobs.lifecycle import plan
from agent.jobs.lifecycle.aws import COMPLETE_RESULT, LifecycleAws, no_active_action
from agent.platform.aws import AWS_ERRORS, describe_error

log = logging.getLogger(__name__)

# Auto Scaling's default HeartbeatTimeout, assumed while DescribeLifecycleHooks cannot answer
DEFAULT_HEARTBEAT_TIMEOUT = 3600.0


def iso(epoch: Optional[float]) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class HookAction:
    """Heartbeats and the one CompleteLifecycleAction of a termination wait."""

    def __init__(self, cfg, aws: LifecycleAws, clock: Callable[[], float], save: Callable):
        self.cfg = cfg
        self.aws = aws
        self.clock = clock
        # persists the whole state document (the action is part of it)
        self.save = save

    def plan(self, now: float, timeout: float, started: Optional[float] = None):
        lc = self.cfg.lifecycle
        return plan.plan_termination(
            now,
            timeout,
            lc.complete_margin,
            lc.poll_interval,
            max_wait=lc.max_wait,
            interval_override=lc.heartbeat_interval,
            wait_started=started,
        )

    def setup(self, now: float) -> Dict[str, Any]:
        """A new action record: the hook found (or assumed) and its plan."""
        action: Dict[str, Any] = {
            "hook": None,
            "group": None,
            "heartbeats_sent": 0,
            "heartbeat_failures": 0,
            "last_heartbeat": None,
            "last_heartbeat_attempt": None,
            "completed": False,
            "complete_attempts": 0,
            "assumed_timeout": False,
        }
        try:
            hook, timeout = self.aws.hook()
            action.update(hook=hook, group=self.aws.group_name())
        except (AgentError, *AWS_ERRORS) as exc:
            timeout = DEFAULT_HEARTBEAT_TIMEOUT
            action["assumed_timeout"] = True
            action["error"] = describe_error(exc)
            log.error(
                "cannot read the termination hook (%s); draining with an assumed "
                "HeartbeatTimeout of %.0fs and retrying the lookup",
                describe_error(exc),
                timeout,
            )
        action["plan"] = self.plan(now, timeout).to_dict()
        p = action["plan"]
        log.info(
            "termination plan: hook=%s HeartbeatTimeout=%.0fs heartbeat every %.1fs, "
            "global timeout %.0fs (until %s), stop heartbeating at %s",
            action["hook"],
            timeout,
            p["heartbeat_interval"],
            plan.global_timeout(timeout),
            iso(p["global_deadline"]),
            iso(p["heartbeat_stop_at"]),
        )
        return action

    def advance(self, action: Dict[str, Any], now: float, drain_running: bool) -> None:
        """Heartbeat when due; complete once the drain is over or heartbeats must stop."""
        p = action["plan"]
        if action["assumed_timeout"] or not action.get("hook"):
            self._retry_lookup(action, now)
            if not action.get("hook"):
                if not drain_running:
                    log.error(
                        "no lifecycle hook found; nothing to complete (%s)", action.get("error")
                    )
                    action["completed"] = True
                    action["result"] = "no-hook"
                return
            p = action["plan"]
        if not drain_running or now >= p["heartbeat_stop_at"]:
            if drain_running:
                log.warning(
                    "heartbeat stop time reached (%s) with the drain still running: "
                    "completing the lifecycle action now",
                    iso(p["heartbeat_stop_at"]),
                )
            self._complete(action, now)
            return
        due = plan.heartbeat_due(
            now,
            action["last_heartbeat"],
            action["last_heartbeat_attempt"],
            p["heartbeat_interval"],
            plan.retry_delay(p["heartbeat_interval"]),
            p["heartbeat_stop_at"],
            p["wait_started"],
        )
        if due:
            self._heartbeat(action, now)

    def _heartbeat(self, action: Dict[str, Any], now: float) -> None:
        p = action["plan"]
        action["last_heartbeat_attempt"] = now
        try:
            self.aws.heartbeat(action["hook"])
        except AWS_ERRORS as exc:
            action["heartbeat_failures"] += 1
            action["last_heartbeat_error"] = describe_error(exc)
            # botocore's own retries took a while: the pause before ours counts from now
            action["last_heartbeat_attempt"] = self.clock()
            log.warning(
                "heartbeat failed (%s); retrying in %.0fs",
                describe_error(exc),
                plan.retry_delay(p["heartbeat_interval"]),
            )
            return
        action["heartbeats_sent"] += 1
        action["last_heartbeat"] = now
        log.info("heartbeat %d sent (hook %s)", action["heartbeats_sent"], action["hook"])

    def _retry_lookup(self, action: Dict[str, Any], now: float) -> None:
        last = action.get("lookup_attempt") or 0.0
        if now - last < max(self.cfg.lifecycle.poll_interval, 5.0):
            return
        action["lookup_attempt"] = now
        try:
            hook, timeout = self.aws.hook()
            group = self.aws.group_name()
        except (AgentError, *AWS_ERRORS) as exc:
            action["error"] = describe_error(exc)
            return
        started = action["plan"]["wait_started"]
        action.update(
            hook=hook,
            group=group,
            assumed_timeout=False,
            error=None,
            plan=self.plan(now, timeout, started).to_dict(),
        )
        log.info("termination hook found: %s (HeartbeatTimeout %.0fs)", hook, timeout)

    def _complete(self, action: Dict[str, Any], now: float) -> None:
        if now >= action["plan"]["global_deadline"]:
            log.error(
                "the lifecycle wait's global timeout has passed; Auto Scaling applied "
                "the hook's DefaultResult"
            )
            action.update(completed=True, result="expired")
            record(self.cfg, "LifecycleHoldsExpired", role="worker")
            return
        retry_at = action.get("complete_retry_at") or 0.0
        if now < retry_at:
            return
        action["complete_attempts"] += 1
        try:
            self.aws.complete(action["hook"])
        except AWS_ERRORS as exc:
            if no_active_action(exc):
                # sent before a crash that lost the record, or the wait already ended
                log.warning(
                    "CompleteLifecycleAction: no active lifecycle action left (%s)",
                    describe_error(exc),
                )
                action.update(completed=True, completed_at=now, result="none-active")
                return
            delay = min(2.0 ** action["complete_attempts"], 30.0)
            action["complete_retry_at"] = now + delay
            action["last_complete_error"] = describe_error(exc)
            log.warning(
                "CompleteLifecycleAction failed (%s); retrying in %.0fs", describe_error(exc), delay
            )
            return
        action.update(completed=True, completed_at=now, result=COMPLETE_RESULT)
        # persisted at once: a crash right after must not send it again
        self.save()
        held = max(0.0, now - action["plan"].get("wait_started", now))
        record(self.cfg, "LifecycleHolds", role="worker")
        record(self.cfg, "LifecycleHoldSeconds", held, role="worker")
        log.info(
            "CompleteLifecycleAction(%s) sent for hook %s after %d heartbeat(s)",
            COMPLETE_RESULT,
            action["hook"],
            action["heartbeats_sent"],
        )

    @staticmethod
    def wake_at(action: Optional[Dict[str, Any]], now: float) -> Optional[float]:
        """When the next heartbeat (or its retry) is due; None when none is pending."""
        if not action or action["completed"] or not action.get("hook"):
            return None
        p = action["plan"]
        if action["last_heartbeat"] is None:
            at = now
        else:
            at = action["last_heartbeat"] + p["heartbeat_interval"]
            if (action["last_heartbeat_attempt"] or 0) > action["last_heartbeat"]:
                at = action["last_heartbeat_attempt"] + plan.retry_delay(p["heartbeat_interval"])
        return min(at, p["heartbeat_stop_at"])
