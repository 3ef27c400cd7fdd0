"""How every actor restarts an instance's Airflow units (confapply for a config push, the deploy
hook for a bundle that changes what they load): inside the role's fleet-wide restart slot
(agent.airflow.restart_slot: one instance of the role at a time) and, for an api-server behind
a load balancer, out of its target group's rotation (agent.platform.target_group: deregistered
and drained first while another target is healthy, in place when it is the only one).

The block restarts the units; before the api-server goes back into rotation the guard waits
for its own health URL (`deploy.health_url`, polled every 0.25 s) to answer, so the load
balancer never sends a request to an api-server that is still starting. (The unit's own
ExecStartPost has by then made the execution API's slow first request, before `systemctl
restart` returned: systemd/airflow-api-server.service.)
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator, Optional

from agent.airflow.restart_slot import restart_slot
from agent.errors import DeadlineError
from agent.platform.health import health_problem

log = logging.getLogger(__name__)

HEALTH_POLL = 0.25


@contextlib.contextmanager
def restart_guard(
    cfg,
    role: str,
    holder: str,
    *,
    slot_timeout: Optional[float] = None,
    stop: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold the role's restart slot (waited for at most `slot_timeout`, default
    coordination.timeout) and, on the webserver role with target_group.arn set, keep this
    instance out of rotation for the block; the api-server healthy again before it returns."""
    with restart_slot(cfg, role, holder, timeout=slot_timeout, stop=stop, clock=clock):
        if role != "webserver" or not cfg.target_group.arn:
            yield
            return
        from agent.platform.aws import AwsClients
        from agent.platform.target_group import out_of_rotation

        with out_of_rotation(cfg, AwsClients(cfg), clock=clock, sleep=sleep) as outcome:
            log.info("load balancer: %s", outcome.reason)
            yield
            wait_healthy(cfg.deploy.health_url, cfg.deploy.validate_timeout, clock, sleep)


def wait_healthy(
    url: Optional[str], timeout: float, clock: Callable[[], float], sleep: Callable[[float], None]
) -> None:
    """Until `url` answers 200 (no URL: nothing to wait for); DeadlineError after `timeout`."""
    if not url:
        return
    until = clock() + timeout
    while True:
        problem = health_problem(url)
        if problem is None:
            return
        if clock() >= until:
            raise DeadlineError(f"api-server not healthy {timeout:g}s after its restart: {problem}")
        sleep(HEALTH_POLL)
