"""The ALB stand-in (HAProxy) follows the target group's registrations in the embedded AWS.

On AWS the load balancer routes to exactly the targets registered in its target group. In the
sandbox the target group lives in moto (the agent's DeregisterTargets / RegisterTargets change
it, and moto's Auto Scaling group registered the api-servers in it at launch) and the traffic
goes through HAProxy, so `Follower` keeps the two in step: a thread reads DescribeTargetHealth
every `interval` seconds; a target no longer registered (`unused`, `draining` or not listed) is
put in HAProxy's `drain` state (no new requests, those in flight finish), a registered one back
to `ready`, and a registered instance HAProxy does not know yet is added to its backend.

What moto does not emulate: the `draining` state (moto reports a deregistered target `unused`
at once); the follower reports after every pass which instances HAProxy still routes to, and
the embedded AWS answers such a target `draining` (sandbox.elbv2_draining), so the agent's wait
ends only once HAProxy stopped routing to it, as on AWS (the deregistration delay itself is not
emulated: HAProxy's `drain` lets requests in flight finish without a time limit);
and health checks (moto reports every registered running instance `healthy` at once): the
traffic is gated by HAProxy's own health checks, which follow the template's, and the follower
reports after every pass which instances those checks have down, which the embedded AWS then
answers `unhealthy`, so an agent waits for the health the load balancer really routes by.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Set

log = logging.getLogger(__name__)

REGISTERED = ("initial", "healthy", "unhealthy", "unavailable")


class Follower:
    """Mirror one target group's registrations (moto) onto a LoadBalancer stand-in."""

    def __init__(
        self,
        lb: Any,
        elbv2: Any,
        target_group_arn: str,
        addresses: Callable[[], Dict[str, str]],
        interval: float = 0.5,
        report: Optional[Callable[[Set[str], Set[str]], None]] = None,
    ) -> None:
        self.lb, self.elbv2, self.arn = lb, elbv2, target_group_arn
        # told after every pass which instances HAProxy routes to and which its health checks
        # have down: the embedded AWS answers a deregistered one `draining` until then, and a
        # registered one `unhealthy` while down (sandbox.elbv2_draining)
        self.report = report
        self.addresses = addresses  # instance id -> its address on the link, read each pass
        self.interval = interval
        self.errors: List[str] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def registered(self) -> Set[str]:
        """The instance ids moto lists as registered in the target group now."""
        got = self.elbv2.describe_target_health(TargetGroupArn=self.arn)
        return {
            d["Target"]["Id"]
            for d in got["TargetHealthDescriptions"]
            if d["TargetHealth"]["State"] in REGISTERED
        }

    def sync(self) -> List[str]:
        """One pass; returns the addresses in rotation afterwards."""
        ids = self.registered()
        addresses = self.addresses()
        wanted = {addresses[i] for i in ids if i in addresses}
        for addr in sorted(wanted - set(self.lb.targets)):
            self.lb.register(addr)  # launched later: it joins HAProxy's backend
        current = set(self.lb.in_rotation())
        for addr in self.lb.targets:
            if (addr in wanted) != (addr in current):
                self.lb.set_in_rotation(addr, addr in wanted)
        routed = self.lb.in_rotation()
        if self.report is not None:
            down = {a for a, status in (self.lb.target_health() or {}).items() if status == "DOWN"}
            self.report(
                {i for i, a in addresses.items() if a in routed},
                {i for i, a in addresses.items() if a in down},
            )
        return routed

    def start(self) -> Follower:
        self.sync()
        self._thread = threading.Thread(target=self._run, name="tg-follower", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 - keep following; the error is kept
                if not self.errors or self.errors[-1] != str(exc):
                    log.warning("target group follower: %s", exc)
                self.errors.append(str(exc))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
