"""ValidateService's checks, mixed into DeployHook: the role's units active, the worker answering
and consuming, the scheduler job alive, the api-server healthy, each retried until
`deploy.validate_timeout`."""

from __future__ import annotations

import logging
from typing import Optional

from agent.errors import DeadlineError
from agent.platform.health import health_problem

log = logging.getLogger(__name__)


class ValidateSteps:
    """Needs from its host class: cfg, units, systemctl, clock, sleep and `_airflow(...)`."""

    def _until(self) -> float:
        if not hasattr(self, "_deadline"):
            self._deadline = self.clock() + self.cfg.deploy.validate_timeout
        return self._deadline

    def _retry(
        self, what: str, check, interval: float = 1.0, until: Optional[float] = None
    ) -> None:
        """Call check() every `interval` s until it returns None (healthy) or the deadline
        (default: the validate deadline); it returns a reason string while unhealthy."""
        until = self._until() if until is None else until
        while True:
            reason = check()
            if reason is None:
                return
            if self.clock() >= until:
                raise DeadlineError(
                    f"{what} not healthy after {self.cfg.deploy.validate_timeout:g}s: {reason}"
                )
            self.sleep(interval)

    def step_units_active(self) -> None:
        for unit in self.units:
            self.systemctl.wait_active(unit, max(1.0, self._until() - self.clock()))
        log.info("active: %s", ", ".join(self.units))

    def step_worker_ping(self) -> None:
        from agent.jobs.drain.broker import node_name, read_broker
        from agent.jobs.drain.control import ping_waits, worker_control
        from agent.worker.celery_control import ControlError

        settings = read_broker(self.cfg)
        if not settings.remote_control:
            log.warning("broker %s:// has no remote control: worker ping skipped", settings.scheme)
            return
        node = node_name(self.cfg)
        # 1, 2, 4 ... s per ping up to drain.reply_timeout: a ping sent before a starting worker
        # listens is lost, and a loaded worker may need the longer wait
        waits = ping_waits(self.cfg.drain.reply_timeout)
        with worker_control(self.cfg, settings, node) as control:

            def check() -> Optional[str]:
                try:
                    if not control.ping(timeout=next(waits)):
                        return f"{node} does not answer a ping"
                    queues = [q.name for q in control.active_queues()]
                except ControlError as exc:
                    return str(exc)
                return None if queues else f"{node} consumes no queue"

            self._retry(f"worker {node}", check)
        log.info("worker %s answers and consumes", node)

    def step_scheduler_job(self) -> None:
        def check() -> Optional[str]:
            proc = self._airflow(
                "jobs", "check", "--job-type", "SchedulerJob", "--local", timeout=60
            )
            if proc.returncode == 0:
                return None
            return (
                " ".join((proc.stderr or proc.stdout).strip().splitlines()[-1:])
                or f"rc {proc.returncode}"
            )[:200]

        self._retry("scheduler job", check)
        log.info("scheduler job alive")

    def step_health_url(self) -> None:
        self.wait_healthy(self._until())

    def wait_healthy(self, until: float, interval: float = 1.0) -> None:
        """Until the api-server's health URL answers 200 (deploy.health_url; none: no check)."""
        url = self.cfg.deploy.health_url
        if url:
            self._retry("api-server", lambda: health_problem(url), interval, until)
