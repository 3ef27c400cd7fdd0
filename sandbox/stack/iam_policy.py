"""IAM policy evaluation for the embedded AWS: does this role's policy allow this action on
this resource? (moto checks only actions and uses resource `*`; TESTING.md.)

`evaluate(statements, action, resources, context)` follows IAM's identity-policy logic for one
principal: an explicit Deny wins, then any Allow, else the implicit deny. Action/NotAction
match case-insensitively with `*`/`?` globs, Resource/NotResource case-sensitively. Conditions
are evaluated for the operators below against the request's context keys; a condition whose
operator is not implemented here is *not* taken as met (the statement does not apply) and is
returned in `Decision.unevaluated`, so nothing passes silently.
Resource-based policies (bucket and key policies), permission boundaries and SCPs are not
evaluated (the stack's instance roles are granted by identity policies only).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

_OPERATORS = {
    "StringEquals": lambda have, want: have == want,
    "StringNotEquals": lambda have, want: have != want,
    "StringEqualsIgnoreCase": lambda have, want: have.lower() == want.lower(),
    "StringLike": lambda have, want: _glob(want, have),
    "StringNotLike": lambda have, want: not _glob(want, have),
    "ArnEquals": lambda have, want: have == want,
    "ArnLike": lambda have, want: _glob(want, have),
    "Bool": lambda have, want: have.lower() == want.lower(),
}
_NEGATED = {"StringNotEquals", "StringNotLike"}


@dataclass
class Decision:
    allowed: bool
    reason: str  # "allowed", "explicit deny (Sid)", "no identity-based policy allows"
    unevaluated: List[str] = field(default_factory=list)


def as_list(value: Any) -> List[Any]:
    return value if isinstance(value, list) else [value]


def _glob(pattern: str, text: str, ignore_case: bool = False) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in str(pattern))
    return (
        re.fullmatch(regex, text, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)
        is not None
    )


def statements_of(document: Any) -> List[Dict[str, Any]]:
    doc = json.loads(document) if isinstance(document, str) else document
    return [dict(s) for s in as_list(doc.get("Statement", []))]


def _matches(stmt: Dict[str, Any], key: str, value: str, ignore_case: bool) -> bool:
    if key in stmt:
        return any(_glob(p, value, ignore_case) for p in as_list(stmt[key]))
    if "Not" + key in stmt:
        return not any(_glob(p, value, ignore_case) for p in as_list(stmt["Not" + key]))
    return False


def conditions_hold(
    condition: Dict[str, Any], context: Dict[str, str], unevaluated: List[str]
) -> bool:
    for op_name, tests in condition.items():
        base = op_name[: -len("IfExists")] if op_name.endswith("IfExists") else op_name
        if (
            base.startswith("ForAllValues:")
            or base.startswith("ForAnyValue:")
            or base not in _OPERATORS
        ):
            unevaluated.append(f"{op_name} {json.dumps(tests, sort_keys=True)}")
            return False
        for key, wanted in tests.items():
            have = _context_value(context, key)
            if have is None:
                if op_name.endswith("IfExists"):
                    continue
                if base in _NEGATED:
                    continue  # a missing key is "not equal" to anything
                return False
            if not any(_OPERATORS[base](have, str(w)) for w in as_list(wanted)):
                return False
    return True


def _context_value(context: Dict[str, str], key: str) -> Optional[str]:
    for k, v in context.items():  # condition keys are case-insensitive
        if k.lower() == key.lower():
            return v
    return None


def evaluate(
    statements: List[Dict[str, Any]],
    action: str,
    resource: str,
    context: Optional[Dict[str, str]] = None,
) -> Decision:
    context = context or {}
    unevaluated: List[str] = []
    allowed_by: Optional[str] = None
    for i, stmt in enumerate(statements):
        if not _matches(stmt, "Action", action, ignore_case=True):
            continue
        if not _matches(stmt, "Resource", resource, ignore_case=False):
            continue
        sid = stmt.get("Sid") or f"statement {i + 1}"
        if "Condition" in stmt and not conditions_hold(stmt["Condition"], context, unevaluated):
            continue
        if stmt.get("Effect") == "Deny":
            return Decision(
                False, f"with an explicit deny in an identity-based policy ({sid})", unevaluated
            )
        if stmt.get("Effect") == "Allow" and allowed_by is None:
            allowed_by = sid
    if allowed_by is not None:
        return Decision(True, f"allowed by {allowed_by}", unevaluated)
    return Decision(
        False, f"because no identity-based policy allows the {action} action", unevaluated
    )


def role_statements(role) -> List[Dict[str, Any]]:
    """Every statement of a moto IAM role's inline and attached managed policies."""
    out: List[Dict[str, Any]] = []
    for document in role.policies.values():
        out += statements_of(document)
    for policy in role.managed_policies.values():
        document = getattr(policy, "document", None)
        if document is None:
            versions = [v for v in policy.versions if v.is_default]
            document = versions[0].document if versions else "{}"
        out += statements_of(document)
    return out
