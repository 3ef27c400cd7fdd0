"""Take this api-server out of the load balancer's target group while it restarts.

An api-server (webserver role) that must restart (a deployment that changes plugins, a config
push) should not do it while the load balancer still sends it requests: `out_of_rotation` first
deregisters this instance from the target group (target_group.arn) and waits until the
load balancer has drained it (in-flight requests finish during the target group's deregistration
delay, state `draining`, then `unused`), runs the caller's block (the restart), then registers
the instance again and waits until the load balancer reports it `healthy`.

Only when another target is healthy: with a single api-server, deregistering it would take the
execution API (which running tasks call for their whole life) away entirely, so then the block
runs with the instance left in the target group (a restart in place, as short as the block).
The same holds when this instance is not registered at all (a first boot: the Auto Scaling group
registers it once it is InService) and when target_group.arn is null (no load balancer).
After deregistering, the other targets are read again: if none of them is healthy any more
(another api-server left at the same moment) this one goes back at once and restarts in place,
so two instances that decide together do not both restart out of the group (on AWS a target
registered again reads `initial` until its health checks pass: that race can still leave the
group short of healthy targets that long; taking turns is for a coordination layer above).

If the block raises, the instance is still registered again (and that is logged): it must not
stay out of rotation silently. A run that dies while the instance is out (a hook killed at its
timeout) leaves that on record (agent.platform.target_group_state); the next run registers the
instance again before it decides anything. The waits run on an injected clock and sleep, so
the decisions are testable on virtual time; every error names the target group and instance.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from agent.errors import AgentError
from agent.platform.aws import AWS_ERRORS, describe_error
from agent.platform.target_group_state import TargetGroupDoc
from agent.state import StateStore

log = logging.getLogger(__name__)

HEALTHY = "healthy"
# a target no longer receives requests once it reads `unused` (or is not listed at all)
GONE = ("unused",)
# what a deregistered target reads while the load balancer drains it
DRAINING = ("draining", "unhealthy.draining")


class RotationError(AgentError):
    """A target group call or wait failed (the message names the target group and instance)."""


@dataclass(frozen=True)
class Target:
    id: str
    port: int
    state: str


@dataclass
class Outcome:
    """What `out_of_rotation` did: `rotated` True when the instance left the target group."""

    rotated: bool = False
    reason: str = ""
    drained: bool = False  # the load balancer reported the instance gone before the block ran
    targets: List[Target] = field(default_factory=list)  # this instance's registrations


@dataclass(frozen=True)
class Decision:
    rotate: bool
    reason: str
    mine: List[Target]


def parse_health(response: Dict[str, Any]) -> List[Target]:
    """DescribeTargetHealth's answer as Targets."""
    out = []
    for d in response.get("TargetHealthDescriptions", []):
        target = d.get("Target", {})
        state = d.get("TargetHealth", {}).get("State", "unavailable")
        out.append(Target(str(target.get("Id", "")), int(target.get("Port", 0)), str(state)))
    return out


def healthy_others(targets: List[Target], instance_id: str) -> List[str]:
    """The other instances' ids that the load balancer reports healthy."""
    return sorted({t.id for t in targets if t.id != instance_id and t.state == HEALTHY})


def decide(targets: List[Target], instance_id: str) -> Decision:
    """Whether this instance may leave the target group now (pure: the rule in one place)."""
    mine = [t for t in targets if t.id == instance_id and t.state not in GONE + DRAINING]
    others = healthy_others(targets, instance_id)
    if not mine:
        return Decision(False, "this instance is not registered in the target group", [])
    if not others:
        return Decision(False, "no other target is healthy: restarting in place", mine)
    return Decision(True, f"{len(others)} other healthy target(s): {', '.join(others)}", mine)


