"""The role document (`role.json`): the role `role --apply` / bootstrap recorded, and why.

Other jobs read it through `agent.jobs.role.current_role` (no network). It lives apart from
agent/jobs/role.py so `status` can list it without importing the role sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from agent.config import ROLES
from agent.state import StateDoc, StateDocError, register


@dataclass
class RoleDoc(StateDoc):
    name: ClassVar[str] = "role"
    version: ClassVar[int] = 1

    role: Optional[str] = None
    decided_at: Optional[float] = None
    # what every source answered when the role was decided ({"source", "role", "detail"})
    sources: List[Dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Any) -> RoleDoc:
        doc = super().from_dict(data)
        if doc.role is not None and doc.role not in ROLES:
            raise StateDocError(
                f"state document role: field 'role' must be one of {', '.join(ROLES)}, "
                f"got {doc.role!r}"
            )
        return doc


# status shows the role on its own line (and `role_recorded_at`), not as a document line
register(RoleDoc)
