"""How a planned variables change reaches Airflow, and how it is verified: one function per
`variables.method`.

- `apply_api`: through the Airflow bridge co-process (agent/airflow/bridge_client.py):
  `Variable.set`/`delete` per key, then an HMAC of what each key holds, read back in a new
  session; values travel only on the co-process's pipe.
- `apply_cli`: `airflow variables import -a overwrite` of a 0600 temp file, `airflow variables
  delete` per removed key, then `airflow variables export` (a 0600 temp file too): the CLI
  reports per-key failures with exit status 0, so only the export tells what landed.

Both return what landed and what did not; the caller (agent.jobs.variables.sync) records it.
Airflow's own output is never logged: its error lines can quote values. Only counts and
exception class names are picked out of it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from agent.airflow.bridge_client import BridgeProvider
from agent.airflow.execution import (
    IMPORT_COUNTS,
    AirflowCli,
    TempDir,
    exception_names,
    read_fd,
)
from agent.errors import AgentError
from agent.jobs.variables.plan import (
    VariablesPlan,
    bridge_item,
    import_document,
    name_list,
    verify_absent,
    verify_deleted,
    verify_digests,
    verify_import,
)
from agent.platform.process import RunAs

log = logging.getLogger(__name__)


@dataclass
class Applied:
    """What one apply did: keys that landed / did not, removed keys gone / still there."""

    landed: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    gone: List[str] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)
    calls: int = 0  # Airflow CLI processes or bridge requests


def apply_api(
    bridges: BridgeProvider,
    env: Dict[str, str],
    run_as: Optional[RunAs],
    tmp: TempDir,
    secret: Dict[str, Any],
    plan: VariablesPlan,
    to_delete: List[str],
    tick: Callable[[], None] = lambda: None,
) -> Applied:
    """Set, delete, then digests read back in new sessions, through the bridge."""
    to_import = plan.to_import
    if not to_import and not to_delete:
        return Applied()
    bridge = bridges.acquire(env, run_as, tmp.path)
    before = bridge.requests
    broken = True
    try:
        if to_import:
            refused = bridge.set({k: bridge_item(secret[k]) for k in to_import}, tick)
            log.log(
                logging.WARNING if refused else logging.INFO,
                "airflow bridge set %d key(s): %d refused by Airflow%s",
                len(to_import),
                len(refused),
                refused_suffix(refused),
            )
        if to_delete:
            refused = bridge.delete(to_delete, tick)
            if refused:
                log.warning(
                    "airflow bridge delete of %d key(s): %d refused%s",
                    len(to_delete),
                    len(refused),
                    refused_suffix(refused),
                )
        digests = bridge.digests(sorted(set(to_import) | set(to_delete)), tick)
        broken = False
    finally:
        bridges.release(bridge, broken)
    landed, failed = verify_digests(secret, to_import, digests, bridge.hmac_key)
    gone, kept = verify_absent(to_delete, digests)
    return Applied(landed, failed, gone, kept, bridge.requests - before)


def apply_cli(
    cli: AirflowCli,
    tmp: TempDir,
    secret: Dict[str, Any],
    plan: VariablesPlan,
    to_delete: List[str],
) -> Applied:
    """Import, delete, read back through the Airflow CLI."""
    to_import = plan.to_import
    if not to_import and not to_delete:
        return Applied()
    if to_import:
        name, fd = tmp.create("import", import_document(secret, to_import))
        os.close(fd)
        try:
            rc, out = cli.run("variables", "import", name, "-a", "overwrite")
        finally:
            tmp.remove(name)
        m = IMPORT_COUNTS.search(out)
        clean = rc == 0 and m is not None and m.group(1) == m.group(2) == str(len(to_import))
        log.log(
            logging.INFO if clean else logging.WARNING,
            "airflow variables import of %d key(s): exit %d, %s%s",
            len(to_import),
            rc,
            f"{m.group(1)} of {m.group(2)} reported updated" if m else "no summary",
            exception_suffix(out),
        )
    for key in to_delete:
        # "--": a key may start with "-"; keys are names, not secrets, so argv is fine
        rc, out = cli.run("variables", "delete", "--", key)
        if rc != 0:
            log.warning("airflow variables delete %s: exit %d%s", key, rc, exception_suffix(out))
    exported = export(cli, tmp)
    landed, failed = verify_import(secret, to_import, exported)
    gone, kept = verify_deleted(to_delete, exported)
    return Applied(landed, failed, gone, kept, cli.calls)


def export(cli: AirflowCli, tmp: TempDir) -> Dict[str, Any]:
    """`airflow variables export` into a 0600 temp file read through a descriptor opened
    before the file was handed to the Airflow user."""
    name, fd = tmp.create("export")
    try:
        rc, out = cli.run("variables", "export", name)
        body = read_fd(fd)
    finally:
        os.close(fd)
        tmp.remove(name)
    if rc != 0:
        raise AgentError(
            f"cannot verify: airflow variables export exited {rc}"
            f"{exception_suffix(out)}; nothing recorded as synced"
        )
    try:
        exported = json.loads(body)
    except ValueError:
        exported = None
    if not isinstance(exported, dict):
        raise AgentError(
            "cannot verify: airflow variables export wrote no JSON object; "
            "nothing recorded as synced"
        )
    return exported


def refused_suffix(refused: Dict[str, str]) -> str:
    # key names and exception class names only; never the exception's message
    if not refused:
        return ""
    shown = [f"{k} ({refused[k]})" for k in sorted(refused)]
    return ": " + name_list(shown)


def exception_suffix(output: str) -> str:
    names = exception_names(output)
    return f" ({', '.join(names)})" if names else ""
