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
- `Warmed:*`: a warm-pool instance; the watcher never starts or undrains the worker, and
  drains it if it runs (an in-service instance returned to the pool by ReuseOnScaleIn).
- optional scale-in protection: on while the worker has tasks, off after a quiet period.

Why a thread for the drain: the drain is one blocking procedure shared with CodeDeploy and the
operator CLI; its inspect polls take ~1 s each and may block on a slow broker. Heartbeats must
go out on time whatever the drain is doing, so the drain runs beside the loop and reports
progress through a callback; the loop owns every AWS call and every state write.

Everything the loop knows is in StateStore `lifecycle.json` (fields listed in `STATUS_FIELDS`),
so an agent restarted mid-drain resumes the drain (drain.json holds its own progress),
resumes heartbeats with the persisted plan, and completes the lifecycle action once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from agent.errors import AgentError, ConfigError
from agent.jobs.lifecycle import plan
from agent.jobs.lifecycle.aws import COMPLETE_RESULT, LifecycleAws, no_active_action
from agent.jobs.lifecycle.drain import (
    DrainFn,
    DrainRunner,
    default_active_tasks,
    default_busy,
    default_drain,
    default_stop_consuming,
)
from agent.platform.aws import AWS_ERRORS, AwsClients, describe_error
from agent.platform.imds import ImdsClient
from agent.platform.notify import Notifier
from agent.state import StateStore

log = logging.getLogger(__name__)

STATE_NAME = "lifecycle"
# Auto Scaling's default HeartbeatTimeout, assumed while DescribeLifecycleHooks cannot answer
DEFAULT_HEARTBEAT_TIMEOUT = 3600.0
HANDLED_KEEP = 50  # event keys remembered for de-duplication

# lifecycle.json fields that `airflow-agent status` shows (the contract with status.py)
STATUS_FIELDS = (
    "phase",  # idle | draining | done
    "event",  # {"kind", "key", "detail"} of the current or last event, or null
    "target_lifecycle_state",  # last IMDS answer, e.g. InService, Terminated, Warmed:Stopped
    "last_poll",  # epoch of the last successful IMDS poll
    "drain",  # {"status", "deadline", "progress", "unfinished_tasks", "message", ...}
    "lifecycle_action",  # {"hook", "group", "heartbeats_sent", "completed", "plan", ...}
    "protection",  # {"protected", "idle_since", "changed_at"}
    "summary",  # one line, the same as systemd's STATUS=
)


# -- the watcher ---------------------------------------------------------------------------


