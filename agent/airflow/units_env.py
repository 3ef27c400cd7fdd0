"""The AWS settings every Airflow unit runs with, for the Airflow-side children the agent starts.

systemd/airflow-*.service give Airflow its AWS credentials only through the task role's files
(`AWS_CONFIG_FILE=<task_credentials.directory>/config`, written by `airflow-agent
task-credentials`), no shared credentials file and no IMDS. A process the agent starts on
Airflow's behalf (an option's `_CMD` command, the Airflow CLI or bridge) must act as the same
role, not fall back to the instance role through IMDS (it runs outside the units, so their
`IPAddressDeny=` does not stop it): `airflow_aws_env(cfg)` is what goes on top of the env file's
values for such a child. tests/test_units_env.py holds it equal to the units' own lines.
"""

from __future__ import annotations

import posixpath
from typing import Dict

from agent.jobs.task_credentials.plan import CONFIG_NAME


def airflow_aws_env(cfg) -> Dict[str, str]:
    return {
        "AWS_CONFIG_FILE": posixpath.join(cfg.task_credentials.directory, CONFIG_NAME),
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
