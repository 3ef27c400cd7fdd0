"""What a CloudWatch agent configuration ships, and what it should ship for a role.

The template writes one amazon-cloudwatch-agent JSON configuration per role (InstanceConfig:
/opt/aws/amazon-cloudwatch-agent/etc/airflow-roles/<role>.json). These pure helpers read one
(`shipped`: the journald units, files and log groups it names) and say which units the role's
journals must come from (`expected_units`: the agent's own plan for the role, agent.jobs.role),
so a unit added to a role and not to its logs configuration fails a test, in the fast tier
(from the template) and on the launched stack (from the file cfn-init wrote).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, NamedTuple, Set

from agent.jobs.role import plan_units

ROLE_CONFIG_DIR = "/opt/aws/amazon-cloudwatch-agent/etc/airflow-roles"
AGENT_YAML = "/etc/airflow-agent/agent.yaml"


class Shipped(NamedTuple):
    units: List[str]  # journald units, in file order
    files: List[str]  # file paths, in file order
    groups: Set[str]  # every log group named


def role_config_path(role: str) -> str:
    return f"{ROLE_CONFIG_DIR}/{role}.json"


def shipped(text: str, source: str = "<config>") -> Shipped:
    """The units, files and log groups a CloudWatch agent JSON configuration names.

    Raises ValueError naming `source` for JSON that is not such a configuration (no
    logs.logs_collected, an entry without log_group_name, a journald entry without units)."""
    try:
        doc = json.loads(text)
        collected = doc["logs"]["logs_collected"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{source}: not a CloudWatch agent logs configuration ({exc})") from None
    units: List[str] = []
    files: List[str] = []
    groups: Set[str] = set()
    for kind, entries in _collect_lists(collected, source).items():
        for i, entry in enumerate(entries):
            where = f"{source}: logs_collected.{kind}.collect_list[{i}]"
            if not entry.get("log_group_name"):
                raise ValueError(f"{where} has no log_group_name")
            groups.add(entry["log_group_name"])
            if kind == "journald":
                if not entry.get("units"):
                    raise ValueError(f"{where} has no units")
                units.extend(entry["units"])
            else:
                files.append(entry["file_path"])
    return Shipped(units, files, groups)


def _collect_lists(collected: Dict[str, Any], source: str) -> Dict[str, List[Dict[str, Any]]]:
    unknown = set(collected) - {"journald", "files"}
    if unknown:
        raise ValueError(f"{source}: logs_collected has {sorted(unknown)}, not journald/files")
    return {kind: list(body.get("collect_list", [])) for kind, body in collected.items()}


def journal_unit(unit: str) -> str:
    """The unit whose journal holds what `unit` runs: a timer's service (the template's timers
    trigger the service of the same name), a bare name's .service."""
    if unit.endswith(".timer"):
        return unit[: -len(".timer")] + ".service"
    return unit if "." in unit else unit + ".service"


def expected_units(cfg: Any, role: str) -> List[str]:
    """The journals the role's logs must ship: every unit the agent enables for the role
    (plan_units: its airflow-agent-* units, then its Airflow units), as journal units."""
    mine, _others = plan_units(cfg, role)
    out: List[str] = []
    for unit in mine:
        name = journal_unit(unit)
        if name not in out:
            out.append(name)
    return out
