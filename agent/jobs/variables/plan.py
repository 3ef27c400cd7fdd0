"""Pure core of `airflow-agent variables sync`: parse the secret, plan, verify. No I/O.

The secret is one JSON object: variable name -> value. A value is a string, any other JSON
value (stored as JSON, as `airflow variables import` does), or `{"value": ..., "description":
...}` (unwrapped, as Airflow does). `parse_secret` refuses anything ambiguous with a message
that names the problem and never quotes a value.

Change detection keeps one keyed hash per variable (HMAC-SHA256 with a per-instance key kept
beside the state), never the value: a stolen state document does not let anyone confirm a
guessed value. The hash covers what Airflow stores (the string form and the description), so
`1` and `"1"` are the same variable content, exactly as in Airflow's table.

Verification compares what `airflow variables export` wrote back with what we imported, after
applying the same reconstruction Airflow's export applies (it decodes JSON-looking strings and
wraps values that have a description), so the comparison is exact and value-free in messages.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

# the bridge's digest (standalone, stdlib only): what the agent expects is computed by the very
# function that runs inside the Airflow interpreter
from agent.airflow.bridge_server import digest as bridge_digest

# Airflow's `variable.key` column is String(ID_LEN=250); PostgreSQL/MySQL refuse longer keys
# (SQLite would silently accept them), so refuse them here on every database alike.
MAX_KEY_LEN = 250
ENV_VAR_PREFIX = "AIRFLOW_VAR_"
# environment variables that configure a custom secrets backend, which Airflow reads before
# the metadata database (the _CMD/_SECRET forms are Airflow's indirect config sources)
BACKEND_ENV_VARS = (
    "AIRFLOW__SECRETS__BACKEND",
    "AIRFLOW__SECRETS__BACKEND_CMD",
    "AIRFLOW__SECRETS__BACKEND_SECRET",
)
_WRAPPER_KEYS = {"value", "description"}


class SecretShapeError(ValueError):
    """The secret is not a usable variables object; the message names the problem, no value."""


def _type_word(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null"
    return type(value).__name__


def _show_key(key: str) -> str:
    """A key for a message: keys are names, not secrets, but keep messages one short line."""
    shown = key if len(key) <= 60 else key[:57] + "..."
    return json.dumps(shown)


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # json.loads would silently keep the last one; which one the operator meant is unknown
            raise SecretShapeError(f"duplicate key {_show_key(k)}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise SecretShapeError(f"not valid JSON: {name} is not a JSON value")


def parse_secret(text: Optional[str]) -> Dict[str, Any]:
    """The variables in the secret text, or SecretShapeError naming what is wrong."""
    if text is None:
        raise SecretShapeError("the secret has no SecretString (a binary secret is not supported)")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        # the decoder's message and position never include the document's text
        raise SecretShapeError(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise SecretShapeError("not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise SecretShapeError(
            f"must be a JSON object of variable names to values, got {_type_word(data)}"
        )
    for key, value in data.items():
        check_key(key)
        check_value(key, value)
    return data


def check_key(key: Any) -> None:
    if not isinstance(key, str):  # JSON keys are strings; a caller might pass a dict of its own
        raise SecretShapeError(f"key {key!r} is not a string")
    if not key.strip():
        raise SecretShapeError("has an empty key" if not key else "has a blank key")
    if len(key) > MAX_KEY_LEN:
        raise SecretShapeError(
            f"key {_show_key(key)} is {len(key)} characters; Airflow allows {MAX_KEY_LEN}"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise SecretShapeError(f"key {_show_key(key)} contains a control character")
    if not _encodable(key):
        raise SecretShapeError("a key is not valid Unicode (lone surrogate escape)")


def check_value(key: str, value: Any) -> None:
    if isinstance(value, dict) and "value" in value:
        extra = sorted(set(value) - _WRAPPER_KEYS)
        if extra:
            # Airflow would unwrap "value" and silently drop these
            raise SecretShapeError(
                f'key {_show_key(key)}: an object with "value" may only also have '
                f'"description", found {", ".join(_show_key(e) for e in extra)}'
            )
        desc = value.get("description")
        if desc is not None and not isinstance(desc, str):
            raise SecretShapeError(
                f'key {_show_key(key)}: "description" must be a string or null, '
                f"got {_type_word(desc)}"
            )
    if not _encodable(value):
        raise SecretShapeError(
            f"key {_show_key(key)}: the value is not valid Unicode (lone surrogate escape)"
        )


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unwrap(raw: Any) -> Tuple[Any, Optional[str]]:
    """(value, description) exactly as `airflow variables import` unwraps an entry."""
    if isinstance(raw, dict) and "value" in raw:
        return raw["value"], raw.get("description")
    return raw, None


def stored_form(value: Any) -> str:
    """The string Airflow stores: strings as they are, anything else as JSON (Variable.set)."""
    return value if isinstance(value, str) else json.dumps(value, indent=2)


def entry_digest(digest_key: bytes, raw: Any) -> str:
    value, description = unwrap(raw)
    material = json.dumps([stored_form(value), description], ensure_ascii=True)
    return hmac.new(digest_key, material.encode("ascii"), hashlib.sha256).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True)


def expected_export(raw: Any) -> str:
    """Canonical JSON of what `airflow variables export` writes for this entry once stored."""
    value, description = unwrap(raw)
    stored = stored_form(value)
    # mirror airflow.cli.commands.variable_command.variables_export
    try:
        val = json.JSONDecoder().decode(stored)
    except ValueError:
        val = stored
    if isinstance(val, str):
        val = stored
    if description or (isinstance(val, dict) and "value" in val):
        return _canonical({"value": val, "description": description})
    return _canonical(val)


@dataclass
class VariablesPlan:
    new: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    # managed by us before (in the state), gone from the secret now
    removed: List[str] = field(default_factory=list)
    digests: Dict[str, str] = field(default_factory=dict)

    @property
    def to_import(self) -> List[str]:
        return sorted(self.new + self.changed)

    def summary(self) -> str:
        return (
            f"{len(self.new)} new, {len(self.changed)} changed, {len(self.unchanged)} unchanged, "
            f"{len(self.removed)} removed"
        )


def plan_variables(
    secret: Mapping[str, Any], hashes: Mapping[str, str], digest_key: bytes
) -> VariablesPlan:
    """Which keys to import (new/changed), which are unchanged, which left the secret."""
    plan = VariablesPlan()
    for key in sorted(secret):
        digest = entry_digest(digest_key, secret[key])
        plan.digests[key] = digest
        old = hashes.get(key)
        if old is None:
            plan.new.append(key)
        elif not hmac.compare_digest(old, digest):
            plan.changed.append(key)
        else:
            plan.unchanged.append(key)
    plan.removed = sorted(k for k in hashes if k not in secret)
    return plan


def import_document(secret: Mapping[str, Any], keys: Iterable[str]) -> bytes:
    """The file `airflow variables import` reads: only `keys`, entries exactly as in the secret."""
    return json.dumps({k: secret[k] for k in keys}, ensure_ascii=True).encode("ascii")


def verify_import(
    secret: Mapping[str, Any], imported: Iterable[str], exported: Mapping[str, Any]
) -> Tuple[List[str], List[str]]:
    """(landed, failed) among `imported`, judged by what Airflow exported afterwards."""
    landed, failed = [], []
    for key in imported:
        if key in exported and _canonical(exported[key]) == expected_export(secret[key]):
            landed.append(key)
        else:
            failed.append(key)
    return landed, failed


def verify_deleted(
    deleted: Iterable[str], exported: Mapping[str, Any]
) -> Tuple[List[str], List[str]]:
    """(gone, still_there) among the keys we asked Airflow to delete."""
    gone = [k for k in deleted if k not in exported]
    return gone, [k for k in deleted if k in exported]


def shadowed_by_env(keys: Iterable[str], env: Mapping[str, str]) -> List[str]:
    """Keys an AIRFLOW_VAR_<KEY> in the units' environment overrides (Airflow upper-cases)."""
    return sorted(k for k in keys if ENV_VAR_PREFIX + k.upper() in env)