class Watcher:
    """The loop's state and one `tick()`; `run()` repeats it until stopped."""

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
        notifier: Optional[Notifier] = None,
    ):
        self.cfg = cfg
        self.imds = imds
        self.aws = aws
        self.store = store
        self._drain_fn = drain_fn
        self._stop_consuming_fn = stop_consuming_fn
        self._busy_fn = busy_fn
        self._active_tasks_fn = active_tasks_fn
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.state: Dict[str, Any] = store.load(STATE_NAME)
        self.state.setdefault("phase", plan.IDLE)
        self.state.setdefault("handled", [])
        self.runner: Optional[DrainRunner] = None
        self._imds_failing = False
        self._drain_retry_at = 0.0
        self._next_poll = 0.0

    # -- persistence -------------------------------------------------------------------------

    def save(self) -> None:
        self.store.save(STATE_NAME, self.state)

    @property
    def event(self) -> Optional[plan.Event]:
        data = self.state.get("event")
        if data and self.state.get("phase") == plan.DRAINING:
            return plan.Event.from_dict(data)
        return None

    # -- one tick ----------------------------------------------------------------------------

    def poll(self) -> Optional[List[plan.Event]]:
        """The events IMDS describes now; None when IMDS could not be read (logged once)."""
        try:
            target = self.imds.target_lifecycle_state()
            spot = self.imds.spot_instance_action()
            rebalance = self.imds.rebalance_recommendation()
        except AgentError as exc:
            if not self._imds_failing:
                log.warning(
                    "IMDS poll failed, retrying every %gs: %s",
                    self.cfg.lifecycle.poll_interval,
                    exc,
                )
            self._imds_failing = True
            self.state["last_poll_error"] = str(exc)
            return None
        if self._imds_failing:
            log.info("IMDS poll recovered")
        self._imds_failing = False
        self.state["last_poll_error"] = None
        self.state["last_poll"] = self.clock()
        if target != self.state.get("target_lifecycle_state"):
            log.info("target lifecycle state: %s", target)
            # a target state that ended may come back (warm pool reuse): forget it was handled
            self.state["handled"] = [
                k
                for k in self.state["handled"]
                if not k.startswith("target:") or k == f"target:{target}"
            ]
        self.state["target_lifecycle_state"] = target
        return plan.classify(target, spot, rebalance, self.cfg.lifecycle.rebalance)

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
                        self._setup_action(self.clock())
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
        self.notifier.status(self.state["summary"])
        self.notifier.watchdog()

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
        if ev.kind == plan.SPOT:
            deadline = plan.spot_deadline(
                ev.detail.get("time", ""), self.cfg.lifecycle.spot_margin, now
            )
            log.warning(
                "Spot %s notice for %s: draining until %s (%.0fs from now)",
                ev.detail.get("action"),
                ev.detail.get("time"),
                _iso(deadline),
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
            deadline = self._setup_action(now)
        self.state["drain"] = {
            "status": "running",
            "started_at": now,
            "deadline": deadline,
            "progress": {},
            "unfinished_tasks": [],
            "attempts": 0,
        }
        self._start_drain()

    def _remember(self, key: str) -> None:
        handled = [k for k in self.state["handled"] if k != key] + [key]
        self.state["handled"] = handled[-HANDLED_KEEP:]

    def _action(self) -> Optional[Dict[str, Any]]:
        return self.state.get("lifecycle_action")

    def _setup_action(self, now: float) -> float:
        """Find the hook, plan heartbeats and deadlines; return the drain deadline."""
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
        action["plan"] = self._plan(now, timeout).to_dict()
        self.state["lifecycle_action"] = action
        p = action["plan"]
        log.info(
            "termination plan: hook=%s HeartbeatTimeout=%.0fs heartbeat every %.1fs, "
            "global timeout %.0fs (until %s), stop heartbeating at %s",
            action["hook"],
            timeout,
            p["heartbeat_interval"],
            plan.global_timeout(timeout),
            _iso(p["global_deadline"]),
            _iso(p["heartbeat_stop_at"]),
        )
        return p["drain_deadline"]

    def _plan(self, now: float, timeout: float, started: Optional[float] = None):
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

    def _start_drain(self) -> None:
        drain = self.state["drain"]
        drain["attempts"] = int(drain.get("attempts") or 0) + 1
        fn = self._drain_fn or default_drain()
        self.runner = DrainRunner(fn, self.cfg, drain["deadline"], self.clock).start()

    # -- advancing the current event ---------------------------------------------------------

    def _advance(self) -> None:
        now = self.clock()
        drain = self.state["drain"]
        if drain["status"] == "running":
            if self.runner is None:  # restarted agent: the drain resumes from drain.json
                log.info(
                    "resuming the drain after an agent restart (deadline %s)",
                    _iso(drain["deadline"]),
                )
                self._start_drain()
            progress, outcome = self.runner.snapshot()
            if progress:
                drain["progress"] = progress
            if outcome is None:
                self._snapshot_before_deadline(drain, now)
            else:
                self._drain_finished(outcome, now)
        action = self._action()
        if action is not None and not action["completed"]:
            self._heartbeat_or_complete(action, now)
        if drain["status"] != "running" and (action is None or action["completed"]):
            self.state["phase"] = plan.DONE
            self.runner = None
            log.info("event %s finished", self.state["event"]["key"])

    def _drain_finished(self, outcome: Dict[str, Any], now: float) -> None:
        drain = self.state["drain"]
        if (
            outcome["status"] == "failed"
            and now + self.cfg.lifecycle.poll_interval < drain["deadline"]
        ):
            # a failed drain (broker blip, systemctl error) is retried until its deadline:
            # completing now would let Auto Scaling kill running tasks
            if now >= self._drain_retry_at:
                log.error("drain failed (%s); retrying", outcome.get("message"))
                self._drain_retry_at = now + max(self.cfg.lifecycle.poll_interval, 2.0)
                self.runner = None
                self._start_drain()
            return
        drain.update(
            status=outcome["status"],
            finished_at=outcome["finished_at"],
            unfinished_tasks=outcome.get("unfinished_tasks") or [],
            message=outcome.get("message"),
        )
        if outcome["status"] == "deadline" and not drain["unfinished_tasks"]:
            # with on_deadline=fail the worker still answers: ask it; otherwise use the list
            # taken just before the deadline
            drain["unfinished_tasks"] = (
                self._active_tasks() or drain.get("tasks_near_deadline") or []
            )
        unfinished = drain["unfinished_tasks"]
        if outcome["status"] == "done" and not unfinished:
            log.info("drain finished: no task running")
        elif unfinished:
            log.warning(
                "drain ended at its deadline with %d task(s) still running; Airflow "
                "will retry them: %s",
                len(unfinished),
                _describe_tasks(unfinished),
            )
        else:
            log.warning("drain ended (%s): %s", outcome["status"], outcome.get("message"))

    def _active_tasks(self) -> Optional[List[Dict[str, Any]]]:
        try:
            return (self._active_tasks_fn or default_active_tasks(self.cfg))()
        except Exception as exc:  # noqa: BLE001 - a report, not a decision
            log.debug("cannot list the worker's active tasks: %s", exc)
            return None

    def _snapshot_before_deadline(self, drain: Dict[str, Any], now: float) -> None:
        """Shortly before the drain's deadline, note which tasks are still running.

        At the deadline the drain either leaves the worker up (on_deadline=fail) or starts its
        warm shutdown (stop), after which remote control no longer answers; a list taken a
        little before is what the log can name in that case.
        """
        lead = self.cfg.drain.poll_interval + 2.0
        if drain.get("snapshot_at") or now < drain["deadline"] - lead:
            return
        if int((drain.get("progress") or {}).get("active") or 0) <= 0:
            return
        drain["snapshot_at"] = now
        tasks = self._active_tasks()
        if tasks is not None:
            drain["tasks_near_deadline"] = tasks

    def _heartbeat_or_complete(self, action: Dict[str, Any], now: float) -> None:
        p = action["plan"]
        if action["assumed_timeout"] or not action.get("hook"):
            self._retry_hook_lookup(action, now)
            if not action.get("hook"):
                if self.state["drain"]["status"] != "running":
                    log.error(
                        "no lifecycle hook found; nothing to complete (%s)", action.get("error")
                    )
                    action["completed"] = True
                    action["result"] = "no-hook"
                return
            p = action["plan"]
        drain_over = self.state["drain"]["status"] != "running"
        if drain_over or now >= p["heartbeat_stop_at"]:
            if not drain_over:
                log.warning(
                    "heartbeat stop time reached (%s) with the drain still running: "
                    "completing the lifecycle action now",
                    _iso(p["heartbeat_stop_at"]),
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
        if not due:
            return
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

    def _retry_hook_lookup(self, action: Dict[str, Any], now: float) -> None:
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
            plan=self._plan(now, timeout, started).to_dict(),
        )
        log.info("termination hook found: %s (HeartbeatTimeout %.0fs)", hook, timeout)

    def _complete(self, action: Dict[str, Any], now: float) -> None:
        if now >= action["plan"]["global_deadline"]:
            log.error(
                "the lifecycle wait's global timeout has passed; Auto Scaling applied "
                "the hook's DefaultResult"
            )
            action.update(completed=True, result="expired")
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
        log.info(
            "CompleteLifecycleAction(%s) sent for hook %s after %d heartbeat(s)",
            COMPLETE_RESULT,
            action["hook"],
            action["heartbeats_sent"],
        )

    # -- scale-in protection -----------------------------------------------------------------

    def _protection(self) -> None:
        prot = self.state.setdefault("protection", {"protected": None, "idle_since": None})
        now = self.clock()
        try:
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

    # -- status ------------------------------------------------------------------------------

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
            f"; deadline {_iso(self.state['drain']['deadline'])}"
        )

    def next_delay(self) -> float:
        now = self.clock()
        action = self._action()
        at = None
        if self.event is not None and action and not action["completed"] and action.get("hook"):
            p = action["plan"]
            if action["last_heartbeat"] is None:
                at = now
            else:
                at = action["last_heartbeat"] + p["heartbeat_interval"]
                if (action["last_heartbeat_attempt"] or 0) > action["last_heartbeat"]:
                    at = action["last_heartbeat_attempt"] + plan.retry_delay(
                        p["heartbeat_interval"]
                    )
            at = min(at, p["heartbeat_stop_at"])
        delay = plan.next_wake(now, self.cfg.lifecycle.poll_interval, at)
        if self.event is not None:
            # the drain ending should be acted on promptly, not a whole poll later
            delay = min(delay, 0.5)
        return delay

    def run(self, stop: threading.Event) -> None:
        first = True
        while not stop.is_set():
            self.tick()
            if first:
                self.notifier.ready(self.status_line())
                first = False
            stop.wait(self.next_delay())
        self.notifier.stopping()
        self.save()


