"""`airflow-agent variables sync`: one Secrets Manager secret -> Airflow Variables.

The I/O shell around `agent.jobs.variables.plan`. One run:

1. takes the lock `state_dir/variables.lock` and empties the private temp dir
   `state_dir/variables-tmp/` (a run killed with SIGKILL leaves its temp file there);
2. reads the secret; when its VersionId is the one last synced completely, stops: no Airflow
   call at all;
3. refuses a secret that is not a JSON object of usable keys (nothing imported, state kept);
4. writes only new and changed keys, deletes keys that left the secret only with `--prune`,
   reads back and fails naming every key that did not land, by the method `variables.method`
   names (api through the Airflow bridge, or cli; agent.jobs.variables.apply);
5. records per-key keyed hashes (never values) of what landed, so the next run retries the rest.

State (agent.jobs.variables.state, root 0600): `variables.json` (VariablesDoc) is the summary
`status` shows; `variables-hashes.json` (VariablesHashesDoc) holds the per-key hashes;
`variables.key` the HMAC key.

The command line is agent.jobs.variables.cli; `variables watch` (agent/jobs/variables/watch.py)
runs the same sync in a loop with a warm bridge.

The Airflow CLI (or the bridge) runs with the environment of the units' EnvironmentFile
(`variables.env_file`, default `env.file`), never with values on its argv, as `variables.user`
(default `airflow`). agent.platform.process switches with Popen's own
user/group/extra_groups (setgroups+setregid+setreuid in the child before exec; no
setpriv/runuser binary, nothing added to argv). Because the state dir is root 0700, the child
is started with its working directory already inside the temp dir (chdir happens before the
uid switch) and names its files relatively; the temp files are chowned to that user, and we
read the export through a descriptor opened before the chown. That needs
CAP_CHOWN besides CAP_SETUID/CAP_SETGID, and nothing else (no CAP_DAC_OVERRIDE).
"""

from __future__ import annotations

import json
import logging
import secrets as pysecrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from agent.airflow.bridge_client import BridgeProvider, default_python
from agent.airflow.execution import (
    AirflowCli,
    TempDir,
    resolve_run_as,
)
from agent.airflow.units_env import airflow_aws_env
from agent.errors import AgentError, RefusedError
from agent.jobs.variables.airflow_env import airflow_env, warn_shadowed
from agent.jobs.variables.apply import Applied, apply_api, apply_cli
from agent.jobs.variables.plan import (
    SecretShapeError,
    VariablesPlan,
    name_list,
    parse_secret,
    plan_variables,
    unwrap,
)
from agent.jobs.variables.state import VariablesDoc, VariablesHashesDoc
from agent.logs import register_secrets
from agent.platform.aws import AWS_ERRORS, describe_error
from agent.platform.fsutil import FileLock, atomic_write
from agent.platform.process import RunAs
from agent.state import StateStore

log = logging.getLogger(__name__)

LOCK_NAME = "variables.lock"
DIGEST_KEY_NAME = "variables.key"


