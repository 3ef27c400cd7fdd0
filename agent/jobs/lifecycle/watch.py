"""`airflow-agent lifecycle watch`: Auto Scaling termination, Spot notices, rebalance, protection.

A `Type=notify` daemon on workers. Every `lifecycle.poll_interval` seconds it reads three IMDSv2
facts (target lifecycle state, Spot instance-action, rebalance recommendation), lets the pure
core (agent/jobs/lifecycle/plan.py) say what they mean, and acts on one event at a time:

- `Terminated` (a termination lifecycle hook holds the instance in Terminating:Wait): run the
  one drain procedure (jobs/drain/drainer.py) in a thread, send RecordLifecycleActionHeartbeat on a
  schedule derived from the hook's HeartbeatTimeout while it runs, stop before the hook's
  global timeout, and send CompleteLifecycleAction(CONTINUE) exactly once when the drain ends.
- Spot `instance-action`: the same drain with a deadline of the reclaim time minus
  `lifecycle.spot_margin`; tasks still running then are logged (Airflow retries them).
- rebalance recommendation: ignored, or the worker stops consuming (`lifecycle.rebalance`).
- `Warmed:*`: a warm-pool instance; never started or undrained here, drained if it runs.
- optional scale-in protection: on while the worker has tasks, off after a quiet period.
A termination or Spot notice first marks the worker's record terminating (agent.worker.state).

Why a thread for the drain: it is one blocking procedure shared with CodeDeploy and the CLI;
its inspect polls take ~1 s each and may block on a slow broker. Heartbeats must go out on
time whatever it does, so it runs beside the loop and reports progress through a callback.

Each IMDS fact is read on its own (facts.py): one IMDS answers with garbage is named in the
log once per distinct answer and ignored, while the others still act. No exception leaves a
pass: `step()` logs a failed pass once per distinct error, records `last_pass_error` and tries
again a poll later (systemd's watchdog still catches a pass that hangs).

Everything the loop knows is in `lifecycle.json` (LifecycleDoc, agent/jobs/lifecycle/state.py),
so an agent restarted mid-drain resumes the drain (drain.json holds its own progress),
resumes heartbeats with the persisted plan, and completes the lifecycle action once.

The pieces: `Watcher` here (poll IMDS, start and advance events, scale-in protection, the
status line, the CLI); the termination action in action.py (hook lookup, heartbeats, the one
CompleteLifecycleAction); the drain's thread and its outcome in drain.py; Auto Scaling calls in
aws.py. The loop itself, signals and sd_notify are the daemon runtime's
(agent/runtime/daemon.py): `step()` is one tick and returns the delay to the next.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, ContextManager, Dict, List, Optional

from agent.errors import AgentError, ConfigError
from agent.jobs.lifecycle import facts, plan
from agent.jobs.lifecycle.action import HookAction, iso
from agent.jobs.lifecycle.aws import LifecycleAws
from agent.jobs.lifecycle.drain import (
    DrainFn,
    DrainRunner,
    EventDrain,
    default_busy,
    default_stop_consuming,
    record_terminating,
    scrub_tasks,
)
from agent.jobs.lifecycle.state import LifecycleDoc
from agent.platform.aws import AWS_ERRORS, AwsClients, describe_error
from agent.platform.imds import ImdsClient
from agent.runtime.daemon import Daemon, DaemonRuntime
from agent.state import StateStore

log = logging.getLogger(__name__)

HANDLED_KEEP = 50  # event keys remembered for de-duplication


class Watcher(Daemon):
    """The loop's state and one `tick()`; the daemon runtime repeats it until stopped."""

    def __init__(
        self,
        cfg,
        imds: ImdsClient,
        aws: LifecycleAws,
        store: StateStore,
        drain_fn: Optional[DrainFn] = None,
        stop_consuming_fn: Optional[Callable[[Any], Any]] = None,
        busy_fn: Optional[Callable[[], int]] = None,
        active_tasks_fn: Optional[Callable[[], List[Dict[str, Any]]]] = None,
        clock: Callable[[], float] = time.time,
        busy_section: Optional[Callable[[float], ContextManager[Any]]] = None,
    ):
        self.cfg = cfg
        self.imds = imds
        self.aws = aws
        self.store = store
        self._stop_consuming_fn = stop_consuming_fn
        self._busy_fn = busy_fn
        self.clock = clock
        # the daemon runtime's `busy(seconds)`: remote control may block the loop that long
        self.busy_section = busy_section or (lambda seconds: contextlib.nullcontext())
        self.hook = HookAction(cfg, aws, clock, self.save)
        self.drain = EventDrain(cfg, clock, drain_fn, active_tasks_fn, self.remote_control_section)
        # the loop works on the document's plain form; save() checks it against LifecycleDoc
        self.state: Dict[str, Any] = (store.load_doc(LifecycleDoc) or LifecycleDoc()).to_dict()
        scrub_tasks(self.state.get("drain"))
        self.facts = facts.FactReader(cfg.lifecycle.poll_interval)
        self._pass_errors: List[str] = []
        self._next_poll = 0.0

    def remote_control_section(self) -> ContextManager[Any]:
        """A section of the loop asking the worker (two inspects at most, plus systemctl)."""
        return self.busy_section(2 * self.cfg.drain.reply_timeout + 30.0)

    # -- persistence -------------------------------------------------------------------------

    def save(self) -> None:
        data = dict(self.state, version=LifecycleDoc.version)
        self.store.save_doc(LifecycleDoc.from_dict(data))

    @property
    def event(self) -> Optional[plan.Event]:
        data = self.state.get("event")
        if data and self.state.get("phase") == plan.DRAINING:
            return plan.Event.from_dict(data)
        return None

    @property
    def runner(self) -> Optional[DrainRunner]:
        """The thread running the current event's drain, if any."""
        return self.drain.runner

    # -- one tick ----------------------------------------------------------------------------

    def poll(self) -> Optional[List[plan.Event]]:
        """The events the IMDS facts read now describe; None when none could be read.

        Each fact is read on its own: one that fails is unknown for this poll (logged once
        per distinct failure, recorded in `poll_errors`), and the others are classified.
        """
        values, errors = self.facts.read(
            {
                facts.TARGET: self.imds.target_lifecycle_state,
                facts.SPOT: self.imds.spot_instance_action,
                facts.REBALANCE: self.imds.rebalance_recommendation,
            }
        )
        self.state["poll_errors"] = dict(errors) or None
        self.state["last_poll_error"] = "; ".join(errors.values()) or None
        if not values:
            return None
        self.state["last_poll"] = self.clock()
        if facts.TARGET in values:
            self._target_seen(values[facts.TARGET])
        return plan.classify(
            values.get(facts.TARGET),
            values.get(facts.SPOT),
            values.get(facts.REBALANCE),
            self.cfg.lifecycle.rebalance,
        )

    def _target_seen(self, target: Optional[str]) -> None:
        if target != self.state.get("target_lifecycle_state"):
            log.info("target lifecycle state: %s", target)
            # a target state that ended may come back (warm pool reuse): forget it was handled
            self.state["handled"] = [
                k
                for k in self.state["handled"]
                if not k.startswith("target:") or k == f"target:{target}"
            ]
        self.state["target_lifecycle_state"] = target

    def tick(self) -> None:
        # during an event the loop wakes often (heartbeats, the drain's end); IMDS is still
        # read only once per poll interval
        candidates = None
        polled = self.clock() >= self._next_poll
        if polled:
            self._next_poll = self.clock() + self.cfg.lifecycle.poll_interval
            candidates = self.poll()
        current = self.event
        if candidates is not None:
            if current is not None:
                for cand in candidates:
                    if plan.attaches_lifecycle_action(current, cand) and not self._action():
                        log.info(
                            "termination hook wait seen during the Spot drain: "
                            "heartbeating it and completing it when the drain ends"
                        )
                        self.state["lifecycle_action"] = self.hook.setup(self.clock())
                        # this Spot event completes it: never start it as an event of its own
                        self._remember(cand.key)
            else:
                ev = plan.next_event(candidates, None, self.state["handled"])
                if ev is not None:
                    self._start_event(ev)
        if self.event is not None:
            self._advance()
        elif self.cfg.lifecycle.scale_in_protection and polled:
            self._protection()
        self.state["summary"] = self.status_line()
        self.save()

    # -- starting events ---------------------------------------------------------------------

    def _start_event(self, ev: plan.Event) -> None:
        now = self.clock()
        self._remember(ev.key)
        if ev.kind == plan.REBALANCE:
            self.state["event"] = ev.to_dict()
            log.info(
                "rebalance recommendation (notice %s): the worker stops consuming; "
                "running tasks finish",
                ev.detail.get("notice_time"),
            )
            try:
                (self._stop_consuming_fn or default_stop_consuming())(self.cfg)
            except Exception as exc:  # noqa: BLE001 - advisory event; log and carry on
                log.error("stop consuming on rebalance failed: %s", exc)
            self.state["phase"] = plan.DONE
            return
        self.state.update(phase=plan.DRAINING, event=ev.to_dict(), lifecycle_action=None)
        if ev.kind in (plan.SPOT, plan.TERMINATE):  # nothing starts this worker again
            record_terminating(self.cfg, self.store, ev.kind, ev.key)
        if ev.kind == plan.SPOT:
            deadline = plan.spot_deadline(
                ev.detail.get("time", ""), self.cfg.lifecycle.spot_margin, now
            )
            log.warning(
                "Spot %s notice for %s: draining until %s (%.0fs from now)",
                ev.detail.get("action"),
                ev.detail.get("time"),
                iso(deadline),
                deadline - now,
            )
        elif ev.kind == plan.WARMED:
            # a new instance launched into the pool has no running worker (the boot gate held
            # it): the drain ends at once. An in-service instance sent back to the pool
            # (ReuseOnScaleIn) is stopped without a termination hook: drain it first.
            deadline = now + self.cfg.drain.timeout
            log.warning(
                "target state %s (warm pool): the worker is drained if it runs and never "
                "started by this agent",
                ev.detail.get("target_state"),
            )
        else:
            log.warning("termination lifecycle wait (target state Terminated): draining")
            action = self.state["lifecycle_action"] = self.hook.setup(now)
            deadline = action["plan"]["drain_deadline"]
        self.state["drain"] = {
            "status": "running",
            "started_at": now,
            "deadline": deadline,
            "progress": {},
            "unfinished_tasks": [],
            "attempts": 0,
        }
        self.drain.start(self.state["drain"])

    def _remember(self, key: str) -> None:
        handled = [k for k in self.state["handled"] if k != key] + [key]
        self.state["handled"] = handled[-HANDLED_KEEP:]

    def _action(self) -> Optional[Dict[str, Any]]:
        return self.state.get("lifecycle_action")

    # -- advancing the current event ---------------------------------------------------------

    def _advance(self) -> None:
        now = self.clock()
        drain = self.state["drain"]
        self.drain.advance(drain, now)
        action = self._action()
        running = drain["status"] == "running"
        if action is not None and not action["completed"]:
            self.hook.advance(action, now, running)
        if not running and (action is None or action["completed"]):
            self.state["phase"] = plan.DONE
            self.drain.forget()
            log.info("event %s finished", self.state["event"]["key"])

    # -- scale-in protection -----------------------------------------------------------------

    def _protection(self) -> None:
        prot = self.state["protection"] = self.state.get("protection") or {
            "protected": None,
            "idle_since": None,
        }
        now = self.clock()
        try:
            with self.remote_control_section():
                busy = (self._busy_fn or default_busy(self.cfg))()
        except Exception as exc:  # noqa: BLE001 - unknown load: leave protection as it is
            log.debug("cannot tell whether the worker is busy: %s", exc)
            return
        want, idle_since = plan.protection_decision(
            prot.get("protected"),
            busy,
            prot.get("idle_since"),
            now,
            self.cfg.lifecycle.idle_before_unprotect,
        )
        prot["idle_since"] = idle_since
        prot["tasks"] = busy
        if want is None:
            return
        try:
            self.aws.set_protection(want)
        except (AgentError, *AWS_ERRORS) as exc:
            log.warning("SetInstanceProtection(%s) failed: %s", want, describe_error(exc))
            return
        prot.update(protected=want, changed_at=now)
        log.info("scale-in protection %s (%d task(s) on the worker)", "on" if want else "off", busy)

    # -- status and the daemon's decisions ---------------------------------------------------

    def status_line(self) -> str:
        phase = self.state.get("phase")
        target = self.state.get("target_lifecycle_state")
        if phase != plan.DRAINING:
            return f"{phase}; target state {target}"
        ev = self.state["event"]
        action = self._action() or {}
        progress = self.state["drain"].get("progress") or {}
        msg = progress.get("message") or progress.get("phase") or ""
        return (
            f"draining ({ev['kind']}): {msg}; heartbeats {action.get('heartbeats_sent', 0)}"
            f"; deadline {iso(self.state['drain']['deadline'])}"
        )

    def next_delay(self) -> float:
        now = self.clock()
        at = HookAction.wake_at(self._action(), now) if self.event is not None else None
        delay = plan.next_wake(now, self.cfg.lifecycle.poll_interval, at)
        if self.event is not None:
            # the drain ending should be acted on promptly, not a whole poll later
            delay = min(delay, 0.5)
        return delay

    def step(self) -> float:
        """One pass. The runtime would end the process on an exception (and systemd restart
        it, heartbeats missed meanwhile): a failed pass is named and retried a poll later."""
        try:
            self.state["last_pass_error"] = None  # saved by the pass; set again if it fails
            self.tick()
        except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad pass
            self._pass_failed(exc)
            return self.cfg.lifecycle.poll_interval
        if self._pass_errors:
            log.info("lifecycle watch pass succeeded again")
            self._pass_errors = []
        return self.next_delay()

    def _pass_failed(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if message not in self._pass_errors:
            log.error("lifecycle watch pass failed (retrying): %s", message, exc_info=True)
            self._pass_errors = (self._pass_errors + [message])[-facts.SEEN_KEEP :]
        self.state["last_pass_error"] = message
        try:
            self.save()
        except Exception as save_exc:  # noqa: BLE001 - the state dir itself may be the fault
            log.debug("saving lifecycle state after a failed pass: %s", save_exc)

    def status(self) -> str:
        return self.state.get("summary") or self.status_line()

    def close(self) -> None:
        self.save()
        log.info("lifecycle watch stopped (state kept in %s)", self.store.path(LifecycleDoc))


# -- CLI -----------------------------------------------------------------------------------


def add_arguments(parser, common) -> None:
    sub = parser.add_subparsers(dest="lifecycle_command", metavar="SUBCOMMAND")
    sub.add_parser(
        "watch",
        parents=[common],
        help="daemon: drain on termination hook / Spot notice, heartbeat, complete",
        description=(
            "Poll IMDSv2 every lifecycle.poll_interval seconds for the Auto Scaling target "
            "lifecycle state, Spot instance-action and rebalance recommendation; drain the "
            "local worker, heartbeat and complete the termination lifecycle action once. "
            "State: <state_dir>/lifecycle.json."
        ),
    )


def run(args, cfg) -> int:
    if getattr(args, "lifecycle_command", None) != "watch":
        raise ConfigError("usage: airflow-agent lifecycle watch")
    if cfg.lifecycle.poll_interval <= 0:
        raise ConfigError(f"{cfg.source}: key 'lifecycle.poll_interval' must be positive")
    runtime = DaemonRuntime("lifecycle watch")
    imds = ImdsClient.from_config(cfg)
    clients = AwsClients(cfg, imds)
    store = StateStore(cfg.state_dir)
    store.ensure()
    watcher = Watcher(cfg, imds, LifecycleAws(cfg, clients, imds), store, busy_section=runtime.busy)
    log.info(
        "lifecycle watch: polling IMDS every %gs (rebalance: %s, scale-in protection: %s)",
        cfg.lifecycle.poll_interval,
        cfg.lifecycle.rebalance,
        "on" if cfg.lifecycle.scale_in_protection else "off",
    )
    return runtime.run(watcher)
