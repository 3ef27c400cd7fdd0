"""The AWS settings every Airflow unit runs with, for the Airflow-side children the agent starts.

systemd/airflow-*.service give Airflow its AWS credentials only through the task role's files
(`AWS_CONFIG_FILE=<task_credentials.directory>/config`, written by `airflow-agent
task-credentials`), no shared credentials file and no IMDS. A process the agent starts on
Airflow's behalf (an option's `_CMD` command, the Airflow CLI or bridge) must act as the same
role, not fall back to the instance role through IMDS (it runs outside the units, so their
`IPAddressDeny=` does not stop it): `airflow_aws_env(cfg)` is what goes on top of the env file's
values for such a child. tests/test_units_env.py holds it equal to the units' own lines.

The units also inherit the service manager's environment (`DefaultEnvironment=`), where an
operator may point every AWS client at other endpoints (`AWS_ENDPOINT_URL`,
`AWS_ENDPOINT_URL_<SERVICE>`: VPC or FIPS endpoints, the sandbox's embedded AWS). The agent got
the same manager environment, but its children are built from the env file alone, so those
names are carried over from the agent's own environment (root's, not a file anyone else
writes): the children then reach AWS where the units do.
"""

from __future__ import annotations

import os
import posixpath
from typing import Dict, Mapping, Optional

from agent.jobs.task_credentials.plan import CONFIG_NAME

ENDPOINT_PREFIX = "AWS_ENDPOINT_URL"


def manager_endpoints(environ: Mapping[str, str]) -> Dict[str, str]:
    """The AWS endpoint settings in `environ` (the agent's own, i.e. the service manager's)."""
    return {
        k: v
        for k, v in environ.items()
        if k == ENDPOINT_PREFIX or k.startswith(ENDPOINT_PREFIX + "_")
    }


def airflow_aws_env(cfg, environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    env = manager_endpoints(os.environ if environ is None else environ)
    env.update(
        AWS_CONFIG_FILE=posixpath.join(cfg.task_credentials.directory, CONFIG_NAME),
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env