def wait_until(
    check: Callable[[], Optional[str]],
    timeout: float,
    interval: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Optional[str]:
    """Call `check` until it returns None (done) or `timeout` passes; the last answer.

    `check` returns None when the wait is over, else a description of what it still sees."""
    deadline = clock() + timeout
    while True:
        seen = check()
        if seen is None:
            return None
        left = deadline - clock()
        if left <= 0:
            return seen
        sleep(min(interval, left))


class Rotation:
    """One instance's membership of one target group (elbv2 client, ARN, instance id)."""

    def __init__(
        self,
        elbv2: Any,
        target_group_arn: str,
        instance_id: str,
        deregister_timeout: float = 120.0,
        register_timeout: float = 300.0,
        poll_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        store: Optional[StateStore] = None,
    ):
        self.store = store  # where the record of being out lives; None: no record
        self.elbv2 = elbv2
        self.arn = target_group_arn
        self.instance_id = instance_id
        self.deregister_timeout = deregister_timeout
        self.register_timeout = register_timeout
        self.poll_interval = poll_interval
        self.clock = clock
        self.sleep = sleep

    def _record(self, mine: List[Target], out: bool, result: str, reason: str) -> None:
        """Record whether this instance is out now (a failure to write is only logged)."""
        if self.store is None:
            return
        now = time.time()
        try:
            self.store.update_doc(
                TargetGroupDoc,
                target_group_arn=self.arn,
                instance_id=self.instance_id,
                ports=[t.port for t in mine],
                out_since=now if out else None,
                last_result=result,
                last_reason=reason,
                last_change=now,
            )
        except OSError as exc:
            log.warning("%s: could not record %s: %s", self._where(), result, exc)

    def _left_out_before(self) -> None:
        """Register again an instance a previous run left out (it died before registering)."""
        doc = self.store.load_doc(TargetGroupDoc) if self.store is not None else None
        if doc is None or doc.out_since is None:
            return
        if (doc.target_group_arn, doc.instance_id) != (self.arn, self.instance_id):
            return
        serving = {
            t.port
            for t in self.health()
            if t.id == self.instance_id and t.state not in GONE + DRAINING
        }
        mine = [Target(self.instance_id, p, "unused") for p in doc.ports if p not in serving]
        log.warning(
            "%s: a previous run left this instance out of the target group; registering it again",
            self._where(),
        )
        if mine:
            self.register(mine, wait=False)
        self._record(mine, False, "registered again", "a previous run left it out")

    def _where(self) -> str:
        return f"target group {self.arn}, instance {self.instance_id}"

    def _call(self, operation: str, **kwargs: Any) -> Dict[str, Any]:
        try:
            if operation == "DescribeTargetHealth":
                return self.elbv2.describe_target_health(TargetGroupArn=self.arn, **kwargs)
            if operation == "DeregisterTargets":
                return self.elbv2.deregister_targets(TargetGroupArn=self.arn, **kwargs)
            return self.elbv2.register_targets(TargetGroupArn=self.arn, **kwargs)
        except AWS_ERRORS as exc:
            raise RotationError(f"{self._where()}: {operation}: {describe_error(exc)}") from exc

    def health(self, targets: Optional[List[Target]] = None) -> List[Target]:
        """Every registered target (or the given ones, whatever their state)."""
        kwargs = {}
        if targets:
            kwargs["Targets"] = [{"Id": t.id, "Port": t.port} for t in targets]
        return parse_health(self._call("DescribeTargetHealth", **kwargs))

    def _states(self, mine: List[Target]) -> Dict[int, str]:
        listed = {t.port: t.state for t in self.health(mine) if t.id == self.instance_id}
        return {t.port: listed.get(t.port, "unused") for t in mine}

    def deregister(self, mine: List[Target]) -> bool:
        """DeregisterTargets, then wait until the load balancer reports it gone; False if it is
        still draining at target_group.deregister_timeout (the caller goes on: no new requests reach
        it, only the slowest in-flight ones may be cut)."""
        self._call("DeregisterTargets", Targets=[{"Id": t.id, "Port": t.port} for t in mine])
        self._record(mine, True, "out", "deregistered for a restart")

        def draining() -> Optional[str]:
            states = self._states(mine)
            left = {p: s for p, s in states.items() if s not in GONE}
            return None if not left else ", ".join(f"port {p}: {s}" for p, s in left.items())

        seen = wait_until(
            draining, self.deregister_timeout, self.poll_interval, self.clock, self.sleep
        )
        if seen is not None:
            log.warning(
                "%s: still %s after %.0f s (target_group.deregister_timeout); going on",
                self._where(), seen, self.deregister_timeout,
            )  # fmt: skip
        return seen is None

    def register(self, mine: List[Target], wait: bool = True) -> None:
        """RegisterTargets, then (`wait`) until every port of this instance reads `healthy`."""
        self._call("RegisterTargets", Targets=[{"Id": t.id, "Port": t.port} for t in mine])
        self._record(mine, False, "registered", "registered again")
        if not wait:
            return

        def unhealthy() -> Optional[str]:
            left = {p: s for p, s in self._states(mine).items() if s != HEALTHY}
            return None if not left else ", ".join(f"port {p}: {s}" for p, s in left.items())

        seen = wait_until(
            unhealthy, self.register_timeout, self.poll_interval, self.clock, self.sleep
        )
        if seen is not None:
            # on record too: `status` must not read a plain `registered` after this
            self._record(mine, False, "unhealthy", f"not healthy at register_timeout: {seen}")
            raise RotationError(
                f"{self._where()}: registered again but not healthy after "
                f"{self.register_timeout:.0f} s (target_group.register_timeout): {seen}"
            )
        self._record(mine, False, "healthy", "registered, the load balancer reports it healthy")

    @contextlib.contextmanager
    def out(self) -> Iterator[Outcome]:
        """Deregister (if another target is healthy), run the block, register again."""
        self._left_out_before()
        decision = decide(self.health(), self.instance_id)
        outcome = Outcome(reason=decision.reason, targets=decision.mine)
        if not decision.rotate:
            log.info("%s: %s", self._where(), decision.reason)
            yield outcome
            return
        log.info("%s: leaving the target group (%s)", self._where(), decision.reason)
        try:
            outcome.drained = self.deregister(decision.mine)
            others = healthy_others(self.health(), self.instance_id)
        except BaseException:
            self._back_after_failure(decision.mine, "leaving the target group failed")
            raise
        if not others:
            # another target left at the same moment: back at once, restart in place
            outcome.reason = "no other target is healthy after leaving: restarting in place"
            log.warning("%s: %s; registering again first", self._where(), outcome.reason)
            self.register(decision.mine)
            yield outcome
            return
        outcome.rotated = True
        try:
            yield outcome
        except BaseException:
            self._back_after_failure(decision.mine, "the restart failed")
            raise
        self.register(decision.mine)
        log.info("%s: back in the target group, healthy", self._where())

    def _back_after_failure(self, mine: List[Target], what: str) -> None:
        """Register again after `what` raised, without waiting for health (a failed restart
        may never be healthy; the load balancer's health checks keep requests away until it
        is). The original error is the one that propagates, so a failure here is logged."""
        log.error("%s: %s; registering the instance again", self._where(), what)
        try:
            self.register(mine, wait=False)
        except Exception as exc:  # the block's own error is raised by the caller
            log.error("%s: could not register it again: %s", self._where(), exc)


@contextlib.contextmanager
def out_of_rotation(
    cfg: Any,
    clients: Any,
    instance_id: Optional[str] = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Outcome]:
    """`with out_of_rotation(cfg, clients) as outcome: restart()` for this instance.

    `clients` is an AwsClients (its elbv2 client; its IMDS for the instance id unless
    `instance_id` is given). With target_group.arn null nothing is called: the block runs
    in place."""
    tg = cfg.target_group
    if not tg.arn:
        yield Outcome(reason="no target group configured (target_group.arn): in place")
        return
    rotation = Rotation(
        clients.client("elbv2"),
        tg.arn,
        instance_id or clients.imds.instance_id(),
        deregister_timeout=tg.deregister_timeout,
        register_timeout=tg.register_timeout,
        poll_interval=tg.poll_interval,
        clock=clock,
        sleep=sleep,
        store=StateStore(cfg.state_dir),
    )
    with rotation.out() as outcome:
        yield outcome