class _Lock(FileLock):
    def __init__(self, path: Path, timeout: float):
        super().__init__(path)
        self.timeout = timeout

    def __enter__(self) -> _Lock:
        if not self.acquire(time.monotonic() + self.timeout):
            raise AgentError(
                f"another variables sync holds {self.path} for more than {self.timeout:g} s"
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------- the sync


@dataclass
class SyncResult:
    plan: Optional[VariablesPlan]
    version_id: str
    skipped: bool = False
    imported: int = 0
    deleted: int = 0
    airflow_calls: int = 0


class VariablesSync:
    def __init__(
        self,
        cfg,
        secretsmanager: Any,
        state: Optional[StateStore] = None,
        bridges: Optional[BridgeProvider] = None,
        tick: Callable[[], None] = lambda: None,
    ):
        self.cfg = cfg
        self.sm = secretsmanager
        self.state = state or StateStore(cfg.state_dir)
        self.vcfg = cfg.variables
        self.env_file = Path(self.vcfg.env_file or cfg.env.file)
        # method api: where the Airflow co-process comes from (one per run, or a warm one)
        self.bridges = bridges or bridge_provider(cfg, warm=False)
        # called between chunks of Airflow work (the watch daemon pets its watchdog there)
        self.tick = tick
        # the watch daemon polls often: an unchanged secret is not worth a log line there
        self.unchanged_level = logging.INFO

    def warm_up(self) -> Any:
        """method api: the co-process the next run will use, started now if there is none (or
        the old one died, or the env file changed). None for method cli."""
        if self.vcfg.method != "api":
            return None
        run_as = resolve_run_as(self.vcfg.user, self.cfg.source)
        self.state.ensure()
        tmp = TempDir(self.state.dir, run_as)
        tmp.path.mkdir(mode=0o711 if run_as else 0o700, exist_ok=True)
        return self.bridges.acquire(self._airflow_env(run_as), run_as, tmp.path)

    # -- inputs

    def _digest_key(self, create: bool) -> Optional[bytes]:
        path = self.state.dir / DIGEST_KEY_NAME
        try:
            key = path.read_bytes()
            if len(key) >= 32:
                return key
        except FileNotFoundError:
            pass
        if not create:
            return None
        key = pysecrets.token_bytes(32)
        atomic_write(path, key, mode=0o600)
        return key

    def _fetch(self) -> Tuple[str, Optional[str]]:
        try:
            resp = self.sm.get_secret_value(SecretId=self.vcfg.secret_id)
        except AWS_ERRORS as exc:
            what = f"Secrets Manager GetSecretValue {self.vcfg.secret_id}"
            raise AgentError(f"{what} failed: {describe_error(exc)}") from None
        return resp.get("VersionId", ""), resp.get("SecretString")

    def _airflow_env(self, run_as: Optional[RunAs]) -> Dict[str, str]:
        env = airflow_env(self.env_file, run_as)
        # Airflow (its secrets backend, remote logs) acts as the units do: the task role's
        # credentials, never the instance role's; set after the file so it cannot override them
        env.update(airflow_aws_env(self.cfg))
        return env

    # -- the run

    def run(
        self, dry_run: bool = False, prune: bool = False, diff_out=None, full: bool = False
    ) -> SyncResult:
        self.state.ensure()
        run_as = resolve_run_as(self.vcfg.user, self.cfg.source)
        tmp = TempDir(self.state.dir, run_as)
        with _Lock(self.state.dir / LOCK_NAME, self.vcfg.timeout):
            stale = tmp.prepare()
            if stale:
                log.warning(
                    "removed %d temp file(s) a killed variables sync left in %s", stale, tmp.path
                )
            return self._run_locked(tmp, run_as, dry_run, prune, diff_out, full)

    def _run_locked(
        self,
        tmp: TempDir,
        run_as: Optional[RunAs],
        dry_run: bool,
        prune: bool,
        diff_out,
        full: bool = False,
    ) -> SyncResult:
        doc = self.state.load_doc(VariablesDoc) or VariablesDoc()
        version_id, text = self._fetch()
        sid = self.vcfg.secret_id
        digest_key = self._digest_key(create=False)
        same_version = (
            doc.secret_id == sid and doc.version_id == version_id and digest_key is not None
        )
        if same_version and not (prune and doc.not_pruned) and not full:
            if doc.not_pruned:
                log.warning(
                    "%d variable(s) left the secret but stay in Airflow (--prune deletes them): %s",
                    len(doc.not_pruned),
                    name_list(doc.not_pruned),
                )
            log.log(
                self.unchanged_level,
                "secret %s version %s already synced at %s; no Airflow call",
                sid,
                version_id,
                _iso(doc.synced_at),
            )
            if not dry_run:
                self.state.update_doc(
                    VariablesDoc, last_run_at=time.time(), last_result="unchanged", last_error=None
                )
            return SyncResult(None, version_id, skipped=True)

        try:
            secret = parse_secret(text)
        except SecretShapeError as exc:
            raise RefusedError(
                f"secret {sid} version {version_id} refused: {exc}; nothing imported"
            ) from None
        register_secrets(_secret_strings(secret))

        # the hashes stand for what is in Airflow, whichever secret put it there
        recorded = self.state.load_doc(VariablesHashesDoc)
        hashes = dict(recorded.hashes) if recorded is not None else {}
        if full:
            # every key in the secret counts as changed; removed keys stay known for --prune
            hashes = {k: "" for k in hashes}
        if digest_key is None:
            if hashes:
                log.warning(
                    "the hash key %s is missing: every variable is imported again",
                    self.state.dir / DIGEST_KEY_NAME,
                )
            hashes = {}
            digest_key = self._digest_key(create=not dry_run) or b"dry run: no key yet"
        plan = plan_variables(secret, hashes, digest_key)
        if prune and not secret and plan.removed:
            raise RefusedError(
                f"secret {sid} version {version_id} is empty; refusing to prune all "
                f"{len(plan.removed)} variables it managed"
            )
        log.info(
            "secret %s version %s: %d variables: %s", sid, version_id, len(secret), plan.summary()
        )
        if diff_out is not None:
            print_diff(plan, diff_out)
        env = self._airflow_env(run_as)
        warn_shadowed(secret, env, self.env_file)
        if plan.removed and not prune:
            log.warning(
                "%d variable(s) left the secret but stay in Airflow (--prune deletes them): %s",
                len(plan.removed),
                name_list(plan.removed),
            )
        if dry_run:
            log.info(
                "dry run: would import %d and delete %d variable(s); nothing done",
                len(plan.to_import),
                len(plan.removed) if prune else 0,
            )
            return SyncResult(plan, version_id)

        to_delete = plan.removed if prune else []
        applied = self._apply(env, run_as, tmp, secret, plan, to_delete)
        landed, failed, gone, kept, calls = (
            applied.landed,
            applied.failed,
            applied.gone,
            applied.kept,
            applied.calls,
        )

        # hashes of what is known to be in Airflow now; a failed key has none, so it is retried
        new_hashes = {k: hashes[k] for k in plan.unchanged}
        new_hashes.update({k: plan.digests[k] for k in landed})
        not_pruned = [k for k in plan.removed if k not in gone]
        new_hashes.update({k: hashes[k] for k in not_pruned})
        counts = {
            "variables": len(secret),
            "imported": len(landed),
            "deleted": len(gone),
            "unchanged": len(plan.unchanged),
            "not_pruned": len(not_pruned),
            "failed": len(failed) + len(kept),
        }
        now = time.time()
        # hashes first: a crash before the summary only makes the next run re-plan (and find
        # the keys unchanged), never skip a key
        self.state.save_doc(VariablesHashesDoc(new_hashes))
        update: Dict[str, Any] = dict(
            secret_id=sid,
            not_pruned=not_pruned,
            last_run_at=now,
            last_counts=counts,
        )
        if failed or kept:
            problems = []
            if failed:
                problems.append(
                    f"{len(failed)} variable(s) did not land in Airflow: {name_list(failed)}"
                )
            if kept:
                problems.append(
                    f"{len(kept)} variable(s) are still in Airflow after delete: {name_list(kept)}"
                )
            reason = "; ".join(problems) + " (the next run retries them)"
            # version_id stays the last complete one, so the next run does not stop early
            update.update(last_result="failed", last_error=reason)
            self.state.update_doc(VariablesDoc, **update)
            raise AgentError(f"variables sync of {sid} version {version_id}: {reason}")
        update.update(
            version_id=version_id, synced_at=now, counts=counts, last_result="ok", last_error=None
        )
        self.state.update_doc(VariablesDoc, **update)
        log.info(
            "secret %s version %s synced: %d imported, %d deleted, %d unchanged, verified "
            "(%d Airflow call(s))",
            sid,
            version_id,
            len(landed),
            len(gone),
            len(plan.unchanged),
            calls,
        )
        return SyncResult(
            plan, version_id, imported=len(landed), deleted=len(gone), airflow_calls=calls
        )

    def _apply(
        self,
        env: Dict[str, str],
        run_as: Optional[RunAs],
        tmp: TempDir,
        secret: Dict[str, Any],
        plan: VariablesPlan,
        to_delete: List[str],
    ) -> Applied:
        if self.vcfg.method == "api":
            return apply_api(self.bridges, env, run_as, tmp, secret, plan, to_delete, self.tick)
        cli = AirflowCli(self.vcfg.airflow_command, env, run_as, tmp.path, self.vcfg.timeout)
        return apply_cli(cli, tmp, secret, plan, to_delete)


def _secret_strings(secret: Dict[str, Any]) -> List[str]:
    out = []
    for raw in secret.values():
        value, desc = unwrap(raw)
        out.append(value if isinstance(value, str) else json.dumps(value))
        if isinstance(value, (dict, list)):
            out.append(json.dumps(value, indent=2))
        if isinstance(desc, str):
            out.append(desc)
    return out


def bridge_provider(cfg, warm: bool) -> BridgeProvider:
    from agent.airflow.bridge_client import WarmBridgeProvider

    vcfg = cfg.variables
    python = vcfg.airflow_python or default_python(vcfg.airflow_command)
    cls = WarmBridgeProvider if warm else BridgeProvider
    return cls(python, vcfg.timeout)


def _iso(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "an unknown time"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def print_diff(plan: VariablesPlan, out) -> None:
    for key in plan.new:
        print(f"+ {key}", file=out)
    for key in plan.changed:
        print(f"~ {key}", file=out)
    for key in plan.removed:
        print(f"- {key}", file=out)
