"""The deploy hook's record (`deploy.json`) of what the scheduler/webserver units loaded.

BeforeInstall snapshots the installed tree's category hashes (agent.jobs.deploy.content)
before CodeDeploy replaces it; ApplicationStart records, per unit, the MainPID it left running
and the hashes of the tree that process loaded. The next deployment compares the tree it
installed with that record to decide whether a unit must restart. Holds hashes and PIDs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional

from agent.state import StateDoc, register


@dataclass
class DeployUnitsDoc(StateDoc):
    name: ClassVar[str] = "deploy"
    version: ClassVar[int] = 1

    # BeforeInstall: the tree's hashes before this deployment's install, and which deployment
    before: Optional[Dict[str, str]] = None
    before_deployment: Optional[str] = None
    # ApplicationStart: the hashes the units' processes loaded, and their MainPIDs then
    loaded: Optional[Dict[str, str]] = None
    pids: Dict[str, int] = field(default_factory=dict)
    deployment: Optional[str] = None
    # what the last ApplicationStart did: kept | restarted (and why) | started
    last_action: Optional[str] = None


register(
    DeployUnitsDoc,
    status_key="deploy",
    title="deploy",
    shown=("deployment", "last_action"),
    optional=True,
)