# the backend kwargs that, set to null, keep a provider's secrets backend from reading
# Variables (the Amazon backends' variables_prefix, HashiCorp Vault's variables_path)
VARIABLES_OFF_KWARGS = ("variables_prefix", "variables_path")


def secrets_backend(env: Mapping[str, str]) -> Optional[str]:
    """The environment variable that configures a custom secrets backend that reads Variables,
    if one is set. A backend whose plain AIRFLOW__SECRETS__BACKEND_KWARGS sets its variables
    prefix to null (the template's: connections and Variables stay in the database) reads no
    Variable, so it shadows none; kwargs given through _CMD or _SECRET are not read here, so
    such a backend counts as one that may."""
    for name in BACKEND_ENV_VARS:
        if env.get(name, "").strip():
            return None if _variables_off(env.get("AIRFLOW__SECRETS__BACKEND_KWARGS", "")) else name
    return None


def _variables_off(kwargs_text: str) -> bool:
    try:
        kwargs = json.loads(kwargs_text) if kwargs_text.strip() else {}
    except ValueError:
        return False
    return isinstance(kwargs, dict) and any(
        key in kwargs and kwargs[key] is None for key in VARIABLES_OFF_KWARGS
    )


def name_list(keys: List[str], limit: int = 20) -> str:
    """Keys for one log line: all of them up to `limit`, then a count."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ---------------------------------------------------------------- variables.method: api


def bridge_item(raw: Any) -> Dict[str, Any]:
    """What the bridge hands to Variable.set: the stored string form and the description,
    exactly what `airflow variables import` would store for this entry."""
    value, description = unwrap(raw)
    return {"value": stored_form(value), "description": description}


def verify_digests(
    secret: Mapping[str, Any],
    imported: Iterable[str],
    digests: Mapping[str, Optional[str]],
    hmac_key: bytes,
) -> Tuple[List[str], List[str]]:
    """(landed, failed) among `imported`: the bridge's HMAC of what Airflow stores for each key
    against the HMAC of what we meant to store (same function, same per-bridge key)."""
    landed, failed = [], []
    for key in imported:
        item = bridge_item(secret[key])
        want = bridge_digest(hmac_key, item["value"], item["description"])
        got = digests.get(key)
        if got is not None and hmac.compare_digest(got, want):
            landed.append(key)
        else:
            failed.append(key)
    return landed, failed


def verify_absent(
    deleted: Iterable[str], digests: Mapping[str, Optional[str]]
) -> Tuple[List[str], List[str]]:
    """(gone, still_there) among deleted keys: the bridge reports an absent key as null."""
    deleted = list(deleted)
    return [k for k in deleted if digests.get(k) is None], [
        k for k in deleted if digests.get(k) is not None
    ]
