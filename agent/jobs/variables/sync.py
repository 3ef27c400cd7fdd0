"""`airflow-agent variables sync`: one Secrets Manager secret -> Airflow Variables.

The I/O shell around `agent.jobs.variables.plan`. One run:

1. takes the lock `state_dir/variables.lock` and empties the private temp dir
   `state_dir/variables-tmp/` (a run killed with SIGKILL leaves its temp file there);
2. reads the secret; when its VersionId is the one last synced completely, stops: no Airflow
   call at all;
3. refuses a secret that is not a JSON object of usable keys (nothing imported, state kept);
4. writes only new and changed keys, deletes keys that left the secret only with `--prune`,
   reads back and fails naming every key that did not land, by one of two methods
   (`variables.method`):
   - api (default): through one co-process in the Airflow venv's interpreter
     (airflow/bridge_client.py + airflow/bridge_server.py): `Variable.set/delete` per key, then
     an HMAC of what each key holds, read in a new session; values only on a pipe;
   - cli: `airflow variables import -a overwrite` of a 0600 temp file, `airflow variables
     delete`, then `airflow variables export` (a 0600 temp file too): the CLI reports per-key
     failures with exit status 0, so only the export tells;
5. records per-key keyed hashes (never values) of what landed, so the next run retries the rest.

State (StateStore, root 0600): `variables.json` is the summary `status` shows (`version_id` and
`synced_at` of the last complete sync, `counts`, `last_run_at`, `last_result`, `last_error`,
`last_counts`, `not_pruned`, `secret_id`); `variables-hashes.json` holds the per-key hashes;
`variables.key` the HMAC key.

`variables watch` (agent/jobs/variables/watch.py) runs the same sync in a loop with a warm bridge.

The Airflow CLI (or the bridge) runs with the environment of the units' EnvironmentFile
(`variables.env_file`, default `env.file`), never with values on its argv, as `variables.user`
(default `airflow`).
The switch uses Popen's own user/group/extra_groups (setgroups+setregid+setreuid in the child
before exec; no setpriv/runuser binary, nothing added to argv). Because the state dir is root
0700, the child is started with its working directory already inside the temp dir (chdir
happens before the uid switch) and names its files relatively; the temp files are chowned to
that user, and we read the export through a descriptor opened before the chown. That needs
CAP_CHOWN besides CAP_SETUID/CAP_SETGID, and nothing else (no CAP_DAC_OVERRIDE).

Airflow's own output is never logged: its error lines can quote values. Only counts and
exception class names are picked out of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import secrets as pysecrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from agent.airflow.bridge_client import BridgeProvider, default_python
from agent.airflow.execution import (
    IMPORT_COUNTS,
    AirflowCli,
    RunAs,
    TempDir,
    exception_names,
    pdeathsig_preexec,
    read_fd,
    resolve_run_as,
)
from agent.errors import EXIT_OK, AgentError, ConfigError, RefusedError
from agent.jobs.variables.plan import (
    SecretShapeError,
    VariablesPlan,
    bridge_item,
    import_document,
    name_list,
    parse_secret,
    plan_variables,
    secrets_backend,
    shadowed_by_env,
    unwrap,
    verify_absent,
    verify_deleted,
    verify_digests,
    verify_import,
)
from agent.logs import register_secrets
from agent.platform.aws import AWS_ERRORS, AwsClients, describe_error
from agent.platform.envfile import parse_env
from agent.platform.fsutil import FileLock, atomic_write
from agent.state import StateStore

log = logging.getLogger(__name__)

STATE_NAME = "variables"
# the per-key hashes live in their own document so `status` shows a small summary
HASHES_NAME = "variables-hashes"
LOCK_NAME = "variables.lock"
DIGEST_KEY_NAME = "variables.key"
# what systemd gives a service; the env file comes on top
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="variables_command", metavar="ACTION", required=True)
    sync = sub.add_parser(
        "sync",
        parents=[common],
        help="import new and changed variables from the secret into Airflow, verified",
        description=(
            "Read variables.secret_id from Secrets Manager. When its VersionId was synced "
            "already, do nothing. Otherwise import only new and changed keys into Airflow, "
            "read them back, and fail naming any key that did not land. Keys removed from "
            "the secret are deleted only with --prune. Values never reach logs or argv."
        ),
    )
    sync.add_argument(
        "--diff", action="store_true", help="print new (+), changed (~), removed (-) names"
    )
    sync.add_argument(
        "--dry-run", action="store_true", help="plan only: no Airflow call, no state change"
    )
    sync.add_argument(
        "--prune", action="store_true", help="delete variables removed from the secret"
    )
    sync.add_argument(
        "--all",
        action="store_true",
        help="import every key even if recorded as synced (e.g. after Airflow's database was "
        "restored or edited by hand)",
    )
    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="daemon: poll the secret and sync each new version through a warm Airflow bridge",
        description=(
            "Keep one Airflow interpreter (the bridge) running, poll GetSecretValue every "
            "interval, and sync when the VersionId changes (an unchanged secret costs no "
            "Airflow work). Restarts the bridge if it dies or the env file changes. Reports "
            "READY/STATUS/WATCHDOG to systemd; exits cleanly on SIGTERM."
        ),
    )
    watch.add_argument(
        "--interval",
        type=float,
        default=None,
        metavar="S",
        help="seconds between polls (default: variables.watch_interval)",
    )
    watch.add_argument(
        "--prune", action="store_true", help="delete variables removed from the secret"
    )


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


class _Terminated(AgentError):
    pass


def _raise_terminated(signum: int, _frame: Any) -> None:
    # a oneshot blocked waiting for the CLI: raising unwinds through the finally blocks that
    # remove the temp files (subprocess.run kills the child on the way out)
    raise _Terminated(f"terminated by signal {signum}; nothing more imported")


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
        try:
            file_env = parse_env(self.env_file.read_bytes())
        except FileNotFoundError:
            # without it the CLI would fall back to a default (SQLite) database: refuse
            raise AgentError(
                f"the Airflow environment file {self.env_file} does not exist (run `env sync` "
                "first, or set variables.env_file)"
            ) from None
        except OSError as exc:
            raise AgentError(
                f"cannot read the Airflow environment file {self.env_file}: {exc.strerror}"
            ) from None
        # its values (database URL, fernet key) go to the CLI's environment only, never to a log
        if run_as is not None:
            home, user = run_as.home, run_as.name
        else:
            pw = pwd.getpwuid(os.geteuid())
            home, user = pw.pw_dir, pw.pw_name
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": home, "USER": user, "LOGNAME": user}
        env.update(file_env)
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
        doc = self.state.load(STATE_NAME)
        version_id, text = self._fetch()
        sid = self.vcfg.secret_id
        digest_key = self._digest_key(create=False)
        same_version = (
            doc.get("secret_id") == sid
            and doc.get("version_id") == version_id
            and digest_key is not None
        )
        if same_version and not (prune and doc.get("not_pruned")) and not full:
            if doc.get("not_pruned"):
                log.warning(
                    "%d variable(s) left the secret but stay in Airflow (--prune deletes them): %s",
                    len(doc["not_pruned"]),
                    name_list(doc["not_pruned"]),
                )
            log.log(
                self.unchanged_level,
                "secret %s version %s already synced at %s; no Airflow call",
                sid,
                version_id,
                _iso(doc.get("synced_at")),
            )
            if not dry_run:
                self.state.update(
                    STATE_NAME, last_run_at=time.time(), last_result="unchanged", last_error=None
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
        hashes = dict(self.state.load(HASHES_NAME).get("hashes") or {})
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
            _print_diff(plan, diff_out)
        env = self._airflow_env(run_as)
        self._warn_shadowed(secret, env)
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
        if self.vcfg.method == "api":
            landed, failed, gone, kept, calls = self._apply_api(
                env, run_as, tmp, secret, plan, to_delete
            )
        else:
            cli = AirflowCli(self.vcfg.airflow_command, env, run_as, tmp.path, self.vcfg.timeout)
            landed, failed, gone, kept = self._apply(cli, tmp, secret, plan, to_delete)
            calls = cli.calls

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
        self.state.save(HASHES_NAME, {"hashes": new_hashes})
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
            self.state.update(STATE_NAME, **update)
            raise AgentError(f"variables sync of {sid} version {version_id}: {reason}")
        update.update(
            version_id=version_id, synced_at=now, counts=counts, last_result="ok", last_error=None
        )
        self.state.update(STATE_NAME, **update)
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

    def _apply_api(
        self,
        env: Dict[str, str],
        run_as: Optional[RunAs],
        tmp: TempDir,
        secret: Dict[str, Any],
        plan: VariablesPlan,
        to_delete: List[str],
    ) -> Tuple[List[str], List[str], List[str], List[str], int]:
        """Through the Airflow bridge: set, delete, then digests read back in new sessions.
        (landed, failed, deleted, still there, requests)."""
        to_import = plan.to_import
        if not to_import and not to_delete:
            return [], [], [], [], 0
        bridge = self.bridges.acquire(env, run_as, tmp.path)
        before = bridge.requests
        broken = True
        try:
            if to_import:
                refused = bridge.set({k: bridge_item(secret[k]) for k in to_import}, self.tick)
                log.log(
                    logging.WARNING if refused else logging.INFO,
                    "airflow bridge set %d key(s): %d refused by Airflow%s",
                    len(to_import),
                    len(refused),
                    _refused_suffix(refused),
                )
            if to_delete:
                refused = bridge.delete(to_delete, self.tick)
                if refused:
                    log.warning(
                        "airflow bridge delete of %d key(s): %d refused%s",
                        len(to_delete),
                        len(refused),
                        _refused_suffix(refused),
                    )
            digests = bridge.digests(sorted(set(to_import) | set(to_delete)), self.tick)
            broken = False
        finally:
            self.bridges.release(bridge, broken)
        landed, failed = verify_digests(secret, to_import, digests, bridge.hmac_key)
        gone, kept = verify_absent(to_delete, digests)
        return landed, failed, gone, kept, bridge.requests - before

    def _apply(
        self,
        cli: AirflowCli,
        tmp: TempDir,
        secret: Dict[str, Any],
        plan: VariablesPlan,
        to_delete: List[str],
    ) -> Tuple[List[str], List[str], List[str], List[str]]:
        """Import, delete, read back. (landed, failed, deleted, still there)."""
        to_import = plan.to_import
        if not to_import and not to_delete:
            return [], [], [], []
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
                _exc_suffix(out),
            )
        for key in to_delete:
            # "--": a key may start with "-"; keys are names, not secrets, so argv is fine
            rc, out = cli.run("variables", "delete", "--", key)
            if rc != 0:
                log.warning("airflow variables delete %s: exit %d%s", key, rc, _exc_suffix(out))
        exported = self._export(cli, tmp)
        landed, failed = verify_import(secret, to_import, exported)
        gone, kept = verify_deleted(to_delete, exported)
        return landed, failed, gone, kept

    def _export(self, cli: AirflowCli, tmp: TempDir) -> Dict[str, Any]:
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
                f"{_exc_suffix(out)}; nothing recorded as synced"
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

    def _warn_shadowed(self, secret: Dict[str, Any], env: Dict[str, str]) -> None:
        shadowed = shadowed_by_env(secret, env)
        if shadowed:
            log.warning(
                "%d variable(s) are shadowed by AIRFLOW_VAR_* in %s (Airflow reads those "
                "first; the imported value is not what DAGs see): %s",
                len(shadowed),
                self.env_file,
                name_list(shadowed),
            )
        backend = secrets_backend(env)
        if backend and secret:
            log.warning(
                "%s is set in %s: Airflow reads that secrets backend before its database, so "
                "any of these %d variable(s) it defines shadows the imported one: %s",
                backend,
                self.env_file,
                len(secret),
                name_list(sorted(secret)),
            )


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


def _refused_suffix(refused: Dict[str, str]) -> str:
    # key names and exception class names only; never the exception's message
    if not refused:
        return ""
    shown = [f"{k} ({refused[k]})" for k in sorted(refused)]
    return ": " + name_list(shown)


def bridge_provider(cfg, warm: bool) -> BridgeProvider:
    from agent.airflow.bridge_client import WarmBridgeProvider

    vcfg = cfg.variables
    python = vcfg.airflow_python or default_python(vcfg.airflow_command)
    cls = WarmBridgeProvider if warm else BridgeProvider
    return cls(python, vcfg.timeout, pdeathsig_preexec())


def _exc_suffix(output: str) -> str:
    names = exception_names(output)
    return f" ({', '.join(names)})" if names else ""


def _iso(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "an unknown time"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _print_diff(plan: VariablesPlan, out) -> None:
    for key in plan.new:
        print(f"+ {key}", file=out)
    for key in plan.changed:
        print(f"~ {key}", file=out)
    for key in plan.removed:
        print(f"- {key}", file=out)


def _record_failure(cfg, result: str, reason: str) -> None:
    # the state dir may be what is broken; the error line still goes out
    with contextlib.suppress(OSError):
        StateStore(cfg.state_dir).update(
            STATE_NAME, last_run_at=time.time(), last_result=result, last_error=reason
        )


def run(args: argparse.Namespace, cfg) -> int:
    if not cfg.variables.secret_id:
        if args.variables_command == "sync":
            # the scheduler's timer is enabled by default: a cluster without variables must not
            # see it fail every run
            log.warning("variables.secret_id is not set in %s: nothing to import", cfg.source)
            return EXIT_OK
        raise ConfigError(f"{cfg.source}: key 'variables.secret_id' is not set")
    if args.variables_command == "watch":
        from agent.jobs.variables.watch import watch

        return watch(args, cfg)
    # a oneshot blocked on Airflow: SIGTERM unwinds through the finally blocks that remove the
    # temp file (cli) or end the co-process (api), and is recorded as a failed run
    old_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        sm = AwsClients(cfg).client("secretsmanager")
        VariablesSync(cfg, sm).run(
            full=args.all,
            dry_run=args.dry_run,
            prune=args.prune,
            diff_out=sys.stdout if args.diff else None,
        )
    except RefusedError as exc:
        if not args.dry_run:
            _record_failure(cfg, "refused", str(exc))
        raise
    except AgentError as exc:
        if not args.dry_run and not isinstance(exc, ConfigError):
            _record_failure(cfg, "failed", str(exc))
        raise
    except AWS_ERRORS as exc:
        _record_failure(cfg, "failed", describe_error(exc))
        raise AgentError(f"variables sync: {describe_error(exc)}") from None
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    return EXIT_OK
