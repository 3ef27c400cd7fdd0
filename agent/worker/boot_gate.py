"""The boot gate: a worker does not consume tasks before it has its first CodeDeploy revision,
nor while the worker's record (agent.worker.state) says it must not run.

A new worker instance boots from the launch template with whatever DAGs and plugins the AMI
holds (usually none, or old ones). If `airflow-worker` started then, it would take tasks it
cannot run or runs with stale code. So bootstrap *enables* the worker unit but does not *start*
it while this gate holds; CodeDeploy's ApplicationStart hook moves the record to `running` and
starts it.

The gate holds in two places:
- in `bootstrap` and `role --apply` (`start_gate`): under the record's lock they enable the
  worker without starting it, and refuse outright on a terminating instance; a warm-pool
  instance (`Warmed:*` target lifecycle state) is held too, whatever the record says;
- in the unit itself, on every start by anyone, across reboots: `airflow-worker.service` has
  `ExecCondition=airflow-agent worker-gate`, which exits 0 when the record says the worker may
  run and 1 (systemd skips the start; the unit stays inactive, not failed) otherwise. It runs
  as the unit's user and reads the record's public copy.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Iterator, List, Optional

from agent.worker import state_plan as sp
from agent.worker.state import WorkerRecord, WorkerRefused, gate_decision

log = logging.getLogger(__name__)


def _warm(target_lifecycle_state: Optional[str]) -> bool:
    return (target_lifecycle_state or "").startswith("Warmed:")


def boot_gate_holds(cfg, role: str, target_lifecycle_state: Optional[str] = None) -> bool:
    """True when `airflow-worker` must stay stopped now (enabled, not started).

    Only for the worker role: when the instance is in a warm pool, or the record says the worker
    must not run (never deployed to with `deploy.boot_gate` on, paused, draining, drained,
    terminating). Other roles never hold: their units serve no tasks.
    """
    if role != "worker":
        return False
    if _warm(target_lifecycle_state):
        return True
    return not gate_decision(cfg)[0]


def boot_gate_reason(cfg, role: str, target_lifecycle_state: Optional[str] = None) -> str:
    """One log line saying why the gate holds (or that it does not)."""
    if not boot_gate_holds(cfg, role, target_lifecycle_state):
        return "boot gate open"
    if _warm(target_lifecycle_state):
        return f"boot gate holds: instance is in a warm pool ({target_lifecycle_state})"
    doc, _saved = WorkerRecord(cfg).load()
    if doc.state == sp.FRESH and not doc.terminating:
        return (
            f"boot gate holds: no CodeDeploy revision yet ({cfg.deploy.first_revision_marker} "
            "absent); airflow-worker is enabled and ApplicationStart will start it"
        )
    return f"boot gate holds: worker state {sp.describe(doc.state, doc.terminating)}"


def refuse_if_terminating(cfg, role: str, actor: str) -> None:
    """WorkerRefused when this worker's record says the instance is terminating."""
    if role != "worker":
        return
    doc, _saved = WorkerRecord(cfg).load()
    if doc.terminating:
        raise WorkerRefused(f"{actor} refused: {sp.hold_reason(doc.state, doc.terminating)}")


@contextlib.contextmanager
def start_gate(
    cfg, role: str, actor: str, target_lifecycle_state: Optional[str] = None
) -> Iterator[List[str]]:
    """For bootstrap and `role --apply`: the units to enable but not start, with the worker's
    record locked while the caller starts the others (so no drain begins in between).

    Refuses (WorkerRefused) on a terminating instance. Saves the record when it has none yet,
    so the unit's gate reads the same state from its public copy.
    """
    if role != "worker":
        yield []
        return
    with WorkerRecord(cfg).hold(actor) as held:
        if held.doc.terminating:
            raise WorkerRefused(
                f"{actor} refused: {sp.hold_reason(held.doc.state, held.doc.terminating)}"
            )
        held.ensure_saved(f"{actor}: first record")
        hold: List[str] = []
        if _warm(target_lifecycle_state) or not held.may_run:
            log.info("%s", boot_gate_reason(cfg, role, target_lifecycle_state))
            hold = cfg.units_for("worker")
        yield hold


# -- `airflow-agent worker-gate` -------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "The worker unit's ExecCondition: exit 0 when the worker's record says it may run "
        "(state running, not terminating), 1 otherwise (systemd then skips the start)."
    )


def run(args: argparse.Namespace, cfg) -> int:
    ok, why = gate_decision(cfg)
    if ok:
        log.info("worker gate open: %s", why)
        return 0
    log.warning("worker gate holds the worker: %s", why)
    return 1
