"""The scheduler and webserver roles' units in a deployment, mixed into DeployHook: they keep
running unless the bundle changes what they load (agent.jobs.deploy.content).

- ApplicationStop leaves them running: a DAG-only deployment never stops the api-server, whose
  execution API every running task calls for its whole life, nor the scheduler.
- BeforeInstall snapshots the installed tree's category hashes (before CodeDeploy replaces it).
- ApplicationStart restarts a running unit only when a restart category (plugins, config,
  requirements) differs from what its process loaded, saying which; starts a unit that is not
  running; records each unit's MainPID and the hashes its process now runs with.

A restart holds the role's fleet-wide restart slot (one instance of the role at a time) and,
on an api-server behind a load balancer with another healthy target, is done out of the target
group's rotation (deregistered and drained first, registered again once healthy); the only
api-server restarts in place, as fast as systemd restarts it.
"""

from __future__ import annotations

import logging
from typing import Dict, List

from agent.jobs.deploy import content
from agent.jobs.deploy.state import DeployUnitsDoc
from agent.state import StateStore

log = logging.getLogger("agent.jobs.deploy.hook")


class UnitSteps:
    """Needs from its host class: cfg, role, units, home, deployment, systemctl, clock,
    `_restart_guard()` and the ValidateSteps checks."""

    def _store(self) -> StateStore:
        return StateStore(self.cfg.state_dir)

    def step_keep_units(self) -> None:
        log.info(
            "%s keep running: ApplicationStart restarts them only if the bundle changes "
            "what they load",
            ", ".join(self.units),
        )

    def step_snapshot_tree(self) -> None:
        hashes = content.tree_hashes(self.home)
        store = self._store()
        doc = store.load_doc(DeployUnitsDoc) or DeployUnitsDoc()
        doc.before, doc.before_deployment = hashes, self.deployment
        store.save_doc(doc)
        log.info(
            "tree before the install: %s",
            ", ".join(f"{c} {h[:8]}" for c, h in sorted(hashes.items())),
        )

    def step_apply_units(self) -> None:
        store = self._store()
        doc = store.load_doc(DeployUnitsDoc) or DeployUnitsDoc()
        now = content.tree_hashes(self.home)
        before = doc.before if doc.before_deployment == self.deployment else None
        log.info("this deployment changed: %s", content.describe_changes(before, now))
        states = self.systemctl.unit_states(self.units)
        to_start: List[str] = []
        to_restart: Dict[str, List[str]] = {}
        kept: List[str] = []
        for unit in self.units:
            if states.get(unit, {}).get("ActiveState") != "active":
                to_start.append(unit)
                continue
            pid = self.systemctl.main_pid(unit)
            same_process = doc.loaded is not None and doc.pids.get(unit) == pid
            why = content.changed_categories(doc.loaded if same_process else before, now)
            if why:
                to_restart[unit] = why
            else:
                kept.append(f"{unit} (MainPID {pid})")
        if kept:
            log.info("kept running, nothing they load changed: %s", ", ".join(kept))
        if to_restart:
            self._restart_units(to_restart)
        for unit in to_start:
            self.systemctl.reset_failed(unit)
            self.systemctl.start(unit)
            log.info("started %s (it was %s)", unit, states.get(unit, {}).get("ActiveState"))
        action = describe_action(to_restart, len(kept), to_start)
        doc.loaded, doc.deployment, doc.last_action = now, self.deployment, action
        doc.pids = {u: self.systemctl.main_pid(u) for u in self.units}
        store.save_doc(doc)

    def _restart_units(self, to_restart: Dict[str, List[str]]) -> None:
        with self._restart_guard():
            for unit, why in to_restart.items():
                started = self.clock()
                log.info("restarting %s: the bundle changed %s", unit, ", ".join(why))
                self.systemctl.restart(unit)
                self._wait_serving(unit)
                log.info(
                    "%s restarted (MainPID %s) in %.1f s",
                    unit,
                    self.systemctl.main_pid(unit),
                    self.clock() - started,
                )

    def _wait_serving(self, unit: str) -> None:
        """Active, and for the api-server answering its health URL (before it goes back
        into rotation)."""
        self.systemctl.wait_active(unit, self.cfg.deploy.validate_timeout)
        if self.role == "webserver":
            # polled often: the restart is over, for the tasks, when this answers
            self.wait_healthy(self.clock() + self.cfg.deploy.validate_timeout, interval=0.25)


def describe_action(restarted: Dict[str, List[str]], kept: int, started: List[str]) -> str:
    """The deploy record's `last_action`, naming only what happened: `restarted <unit>:
    <categories>; ...` or `kept` (every running unit kept), then `started <units>`."""
    parts = []
    if restarted:
        parts.append("restarted " + "; ".join(f"{u}: {', '.join(c)}" for u, c in restarted.items()))
    elif kept:
        parts.append("kept")
    if started:
        parts.append("started " + ", ".join(started))
    return "; ".join(parts)
