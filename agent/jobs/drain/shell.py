"""The drain's I/O shell: its collaborators (systemctl, the state store, systemd notify, the
worker's remote control, clock, sleep; all injectable for tests) and the steps the drain,
stop-consuming and undrain procedures share: persist a phase (and what it means for the worker's
record, agent.worker.state), report progress, watch and stop the worker unit, cancel the
worker's consumers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from agent.errors import AgentError
from agent.jobs.drain import plan
from agent.jobs.drain.broker import node_name
from agent.jobs.drain.control import worker_control
from agent.platform.notify import Notifier
from agent.platform.systemd import Systemctl, SystemctlError, systemctl_from_config
from agent.state import StateStore
from agent.worker.celery_control import BrokerSettings, WorkerControl
from agent.worker.state import note_drain_phase

log = logging.getLogger(__name__)


@dataclass
class DrainProgress:
    phase: str
    node: str
    active: int = 0
    reserved: int = 0
    remaining: float = 0.0
    message: str = ""


@dataclass
class DrainResult:
    # drained | already-stopped | stopped-at-deadline | warm-stopped
    outcome: str
    node: str
    method: str
    queues: List[str] = field(default_factory=list)
    started: float = 0.0
    idle_at: Optional[float] = None  # when the worker was seen with nothing to do
    stopped_at: Optional[float] = None
    message: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


class DrainShell:
    """Collaborators and shared steps; the drain (drainer.Drainer) and undrain
    (undrain.Undrainer) procedures build on it."""

    def __init__(
        self,
        cfg,
        systemctl: Optional[Systemctl] = None,
        store: Optional[StateStore] = None,
        notifier: Optional[Notifier] = None,
        control_factory: Optional[Callable[[BrokerSettings, str], WorkerControl]] = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        on_progress: Optional[Callable[[DrainProgress], None]] = None,
    ):
        self.cfg = cfg
        self.systemctl = systemctl or systemctl_from_config(cfg)
        self.store = store or StateStore(cfg.state_dir)
        self.notifier = notifier or Notifier()
        # replies are awaited for the configured drain.reply_timeout, never a built-in default
        self.control_factory = control_factory or (lambda s, n: worker_control(cfg, s, n))
        self.clock = clock
        self.sleep = sleep
        self.on_progress = on_progress
        self.unit = cfg.drain.worker_unit
        self.node = node_name(cfg)

    # -- steps ----------------------------------------------------------------------------------

    def progress(
        self, state: plan.DrainState, active: int = 0, reserved: int = 0, message: str = ""
    ) -> None:
        text = message or plan.status_line(
            state.phase, state.node, active, reserved, state.remaining(self.clock())
        )
        self.notifier.status(text)
        if self.on_progress is not None:
            try:
                self.on_progress(
                    DrainProgress(
                        state.phase,
                        state.node,
                        active,
                        reserved,
                        state.remaining(self.clock()),
                        text,
                    )
                )
            except Exception as exc:  # a caller's callback must not break the drain
                log.warning("drain progress callback failed: %s: %s", type(exc).__name__, exc)

    def save(self, state: plan.DrainState) -> None:
        self.store.save_doc(state)

    def set_phase(self, state: plan.DrainState, phase: str, note: str = "") -> None:
        # the worker's record first (under its lock): from "cancelling" on, confapply and the
        # unit's gate see a drain and never restart the worker under it
        note_drain_phase(self.cfg, self.store, phase, note)
        state.phase = phase
        state.note = note
        self.save(state)
        log.info("drain %s: phase %s%s", state.node, phase, f" ({note})" if note else "")
        self.progress(state)

    def condition(self) -> str:
        return plan.unit_condition(self.systemctl.active_state(self.unit))

    def wait_unit_stopped(self, until: float) -> bool:
        """Poll the unit until it is stopped or `until` passes; True when stopped."""
        while True:
            if self.condition() == plan.UNIT_STOPPED:
                return True
            if self.clock() >= until:
                return False
            self.sleep(min(0.5, max(0.0, until - self.clock())))

    def stop_unit(self, until: float) -> bool:
        """`systemctl stop` (a warm shutdown), bounded by `until`; True when stopped in time."""
        wait = max(1.0, until - self.clock())
        try:
            self.systemctl.stop(self.unit, timeout=wait)
        except SystemctlError as exc:
            # the systemctl client gave up waiting; systemd's stop job goes on
            log.warning("systemctl stop %s: %s", self.unit, exc)
        return self.wait_unit_stopped(until)

    def cancel_consumers(self, control: WorkerControl, state: plan.DrainState) -> None:
        if state.phase not in ("cancelling", "waiting"):
            return
        current = control.active_queues()
        state.queues = plan.merge_queues(state.queues, [q.to_dict() for q in current])
        self.set_phase(state, "cancelling")
        for q in current:
            control.cancel_consumer(q.name)
            log.info("drain %s: cancelled consumer of queue %s", state.node, q.name)
        # Celery applies cancel_consumer "soon" (consumer.call_soon) and replies at once: only
        # active_queues coming back empty proves the worker stopped taking messages.
        left = self.settle(control, lambda names: names, "cancel_consumer")
        if left:
            raise AgentError(f"{state.node} still consumes {', '.join(left)} after cancel_consumer")
        if not state.queues:
            log.warning(
                "drain %s: the worker consumes no queue (already drained by someone else?)",
                state.node,
            )
        self.set_phase(
            state, "waiting", "consumers cancelled: " + (", ".join(state.queue_names) or "none")
        )

    def settle(self, control: WorkerControl, pending, what: str) -> List[str]:
        """Poll active_queues until pending(consumed names) is empty (bounded); what is left."""
        until = self.clock() + min(10.0, self.cfg.drain.reply_timeout)
        while True:
            left = pending([q.name for q in control.active_queues()])
            if not left or self.clock() >= until:
                return left
            log.debug("%s not applied yet (%s); checking again", what, ", ".join(left))
            self.sleep(0.2)
