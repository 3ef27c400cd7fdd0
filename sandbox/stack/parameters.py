"""Parameter values for the sandbox's stack: the example's file, the sandbox's overrides.

- `read_parameters(path)`: a CloudFormation parameters file (`[{ParameterKey, ParameterValue}]`)
  or a plain JSON map.
- `sandbox_overrides()`: `parameters.sandbox.json` beside this module, the sandbox's only
  departures from `cloudformation/parameters.example.json`, each with its reason. A value may
  be `{"from": ...}` (taken from the embedded AWS when the stack is created) or
  `{"generate": "fernet-key"}` (made fresh per launch, never stored in the tree).
- `validate_parameters(specs, given)`: what CloudFormation checks before creating anything
  (undeclared names, no value and no default, AllowedValues, AllowedPattern, Min/MaxValue).
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Union

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PARAMETERS = REPO_ROOT / "cloudformation" / "parameters.example.json"
SANDBOX_PARAMETERS = Path(__file__).with_name("parameters.sandbox.json")


class StackError(ValueError):
    """The template or its parameters are something CloudFormation would refuse."""


def read_parameters(path: Union[str, Path]) -> Dict[str, str]:
    """A parameters file: CloudFormation's `[{ParameterKey, ParameterValue}]` or a plain map."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not k.startswith("_")}
    return {
        item["ParameterKey"]: item["ParameterValue"] for item in data if "ParameterValue" in item
    }


def sandbox_overrides(path: Path = SANDBOX_PARAMETERS) -> Dict[str, Any]:
    """The sandbox-only overrides: {key: value or {"from": how}} (see the file's "_why")."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: v.get("value", v) for k, v in data["overrides"].items()}


def validate_parameters(specs: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
    """Parameter values as CloudFormation takes them, or StackError naming what it refuses."""
    unknown = sorted(set(given) - set(specs))
    out: Dict[str, Any] = {}
    for name in unknown:
        # CloudFormation refuses a parameter the template does not declare
        raise StackError(f"parameter {name} is not declared by the template")
    for name, spec in specs.items():
        if name in given:
            value = given[name]
        elif "Default" in spec:
            value = spec["Default"]
        else:
            raise StackError(f"parameter {name} has no value and no default")
        out[name] = _check(name, spec, value)
    return out


def _check(name: str, spec: Dict[str, Any], value: Any) -> Any:
    ptype = str(spec.get("Type", "String"))
    if isinstance(value, dict):  # {"from": ...}: filled in from the embedded AWS later
        return value
    text = ",".join(value) if isinstance(value, list) else str(value)
    items = (
        [v.strip() for v in text.split(",")]
        if ptype.startswith("List<") or ptype == "CommaDelimitedList"
        else [text]
    )
    for item in items:
        if "AllowedValues" in spec and item not in [str(v) for v in spec["AllowedValues"]]:
            raise StackError(f"parameter {name}: {item!r} is not one of {spec['AllowedValues']}")
        if "AllowedPattern" in spec and not re.fullmatch(spec["AllowedPattern"], item):
            raise StackError(f"parameter {name}: value does not match AllowedPattern")
        if ptype == "Number":
            number = float(item)
            if "MinValue" in spec and number < float(spec["MinValue"]):
                raise StackError(f"parameter {name}: {item} < MinValue {spec['MinValue']}")
            if "MaxValue" in spec and number > float(spec["MaxValue"]):
                raise StackError(f"parameter {name}: {item} > MaxValue {spec['MaxValue']}")
    return items if len(items) > 1 or ptype.startswith("List<") else text


def generated(name: str, value: Any) -> Any:
    """Values the overrides file asks to generate at launch (never stored in the tree)."""
    if isinstance(value, dict) and value.get("generate") == "fernet-key":
        return base64.urlsafe_b64encode(os.urandom(32)).decode()
    return value
