"""`airflow-agent task-credentials`: keep the task role's credentials fresh for Airflow.

Run as root by airflow-agent-task-credentials.service (a oneshot: every Airflow unit Wants= it
before it starts, and airflow-agent-task-credentials.timer runs it every 5 min). With the
instance role's credentials it calls sts:AssumeRole on `task_credentials.role_arn` when the
credentials on disk expire within `refresh_before` (or are missing, or for another role), and
writes, in `task_credentials.directory` (root-owned, not group/other-writable, never followed
through a symlink):
- credentials.json (root:<group> 0640): credential_process output, the only secret;
- config (root 0644): region + `credential_process = cat credentials.json`; Airflow's units set
  AWS_CONFIG_FILE to it (agent.jobs.task_credentials.plan says why not a credentials file).
Both atomically. Without a role_arn it writes the region alone and removes credentials.json.
Runs take turns (task-credentials.lock in the state dir). Nothing secret reaches the log, the
state document (task-credentials.json: role, expiry, results) or `status`.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, Optional

from agent.errors import AgentError, DeadlineError
from agent.jobs.task_credentials.plan import (
    CONFIG_NAME,
    CREDENTIALS_NAME,
    config_document,
    credentials_document,
    decide,
    iso8601,
    read_current,
    session_name,
)
from agent.jobs.task_credentials.state import TaskCredentialsDoc
from agent.logs import register_secrets
from agent.platform.aws import AwsClients
from agent.platform.fsutil import FileLock, atomic_write, read_bytes_or_none, resolve_owner
from agent.state import StateStore

log = logging.getLogger(__name__)

FAILURE_DOCUMENT = TaskCredentialsDoc
LOCK_NAME = "task-credentials.lock"
LOCK_WAIT = 60.0


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="assume the role even if the credentials are fresh"
    )


def check_directory(path: Path) -> None:
    """Create the directory (root 0755) if missing; refuse one root does not own alone.

    Root writes and renames in it, so whoever else could write there (or swap it for a
    symlink) could make root write elsewhere or plant the file Airflow reads.
    """
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise AgentError(f"cannot create {path}: {exc.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise AgentError(f"{path} is not a directory (a symlink is refused)")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise AgentError(
            f"{path} must be owned by uid {os.geteuid()} and writable by it alone "
            f"(owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        )


class TaskCredentials:
    def __init__(self, cfg: Any, clients: Optional[AwsClients] = None):
        self.cfg = cfg
        self.tc = cfg.task_credentials
        self.clients = clients or AwsClients(cfg)
        self.state = StateStore(cfg.state_dir)
        self.dir = Path(self.tc.directory)

    def _instance_id(self) -> Optional[str]:
        try:
            return self.clients.imds.instance_id()
        except Exception as exc:  # a name for CloudTrail is not worth failing the refresh
            log.warning("no instance id for the session name (%s)", type(exc).__name__)
            return None

    def _assume(self, role_arn: str) -> bytes:
        kwargs = {
            "RoleArn": role_arn,
            "RoleSessionName": session_name(
                self.tc.session_name, self.cfg.cluster, self._instance_id()
            ),
            "DurationSeconds": int(self.tc.duration),
        }
        if self.tc.external_id:
            kwargs["ExternalId"] = self.tc.external_id
        creds = dict(self.clients.client("sts").assume_role(**kwargs)["Credentials"])
        register_secrets([creds.get("SecretAccessKey"), creds.get("SessionToken")])
        expiration = creds["Expiration"]
        creds["Expiration"] = expiration.timestamp() if hasattr(expiration, "timestamp") else 0
        if creds["Expiration"] <= time.time():
            raise AgentError(f"STS returned credentials for {role_arn} that are already expired")
        return credentials_document(creds, role_arn)

    def run(self, force: bool = False) -> str:
        """One pass; returns the result recorded (refreshed | valid | disabled)."""
        self.state.ensure()
        lock = FileLock(self.state.dir / LOCK_NAME)
        if not lock.acquire(time.monotonic() + LOCK_WAIT):
            raise DeadlineError(
                f"another task-credentials run holds {lock.path} ({lock.holder() or 'unknown'})"
            )
        try:
            lock.write_holder(f"pid {os.getpid()} since {iso8601(time.time())}")
            return self._run_locked(force)
        finally:
            lock.release()

    def _run_locked(self, force: bool) -> str:
        check_directory(self.dir)
        cred_path = self.dir / CREDENTIALS_NAME
        conf_path = self.dir / CONFIG_NAME
        role_arn = self.tc.role_arn
        region = self.clients.region()
        _, gid = resolve_owner(None, self.tc.group)
        if role_arn is None:
            self._write_if_changed(conf_path, config_document(region, None), 0o644, 0)
            if cred_path.exists():
                cred_path.unlink()
                log.info("no task role (task_credentials.role_arn): removed %s", cred_path)
            log.info("no task role configured: Airflow gets no AWS credentials")
            self.state.update_doc(
                TaskCredentialsDoc,
                role_arn=None,
                expiration=None,
                last_check=time.time(),
                last_result="disabled",
            )
            return "disabled"
        now = time.time()
        current = read_current(read_bytes_or_none(cred_path))
        decision = decide(current, role_arn, now, self.tc.refresh_before, force)
        if decision.refresh:
            data = self._assume(role_arn)
            atomic_write(cred_path, data, mode=0o640, uid=0, gid=gid)
            current = read_current(data)
            result = "refreshed"
            log.info(
                "assumed %s (%s): credentials valid until %s",
                role_arn,
                decision.reason,
                iso8601(current.expiration or 0),
            )
        else:
            result = "valid"
            log.info("task credentials for %s kept: %s", role_arn, decision.reason)
        self._write_if_changed(conf_path, config_document(region, str(cred_path)), 0o644, 0)
        fields = {
            "role_arn": role_arn,
            "expiration": current.expiration,
            "last_check": time.time(),
            "last_result": result,
        }
        if decision.refresh:
            fields["last_refresh"] = now
        self.state.update_doc(TaskCredentialsDoc, **fields)
        return result

    @staticmethod
    def _write_if_changed(path: Path, data: bytes, mode: int, gid: int) -> None:
        if read_bytes_or_none(path) != data:
            atomic_write(path, data, mode=mode, uid=0, gid=gid)


def run(args: argparse.Namespace, cfg: Any) -> int:
    TaskCredentials(cfg).run(force=args.force)
    return 0
