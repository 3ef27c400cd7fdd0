"""`airflow-agent status [--json]`: what the agent knows and what the units are doing.

Reads only local things: the state dir (every document in agent.state's registry, shown as
it is on disk, so a field this agent does not know still shows), the watched files (for the
current content hash) and systemd. It never calls AWS or IMDS, and when systemd cannot be
reached it says so instead of failing, so it works on a half-broken instance, which is when
an operator runs it. `--json` prints one stable object:

    {"role": str|null, "role_recorded_at": float|null,
     "env_file": {"path": str, "sha256": str|null (plain sha256 of the file now; null when
                  missing), "synced_sha256": str|null (what the last env sync wrote)},
     "config": {"files": [...], "current_hash": str, "applied_hash": str|null,
                "in_sync": bool, "applied_at": float|null, "last_result": str|null,
                "last_error": str|null,
                "held": {unit: main_pid}}  (confapply's hash over every watched file; held:
                the worker units it left running on an older config because the worker's
                record held them, still that process; it restarts them once the record
                lets them run)
     "<status_key>": {...the document...}   for every registered document with a status key
                  (env, variables, variables_watch, drain, lifecycle, task_credentials,
                  deploy, metrics, target_group, worker),
     "worker_tasks": null | {"unit", "source": "cgroup"|"main-pid"|null, "error", "main_pid",
                  "processes", "pool_slots", "running": int|null (null: not countable),
                  "tasks": [{"pid", "kind": "task"|"orphan", "age": s, "task_instance"}]}
                  (the worker unit's running task processes, when it is one of the units;
                  agent.worker.processes: never a process's command line)
     "systemd": {"reachable": bool, "error": str|null},
     "units": {unit: {"active": str, "sub": str, "main_pid": int, "enabled": str,
                      "result": str, "restarts": int}}}

Secrets never print, whatever a document holds (defence in depth: the agent writes none):
a field named like a secret or a task's inputs (`token`, `password`, `secret`, `args`,
`kwargs`, ... see SECRET_KEYS) shows as "<redacted>", and a string holding a JWT (the shape of
Airflow's execution-API tokens) has the JWT replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from agent.config import ROLES
from agent.errors import EXIT_OK
from agent.jobs.confapply.state import ConfapplyDoc, current_hash, watched_paths
from agent.jobs.env_sync.state import EnvDoc
from agent.jobs.role_state import RoleDoc
from agent.state import VERSION_KEY, Registered, StateStore, registered, registration
from agent.worker.processes import WorkerProcesses

# field names whose values are never shown (compared lower-case, "-" as "_")
SECRET_KEYS = frozenset(
    {
        "token",
        "access_token",
        "session_token",
        "id_token",
        "refresh_token",
        "password",
        "passwd",
        "secret",
        "secret_access_key",
        "secretaccesskey",
        "sessiontoken",
        "authorization",
        "api_key",
        "private_key",
        "args",
        "kwargs",
        "argsrepr",
        "kwargsrepr",
    }
)
REDACTED = "<redacted>"
# header.payload.signature, base64url; a JWT header always starts {" -> "eyJ"
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with secret-named fields and JWTs hidden."""
    if isinstance(value, dict):
        return {
            k: REDACTED
            if str(k).lower().replace("-", "_") in SECRET_KEYS and v not in (None, "", [], {})
            else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _JWT.sub("<redacted token>", value)
    return value


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _units_of(cfg, role: Optional[str]) -> List[str]:
    roles = [role] if role else list(ROLES)
    out: List[str] = []
    for r in roles:
        for u in cfg.agent_units_for(r) + cfg.units_for(r):
            if u not in out:
                out.append(u)
    return out


def _int(text: Optional[str]) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def unit_states(systemctl, units: List[str]) -> tuple[Dict[str, Any], Optional[str]]:
    """({unit: state}, error): error says why systemd could not be asked."""
    unreachable = systemctl.manager_unreachable_reason()
    if unreachable:
        return {}, unreachable
    states = {}
    for u, s in systemctl.unit_states(units).items():
        states[u] = {
            "active": s.get("ActiveState", "unknown"),
            "sub": s.get("SubState", ""),
            "main_pid": _int(s.get("MainPID")),
            "enabled": s.get("UnitFileState", "") or "-",
            "result": s.get("Result", ""),
            "restarts": _int(s.get("NRestarts")),
        }
    return states, None


def _load(store: StateStore, name: str) -> Dict[str, Any]:
    try:
        return store.load_raw(name)
    except OSError as exc:  # e.g. run as a non-root operator: the state dir is root 0700
        return {"unreadable": f"{exc.strerror}: {exc.filename}"}


def _shown_documents() -> List[Registered]:
    return [r for r in registered() if r.status_key]


def collect(cfg, systemctl) -> Dict[str, Any]:
    store = StateStore(cfg.state_dir)
    role_doc = _load(store, registration(RoleDoc).name)
    role = role_doc.get("role") if role_doc.get("role") in ROLES else None
    conf = _load(store, registration(ConfapplyDoc).name)
    try:
        now_hash: Optional[str] = current_hash(cfg)
        hash_error = None
    except OSError as exc:  # unreadable file (permissions): say so
        now_hash, hash_error = None, f"{exc.strerror}: {exc.filename}"
    units, sd_error = unit_states(systemctl, _units_of(cfg, role))
    out: Dict[str, Any] = {
        "role": role,
        "role_recorded_at": role_doc.get("decided_at"),
        "env_file": _env_file(cfg, _load(store, registration(EnvDoc).name).get("file_sha256")),
        "config": {
            "files": watched_paths(cfg),
            "current_hash": now_hash,
            "hash_error": hash_error,
            "applied_hash": conf.get("applied_hash"),
            "in_sync": now_hash is not None and now_hash == conf.get("applied_hash"),
            "applied_at": conf.get("applied_at"),
            "last_result": conf.get("last_result"),
            "last_error": conf.get("last_error"),
            "held": _still_held(conf.get("held_pids") or {}, units, sd_error),
        },
        "systemd": {"reachable": sd_error is None, "error": sd_error},
        "units": units,
        "worker_tasks": _worker_tasks(cfg, systemctl, units),
    }
    for doc in _shown_documents():
        out[doc.status_key] = _load(store, doc.name)  # type: ignore[index]
    return redact(out)


def _still_held(held: Dict[str, int], units: Dict[str, Any], sd_error: Optional[str]) -> Dict:
    """The held units whose process is still the one confapply left running (a new MainPID
    started with the file as it is now); all of them when systemd cannot say."""
    if sd_error is not None:
        return dict(held)
    return {u: pid for u, pid in held.items() if (units.get(u) or {}).get("main_pid") == pid}


def _worker_tasks(cfg, systemctl, units: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The worker unit's task processes, read live (None: no worker unit here, or systemd
    unreachable)."""
    unit = cfg.drain.worker_unit
    if unit not in units:
        return None
    return WorkerProcesses(systemctl, unit).snapshot().to_dict()


def worker_tasks_line(w: Dict[str, Any]) -> str:
    if w["running"] is None:
        return f"not countable ({w['error'] or 'no prefork pool slots'})"
    line = f"{w['running']} running"
    tasks = [
        f"pid {t['pid']} {t['age']:.0f}s"
        + (f" ti {t['task_instance']}" if t["task_instance"] else f" {t['kind']}")
        for t in w["tasks"]
    ]
    return line + (": " + ", ".join(tasks) if tasks else "") + f" ({w['source']})"


def _env_file(cfg, synced: Optional[str]) -> Dict[str, Any]:
    try:
        with open(cfg.env.file, "rb") as f:
            now: Optional[str] = hashlib.sha256(f.read()).hexdigest()
        error = None
    except OSError as exc:
        now, error = None, exc.strerror
    return {"path": cfg.env.file, "sha256": now, "error": error, "synced_sha256": synced}


def _env_file_line(e: Dict[str, Any]) -> str:
    if e["sha256"] is None:
        return f"{e['path']}: {e['error']}"
    line = f"{e['path']} sha256 {e['sha256'][:12]}"
    if e["synced_sha256"] and e["synced_sha256"] != e["sha256"]:
        return line + f" (last env sync wrote {e['synced_sha256'][:12]}: changed since)"
    return line + (" (as the last env sync wrote it)" if e["synced_sha256"] else "")


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# epoch-second fields shown as times (besides every `*_at` and `*_since`): the drain's
# `started` and `deadline` among them, which read as raw floats before
TIME_KEYS = ("last_sync", "last_failure", "last_poll", "last_attempt", "started", "deadline")


def _doc_line(doc: Dict[str, Any], keys: Tuple[str, ...] = ()) -> str:
    # a field never set (null) says nothing in the human view; --json has it
    doc = {k: v for k, v in doc.items() if k != VERSION_KEY and v is not None}
    if not doc:
        return "no record"
    parts = []
    if keys and not doc.get("unreadable"):
        doc = {k: doc[k] for k in keys if doc.get(k) not in (None, "", [], {})}
        if not doc:
            return "nothing recorded yet (see --json)"
    for k in list(doc) if keys else sorted(doc):
        v = doc[k]
        is_time = isinstance(v, (int, float)) and not isinstance(v, bool)
        if is_time and (k in TIME_KEYS or k.endswith(("_at", "_since"))):
            v = _when(v)
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True)
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _document_line(entry: Registered, doc: Dict[str, Any]) -> str:
    line = _doc_line(doc, entry.shown)
    if entry.detail is not None and isinstance(doc, dict) and not doc.get("unreadable"):
        line += entry.detail(doc)
    return line


def _hash_line(c: Dict[str, Any]) -> str:
    if not c["current_hash"]:
        return f"unreadable: {c['hash_error']}"
    line = f"{c['current_hash'][:12]} now, {str(c['applied_hash'])[:12]} applied"
    line += " (in sync" if c["in_sync"] else " (NOT in sync"
    if c.get("held"):
        line += (
            f"; {', '.join(sorted(c['held']))} still on an older config: the worker's record "
            "held it; restarted once it may run"
        )
    if c["last_result"] == "failed":
        line += f", last apply failed: {c['last_error']}"
    return line + ")"


def render(s: Dict[str, Any]) -> str:
    c = s["config"]
    rows = [
        ("role", s["role"] or "not recorded (run `airflow-agent role --apply`)"),
        ("env file", _env_file_line(s["env_file"])),
        ("config hash", _hash_line(c)),
    ]
    for entry in _shown_documents():
        doc = s.get(entry.status_key, {})  # type: ignore[arg-type]
        if entry.optional and not doc:
            continue
        rows.append((entry.title, _document_line(entry, doc)))
    if s.get("worker_tasks"):
        rows.append(("worker tasks", worker_tasks_line(s["worker_tasks"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if not s["systemd"]["reachable"]:
        lines.append(f"{'units'.ljust(width)}  systemd unreachable: {s['systemd']['error']}")
        return "\n".join(lines)
    lines.append("")
    uw = max([len(u) for u in s["units"]] + [4])
    lines.append(
        f"{'UNIT'.ljust(uw)}  {'ACTIVE':<10} {'SUB':<10} {'PID':>7}  {'ENABLED':<10} RESTARTS"
    )
    for u, st in s["units"].items():
        lines.append(
            f"{u.ljust(uw)}  {st['active']:<10} {st['sub']:<10} {st['main_pid']:>7}  "
            f"{st['enabled']:<10} {st['restarts']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, cfg) -> int:
    from agent.platform.systemd import Systemctl

    s = collect(cfg, Systemctl(cfg.systemctl, timeout=15))
    if args.json:
        json.dump(s, sys.stdout, indent=1, sort_keys=True)
        print()
    else:
        print(render(s))
    return EXIT_OK
