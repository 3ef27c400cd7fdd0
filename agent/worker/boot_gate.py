"""The boot gate: a worker does not consume tasks before it has its first CodeDeploy revision.

A new worker instance boots from the launch template with whatever DAGs and plugins the AMI
holds (usually none, or old ones). If `airflow-worker` started then, it would take tasks it
cannot run or runs with stale code. So bootstrap *enables* the worker unit (it starts on every
later boot) but does not *start* it while this gate holds; CodeDeploy's ApplicationStart hook
starts it once the revision is on disk (the bundle installs the marker file).

`boot_gate_holds` is pure apart from one `os.path.exists` on the marker; bootstrap and the
deploy hook call it. A warm-pool instance (`Warmed:*` target lifecycle state) is held too,
whatever the marker says: it must not consume while it sits in the pool.
"""

from __future__ import annotations

import os
from typing import Optional


def boot_gate_holds(cfg, role: str, target_lifecycle_state: Optional[str] = None) -> bool:
    """True when `airflow-worker` must stay stopped now (enabled, not started).

    Holds only for the worker role with `deploy.boot_gate` on, when the first-revision marker
    (`deploy.first_revision_marker`) is absent or the instance is in a warm pool. Other roles
    never hold: their units serve no tasks before a deploy can reach them.
    """
    if role != "worker":
        return False
    if (target_lifecycle_state or "").startswith("Warmed:"):
        return True
    if not cfg.deploy.boot_gate:
        return False
    return not os.path.exists(cfg.deploy.first_revision_marker)


def boot_gate_reason(cfg, role: str, target_lifecycle_state: Optional[str] = None) -> str:
    """One log line saying why the gate holds (or that it does not)."""
    if not boot_gate_holds(cfg, role, target_lifecycle_state):
        return "boot gate open"
    if (target_lifecycle_state or "").startswith("Warmed:"):
        return f"boot gate holds: instance is in a warm pool ({target_lifecycle_state})"
    return (
        f"boot gate holds: no CodeDeploy revision yet ({cfg.deploy.first_revision_marker} "
        "absent); airflow-worker is enabled and ApplicationStart will start it"
    )
