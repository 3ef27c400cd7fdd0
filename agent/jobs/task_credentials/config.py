"""The `task_credentials` section of agent.yaml: which task role Airflow's processes act as.

Pure (stdlib only) so agent.config can import it. `check_task_credentials` holds the section's
own checks; agent.config calls it and reports the (key, why) it returns like any other key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

# arn:<partition>:iam::<account>:role/<path/>name (sts:AssumeRole takes only a role ARN)
ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")
# STS: a session of a role assumed with role credentials (role chaining) lasts at most 1 h;
# 900 s is the API's minimum
MIN_DURATION = 900
MAX_DURATION = 3600
MIN_REFRESH_BEFORE = 1200.0


@dataclass
class TaskCredentialsConfig:
    # the role Airflow and its tasks act as; null: no task role (Airflow gets no AWS credentials)
    role_arn: Optional[str] = None
    # root-owned directory for the AWS config file (0644) and credentials.json (root:group 0640)
    directory: str = "/run/airflow-aws"
    # null: airflow-<cluster>-<instance id>, as CloudTrail shows it
    session_name: Optional[str] = None
    external_id: Optional[str] = None
    duration: int = MAX_DURATION
    # a run replaces credentials that expire within this many seconds: the timer runs every
    # 5 min and botocore re-reads them 15 min before their end, so at least 20 min
    refresh_before: float = 1800.0
    group: str = "airflow"


def check_task_credentials(tc: TaskCredentialsConfig) -> Optional[Tuple[str, str]]:
    """(dotted key, why) for the first bad key of the section, else None."""
    if tc.role_arn is not None and not ROLE_ARN.match(tc.role_arn):
        return "task_credentials.role_arn", f"must be an IAM role ARN, got {tc.role_arn!r}"
    if tc.session_name is not None and not SESSION_NAME.match(tc.session_name):
        return "task_credentials.session_name", "must be 2-64 of [A-Za-z0-9_+=,.@-]"
    if not tc.directory.startswith("/") or tc.directory.rstrip("/") in ("", "/run", "/tmp"):
        return "task_credentials.directory", f"must be a directory of its own, got {tc.directory!r}"
    if not MIN_DURATION <= tc.duration <= MAX_DURATION:
        return (
            "task_credentials.duration",
            f"must be {MIN_DURATION}..{MAX_DURATION} s (role chaining), got {tc.duration}",
        )
    if not MIN_REFRESH_BEFORE <= tc.refresh_before <= tc.duration - 300:
        return (
            "task_credentials.refresh_before",
            f"must be {MIN_REFRESH_BEFORE:.0f} s .. duration - 300 s (botocore re-reads "
            f"credentials 15 min before their end; the timer runs every 5 min), "
            f"got {tc.refresh_before}",
        )
    return None
