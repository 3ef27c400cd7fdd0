"""The environment Airflow runs with for a variables sync, and what in it shadows the import.

The Airflow CLI (or the bridge) gets the Airflow env file (`variables.env_file`, default
`env.file`) on top of a service-like base (PATH, LANG, HOME, USER), never with values on its
argv. Its values (database URL, fernet key) go to that child's environment only, never to a log
and never to the agent's own: the file is written from SSM parameters, so the agent (root, and
its units have no `EnvironmentFile=`) reads it as data with `parse_env` and hands it only to the
Airflow child, which runs as `variables.user` (airflow). Run as root instead (`variables.user`
null or root while the agent is root), Airflow would take PYTHONPATH, LD_PRELOAD or a plugins
folder from a parameter writer: that is logged as a warning.
"""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path
from typing import Any, Dict, Optional

from agent.errors import AgentError
from agent.jobs.variables.plan import name_list, secrets_backend, shadowed_by_env
from agent.platform.envfile import parse_env
from agent.platform.process import RunAs

log = logging.getLogger(__name__)

# what systemd gives a service; the env file comes on top
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def airflow_env(env_file: Path, run_as: Optional[RunAs]) -> Dict[str, str]:
    """The environment for Airflow; AgentError when the env file cannot be read."""
    try:
        file_env = parse_env(env_file.read_bytes())
    except FileNotFoundError:
        # without it the CLI would fall back to a default (SQLite) database: refuse
        raise AgentError(
            f"the Airflow environment file {env_file} does not exist (run `env sync` "
            "first, or set variables.env_file)"
        ) from None
    except OSError as exc:
        raise AgentError(
            f"cannot read the Airflow environment file {env_file}: {exc.strerror}"
        ) from None
    if run_as is not None:
        home, user = run_as.home, run_as.name
    else:
        pw = pwd.getpwuid(os.geteuid())
        home, user = pw.pw_dir, pw.pw_name
        if os.geteuid() == 0:
            log.warning(
                "Airflow runs as root with the settings of %s (variables.user is null or "
                "root): whoever writes its SSM parameters chooses code that runs as root; "
                "set variables.user to the Airflow units' user",
                env_file,
            )
    env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": home, "USER": user, "LOGNAME": user}
    env.update(file_env)
    return env


def warn_shadowed(secret: Dict[str, Any], env: Dict[str, str], env_file: Path) -> None:
    """Warn about variables DAGs will not see as imported: AIRFLOW_VAR_* in the env file, or a
    secrets backend Airflow reads before its database."""
    shadowed = shadowed_by_env(secret, env)
    if shadowed:
        log.warning(
            "%d variable(s) are shadowed by AIRFLOW_VAR_* in %s (Airflow reads those "
            "first; the imported value is not what DAGs see): %s",
            len(shadowed),
            env_file,
            name_list(shadowed),
        )
    backend = secrets_backend(env)
    if backend and secret:
        log.warning(
            "%s is set in %s: Airflow reads that secrets backend before its database, so "
            "any of these %d variable(s) it defines shadows the imported one: %s",
            backend,
            env_file,
            len(secret),
            name_list(sorted(secret)),
        )
