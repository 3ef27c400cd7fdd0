"""Pure core of `airflow-agent task-credentials`: when to assume the task role, what to write.

Airflow's processes read the task role's credentials through the AWS config file's
`credential_process` (a `cat` of credentials.json): botocore then holds *refreshable*
credentials and re-reads the file 15 min before they expire, so a long-lived scheduler,
triggerer or secrets-backend client never keeps an expired key (a plain shared credentials file
is read once per botocore session). The same JSON (Version 1, Expiration) is what the AWS CLI
and the other SDKs take from a credential_process.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

CREDENTIALS_NAME = "credentials.json"
CONFIG_NAME = "config"
CAT = "/usr/bin/cat"


@dataclass(frozen=True)
class Current:
    """What credentials.json holds now (never the secret parts)."""

    role_arn: Optional[str]
    expiration: Optional[float]  # epoch seconds


@dataclass(frozen=True)
class Decision:
    refresh: bool
    reason: str


def iso8601(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def parse_iso8601(text: str) -> Optional[float]:
    """'2026-11-30T22:10:00Z' (or with +00:00 / fractional seconds) -> epoch; None if not."""
    m = re.fullmatch(
        r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|\+00:00)", text.strip()
    )
    if not m:
        return None
    parts = [int(x) for x in m.groups()[:6]]
    try:
        return float(calendar.timegm(time.struct_time((*parts, 0, 0, 0))))
    except (ValueError, OverflowError):
        return None


def credentials_document(creds: Mapping[str, Any], role_arn: str) -> bytes:
    """credential_process output for STS AssumeRole's `Credentials` (Expiration: epoch)."""
    doc = {
        "Version": 1,
        "AccessKeyId": creds["AccessKeyId"],
        "SecretAccessKey": creds["SecretAccessKey"],
        "SessionToken": creds["SessionToken"],
        "Expiration": iso8601(float(creds["Expiration"])),
        # not read by SDKs: lets the agent see which role the file is for
        "RoleArn": role_arn,
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def read_current(data: Optional[bytes]) -> Current:
    """The role and expiry of a credentials.json; a missing or unreadable file is empty."""
    if data is None:
        return Current(None, None)
    try:
        doc = json.loads(data)
    except ValueError:
        return Current(None, None)
    if not isinstance(doc, dict):
        return Current(None, None)
    role = doc.get("RoleArn") if isinstance(doc.get("RoleArn"), str) else None
    exp = doc.get("Expiration")
    return Current(role, parse_iso8601(exp) if isinstance(exp, str) else None)


def config_document(region: str, credentials_path: Optional[str]) -> bytes:
    """The AWS config file Airflow's units name in AWS_CONFIG_FILE (no secret in it)."""
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", region):
        raise ValueError(f"not an AWS region name: {region!r}")
    lines = [
        "# Written by airflow-agent task-credentials; Airflow's units read it (AWS_CONFIG_FILE).",
        "[default]",
        f"region = {region}",
    ]
    if credentials_path is not None:
        if not re.fullmatch(r"/[A-Za-z0-9_./-]+", credentials_path):
            raise ValueError(f"credentials path not usable in a command: {credentials_path!r}")
        lines.append(f"credential_process = {CAT} {credentials_path}")
    return ("\n".join(lines) + "\n").encode()


def decide(
    current: Current, role_arn: str, now: float, refresh_before: float, force: bool = False
) -> Decision:
    """Assume the role again, or keep what the file holds (and why, for the log and STATUS)."""
    if force:
        return Decision(True, "forced")
    if current.expiration is None:
        return Decision(True, "no valid credentials file")
    if current.role_arn != role_arn:
        return Decision(True, "the file is for another role")
    left = current.expiration - now
    if left <= refresh_before:
        return Decision(True, f"expiring in {max(left, 0):.0f} s")
    return Decision(False, f"valid until {iso8601(current.expiration)} ({left:.0f} s left)")


def session_name(configured: Optional[str], cluster: str, instance_id: Optional[str]) -> str:
    """AssumeRole's RoleSessionName (CloudTrail shows it): `airflow-<cluster>-<instance>`."""
    if configured:
        return configured
    raw = f"airflow-{cluster}-{instance_id or 'unknown'}"
    return re.sub(r"[^\w+=,.@-]", "-", raw)[:64]


def summary(doc: Dict[str, Any]) -> str:
    """A one-line description for status: the role and the expiry, never a key."""
    exp = doc.get("expiration")
    when = iso8601(exp) if isinstance(exp, (int, float)) else "-"
    return f"role {doc.get('role_arn') or '-'}, expires {when}"