def _iso(epoch: Optional[float]) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _describe_tasks(tasks: List[Any]) -> str:
    out = []
    for t in tasks:
        if isinstance(t, dict):
            name = t.get("name") or t.get("task") or "?"
            tid = t.get("id") or t.get("task_id") or "?"
            args = t.get("args")
            out.append(f"{name}[{tid}]" + (f" args={args}" if args not in (None, "", []) else ""))
        else:
            out.append(str(t))
    return ", ".join(out)


# -- CLI -----------------------------------------------------------------------------------


def add_arguments(parser, common) -> None:
    sub = parser.add_subparsers(dest="lifecycle_command", metavar="SUBCOMMAND")
    watch = sub.add_parser(
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
    watch.add_argument("--once", action="store_true", help="poll and act once, then exit (testing)")


def run(args, cfg) -> int:
    if getattr(args, "lifecycle_command", None) != "watch":
        raise ConfigError("usage: airflow-agent lifecycle watch [--once]")
    if cfg.lifecycle.poll_interval <= 0:
        raise ConfigError(f"{cfg.source}: key 'lifecycle.poll_interval' must be positive")
    imds = ImdsClient.from_config(cfg)
    clients = AwsClients(cfg, imds)
    store = StateStore(cfg.state_dir)
    store.ensure()
    watcher = Watcher(cfg, imds, LifecycleAws(cfg, clients, imds), store)
    stop = threading.Event()

    def on_signal(signum, _frame):  # the loop acts; the handler only sets the flag
        log.info("signal %d: stopping the watch (state kept in lifecycle.json)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "lifecycle watch: polling IMDS every %gs (rebalance: %s, scale-in protection: %s)",
        cfg.lifecycle.poll_interval,
        cfg.lifecycle.rebalance,
        "on" if cfg.lifecycle.scale_in_protection else "off",
    )
    if args.once:
        watcher.tick()
        return 0
    watcher.run(stop)
    return 0
