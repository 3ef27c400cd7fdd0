"""`airflow-agent role [--apply] [--role R]`: which role this instance plays, and its units.

Role sources, in priority order (DESIGN.md "Roles and units"):

1. ``--role`` on the command line,
2. ``$AIRFLOW_AGENT_ROLE``,
3. ``role.override`` in agent.yaml,
4. the instance tag ``role.tag`` (``airflow:role``) read through IMDSv2 instance-metadata tags,
5. the same tag read through ``ec2:DescribeTags`` (filter resource-id = this instance),
6. ``role.groups`` (glob pattern -> role, first pattern in file order that matches) applied to
   the Auto Scaling group name (tag ``aws:autoscaling:groupName``),
7. the same map applied to the ``aws:cloudformation:logical-id`` tag.

What "first match wins" and "two sources that disagree" mean here, precisely: every source is
asked (an unreachable or empty source is not an error by itself; it is recorded as such).
The role is the answer of the first source, in the order above, that named one. If any other
source that answered names a *different* role, or any source answered with something that is
not a role, detection fails. It fails too when no source answered. The error lists every source
tried and what it returned, and nothing is enabled or recorded then. So an override is a way to
name the role where the instance has no tags (a sandbox, a hand-launched box), not a way to
contradict them: a tag saying ``worker`` and ``--role scheduler`` is a misconfiguration the
agent refuses rather than guesses about.

The pure core is `decide_role(results)`, `match_group(groups, name)` and `plan_units`. For other
jobs: `current_role(cfg)` (the recorded role, no network), `detect_role(cfg)` (asks the sources),
`apply_role(...)` (records it and enables the role's units).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from agent.config import ROLES
from agent.errors import EXIT_OK, AgentError, RefusedError
from agent.jobs.role_state import RoleDoc
from agent.state import StateStore

log = logging.getLogger(__name__)

ENV_VAR = "AIRFLOW_AGENT_ROLE"
ASG_TAG = "aws:autoscaling:groupName"
LOGICAL_ID_TAG = "aws:cloudformation:logical-id"


class RoleError(AgentError):
    """No source named a role (exit 1)."""


class RoleConflict(RefusedError):
    """Sources disagree, or one named something that is not a role (exit 3)."""


@dataclass
class SourceResult:
    """What one source returned: a role, nothing (`role` None), or a problem (`detail`)."""

    source: str
    role: Optional[str] = None
    detail: str = ""

    def describe(self) -> str:
        if self.role is not None:
            return f"{self.source}: {self.role!r}" + (f" ({self.detail})" if self.detail else "")
        return f"{self.source}: {self.detail or 'nothing'}"


# -- pure core ------------------------------------------------------------------------------


def match_group(groups: Dict[str, str], name: Optional[str]) -> Optional[Tuple[str, str]]:
    """(pattern, role) of the first pattern, in file order, that matches `name` (case-sensitive)."""
    if not name:
        return None
    for pattern, role in groups.items():
        if fnmatch.fnmatchcase(name, pattern):
            return pattern, role
    return None


def explain(results: Sequence[SourceResult]) -> str:
    return "; ".join(r.describe() for r in results)


def decide_role(results: Sequence[SourceResult]) -> Tuple[str, SourceResult]:
    """The role and the source that decided it; RoleError/RoleConflict naming every source."""
    answered = [r for r in results if r.role is not None]
    invalid = [r for r in answered if r.role not in ROLES]
    if invalid:
        raise RoleConflict(
            f"role source {invalid[0].source} named {invalid[0].role!r}, which is not a role "
            f"({', '.join(ROLES)}); sources tried: {explain(results)}"
        )
    if not answered:
        raise RoleError(f"no source names this instance's role; sources tried: {explain(results)}")
    first = answered[0]
    others = sorted({r.role for r in answered if r.role != first.role})
    if others:
        raise RoleConflict(
            f"role sources disagree ({first.role} vs {', '.join(others)}); "
            f"sources tried: {explain(results)}"
        )
    return first.role, first  # type: ignore[return-value]


def plan_units(cfg, role: str) -> Tuple[List[str], List[str]]:
    """(units to enable and start in order, units of other roles to stop and disable).

    Agent units first (airflow-agent-env writes the file the Airflow units read), then the
    role's Airflow units. A unit shared by several roles is never in the second list.
    """
    mine: List[str] = []
    for u in cfg.agent_units_for(role) + cfg.units_for(role):
        if u not in mine:
            mine.append(u)
    others: List[str] = []
    for r in ROLES:
        if r == role:
            continue
        for u in cfg.units_for(r) + cfg.agent_units_for(r):
            if u not in mine and u not in others:
                others.append(u)
    return mine, others


# -- sources (I/O) --------------------------------------------------------------------------


class _InstanceFacts:
    """Lazily fetched facts shared by the tag and group sources, each fetched once."""

    def __init__(self, cfg, imds=None, ec2_factory: Optional[Callable[[], object]] = None):
        self.cfg = cfg
        self._imds = imds
        self._ec2_factory = ec2_factory
        self._imds_tags: Optional[Dict[str, str]] = None
        self._imds_error: Optional[str] = None
        self._ec2_tags: Optional[Dict[str, str]] = None
        self._ec2_error: Optional[str] = None
        self._imds_down = False

    @property
    def imds(self):
        if self._imds is None:
            from agent.platform.imds import ImdsClient

            self._imds = ImdsClient.from_config(self.cfg)
        return self._imds

    def imds_tags(self) -> Tuple[Optional[Dict[str, str]], str]:
        """(tags, why-not): None with a reason when tags in metadata are off or IMDS is down."""
        if self._imds_tags is None and self._imds_error is None:
            try:
                if not self.imds.tags_enabled():
                    self._imds_error = "instance tags are not exposed in metadata"
                else:
                    self._imds_tags = self.imds.tags()
            except AgentError as exc:
                self._imds_error = f"unreachable ({exc})"
                self._imds_down = True
        return self._imds_tags, self._imds_error or ""

    def ec2_tags(self) -> Tuple[Optional[Dict[str, str]], str]:
        if self._ec2_tags is None and self._ec2_error is None:
            from agent.platform.aws import AWS_ERRORS, describe_error

            if self._imds_down:
                # DescribeTags needs the instance id, and asking again would only add timeouts
                self._ec2_error = "skipped (the instance id comes from IMDS, unreachable)"
                return None, self._ec2_error
            try:
                instance_id = self.imds.instance_id()
                ec2 = self._ec2_factory() if self._ec2_factory else self._default_ec2()
                tags: Dict[str, str] = {}
                kwargs = {"Filters": [{"Name": "resource-id", "Values": [instance_id]}]}
                while True:
                    page = ec2.describe_tags(**kwargs)  # type: ignore[attr-defined]
                    for t in page.get("Tags", []):
                        tags[t["Key"]] = t.get("Value", "")
                    token = page.get("NextToken")
                    if not token:
                        break
                    kwargs["NextToken"] = token
                self._ec2_tags = tags
            except AgentError as exc:
                self._ec2_error = f"unavailable ({exc})"
            except AWS_ERRORS as exc:
                self._ec2_error = f"failed ({describe_error(exc)})"
        return self._ec2_tags, self._ec2_error or ""

    def _default_ec2(self):
        from agent.platform.aws import AwsClients

        return AwsClients(self.cfg, imds=self.imds).client("ec2")

    def tag(self, key: str) -> Tuple[Optional[str], str]:
        """A tag from IMDS, else DescribeTags; (value, where-or-why)."""
        reasons = []
        for where, fetch in (("IMDS", self.imds_tags), ("DescribeTags", self.ec2_tags)):
            tags, why = fetch()
            if tags is not None and key in tags:
                return tags[key], f"tag {key} via {where}"
            reasons.append(f"{where}: {why or 'absent'}")
        return None, f"tag {key} not found ({'; '.join(reasons)})"


def gather_sources(
    cfg,
    cli_role: Optional[str] = None,
    environ: Optional[Dict[str, str]] = None,
    imds=None,
    ec2_factory: Optional[Callable[[], object]] = None,
) -> List[SourceResult]:
    """Ask every source; never raises for an unreachable source (it is recorded instead)."""
    environ = os.environ if environ is None else environ
    results = [
        SourceResult("--role", cli_role or None, "" if cli_role else "not given"),
        SourceResult(
            f"${ENV_VAR}", environ.get(ENV_VAR) or None, "" if environ.get(ENV_VAR) else "not set"
        ),
        SourceResult("role.override", cfg.role.override, "" if cfg.role.override else "null"),
    ]
    facts = _InstanceFacts(cfg, imds=imds, ec2_factory=ec2_factory)
    tag = cfg.role.tag
    tags, why = facts.imds_tags()
    if tags is None:
        results.append(SourceResult(f"IMDS tag {tag}", None, why))
    else:
        results.append(
            SourceResult(f"IMDS tag {tag}", tags.get(tag), "" if tag in tags else "absent")
        )
    tags, why = facts.ec2_tags()
    if tags is None:
        results.append(SourceResult(f"DescribeTags {tag}", None, why))
    else:
        results.append(
            SourceResult(f"DescribeTags {tag}", tags.get(tag), "" if tag in tags else "absent")
        )
    for label, key in (
        ("Auto Scaling group", ASG_TAG),
        ("CloudFormation logical id", LOGICAL_ID_TAG),
    ):
        if not cfg.role.groups:
            results.append(SourceResult(f"role.groups[{label}]", None, "role.groups is empty"))
            continue
        value, where = facts.tag(key)
        if value is None:
            results.append(SourceResult(f"role.groups[{label}]", None, where))
            continue
        hit = match_group(cfg.role.groups, value)
        if hit is None:
            results.append(
                SourceResult(f"role.groups[{label}]", None, f"{value!r} matches no pattern")
            )
        else:
            results.append(
                SourceResult(f"role.groups[{label}]", hit[1], f"{value!r} matches {hit[0]!r}")
            )
    return results


def detect_role_sources(
    cfg, cli_role: Optional[str] = None, environ=None, imds=None, ec2_factory=None
) -> Tuple[str, List[SourceResult]]:
    """(role, every source's answer); raises RoleError/RoleConflict explaining all sources."""
    results = gather_sources(cfg, cli_role, environ, imds, ec2_factory)
    role, decided_by = decide_role(results)
    log.info("role %s (from %s)", role, decided_by.source)
    return role, results


def detect_role(cfg, cli_role: Optional[str] = None, **kwargs) -> str:
    """This instance's role from its sources (for other jobs); RoleError/RoleConflict if none
    or conflicting. Asks IMDS and EC2: prefer `current_role` where the recorded role will do."""
    return detect_role_sources(cfg, cli_role, **kwargs)[0]


def current_role(cfg) -> Optional[str]:
    """The role recorded by `role --apply` / bootstrap, or None. Never touches the network."""
    doc = StateStore(cfg.state_dir).load_doc(RoleDoc)
    return doc.role if doc is not None else None


def record_role(cfg, role: str, results: Iterable[SourceResult]) -> bool:
    """Write role.json; False (nothing written) when it already holds this role."""
    store = StateStore(cfg.state_dir)
    if current_role(cfg) == role:
        return False
    log.info("recording role %s in %s", role, store.path(RoleDoc))
    store.save_doc(RoleDoc(role, time.time(), [asdict(r) for r in results]))
    return True


def apply_role(
    cfg,
    role: str,
    systemctl,
    start: bool = True,
    hold: Sequence[str] = (),
    results: Optional[Iterable[SourceResult]] = None,
) -> Dict[str, List[str]]:
    """Record the role (when `results` is given), stop+disable other roles' units, enable and
    start ours; each action only where the unit is not already in that state, so a second run
    changes nothing and restarts nothing.

    `hold` names units to enable but not start (the boot gate). Returns what changed, by action.
    A unit of ours that does not exist fails the run before anything is recorded or changed.
    """
    mine, others = plan_units(cfg, role)
    missing = [u for u in mine if not systemctl.exists(u)]
    if missing:
        raise AgentError(
            f"role {role}: unit(s) {', '.join(missing)} not installed; nothing changed"
        )
    if results is not None:
        # before any unit starts: confapply, started below, reads the role from here
        record_role(cfg, role, results)
    changed: Dict[str, List[str]] = {"stopped": [], "disabled": [], "enabled": [], "started": []}
    for unit in others:
        if not systemctl.exists(unit):
            continue
        if systemctl.active_state(unit) not in ("inactive", "failed"):
            systemctl.stop(unit)
            changed["stopped"].append(unit)
        if systemctl.is_enabled(unit) in ("enabled", "enabled-runtime"):
            systemctl.disable(unit)
            changed["disabled"].append(unit)
    for unit in mine:
        # static units (no [Install]) cannot be enabled; they are pulled in by another unit
        if systemctl.is_enabled(unit) not in ("enabled", "enabled-runtime", "static", "alias"):
            systemctl.enable(unit)
            changed["enabled"].append(unit)
    if start:
        for unit in mine:
            if unit in hold:
                log.info("%s enabled but not started (held)", unit)
                continue
            if systemctl.active_state(unit) not in ("active", "activating", "reloading"):
                systemctl.start(unit)
                changed["started"].append(unit)
    for action, units in changed.items():
        if units:
            log.info("role %s: %s %s", role, action, ", ".join(units))
    return changed


# -- CLI ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Detect this instance's role. Every source is asked: --role, $AIRFLOW_AGENT_ROLE, "
        "role.override, the role.tag instance tag via IMDS, the same tag via ec2:DescribeTags, "
        "role.groups patterns on the Auto Scaling group name and on the CloudFormation "
        "logical id. The first that names a role decides; any other naming a different role "
        "(or a value that is not a role) is a conflict (exit 3), no answer at all is exit 1; "
        "both errors list every source and what it returned, and change nothing."
    )
    parser.add_argument("--role", choices=ROLES, default=None, help="name the role (a source)")
    parser.add_argument(
        "--apply",
        action="store_true",
        help="record the role, enable+start its units, stop+disable the others'",
    )
    parser.add_argument("--json", action="store_true", help="print the decision as JSON")


def run(args: argparse.Namespace, cfg) -> int:
    from agent.platform.systemd import systemctl_from_config

    role, results = detect_role_sources(cfg, cli_role=args.role)
    changed: Dict[str, List[str]] = {}
    if args.apply:
        from agent.worker.boot_gate import start_gate

        # a worker whose record says it must not run is enabled, not started; refused when
        # the instance is terminating
        with start_gate(cfg, role, "role --apply") as hold:
            changed = apply_role(cfg, role, systemctl_from_config(cfg), hold=hold, results=results)
    if args.json:
        json.dump(
            {"role": role, "sources": [asdict(r) for r in results], "changed": changed},
            sys.stdout,
            indent=1,
            sort_keys=True,
        )
        print()
    else:
        print(role)
    return EXIT_OK
