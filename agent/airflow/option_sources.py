"""The two doors agent.airflow.config_options opens for an Airflow option's indirect forms.

- `command_runner`: runs an `<option>_CMD` command as `airflow_config.command_user` (never as
  root: the command string comes from the env file, which whoever writes the SSM parameters
  controls; as the Airflow user it can do nothing that writer cannot already make Airflow do),
  with the env file as its environment plus the PATH, HOME and USER a systemd unit with
  `User=` gets and the Airflow units' AWS settings (the task role's credentials, no IMDS:
  agent.airflow.units_env), in `/`, umask 077, `airflow_config.command_timeout`, dying
  with the agent. A non-zero exit is an error naming the variable; its output is never
  quoted (it is the secret). Airflow takes the output verbatim; so does this.
- `secrets_manager_lookup`: the Amazon provider's `SecretsManagerBackend` config read,
  `GetSecretValue(SecretId=<prefix><sep><key>)` -> `SecretString`, through the agent's own
  AWS client factory (instance credentials, its endpoint, adaptive retries) in the backend's
  `region_name` when it names one. The provider treats ResourceNotFound, InvalidParameter,
  InvalidRequest, DecryptionFailure and InternalServiceError as "not set" (None); so does
  this, and the caller refuses a missing value. Any other error (AccessDenied, throttling
  past the retries, no endpoint) is an error naming the secret id and the AWS error code.

`airflow_options(cfg, env, source)` puts them together; drain, lifecycle and the deploy hook
get the worker's broker settings through it (agent.jobs.drain.broker.read_broker).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, Mapping, Optional

from agent.airflow.config_options import (
    AirflowOptions,
    OptionError,
    Runner,
    SecretsManagerConfig,
    split_command,
)
from agent.airflow.units_env import airflow_aws_env
from agent.errors import AgentError
from agent.logs import register_secrets
from agent.platform import process
from agent.platform.envfile import parse_env
from agent.platform.process import RunAs

log = logging.getLogger(__name__)

# what systemd 252 gives a system service (the Airflow units set no PATH of their own)
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Airflow's secrets backend answers these with None ("not set")
NOT_SET_CODES = frozenset(
    {
        "ResourceNotFoundException",
        "InvalidParameterException",
        "InvalidRequestException",
        "DecryptionFailure",
        "InternalServiceError",
    }
)


def command_runner(cfg, env: Mapping[str, str]) -> Optional[Runner]:
    """A runner for `_CMD` commands as `airflow_config.command_user`; None when that is null."""
    user = cfg.airflow_config.command_user
    if user is None:
        return None
    timeout = cfg.airflow_config.command_timeout

    def run(variable: str, command: str) -> str:
        argv = split_command(variable, command)
        try:
            run_as = RunAs.lookup(user)
        except KeyError as exc:
            raise OptionError(
                f"{cfg.source}: key 'airflow_config.command_user': {exc.args[0]}"
            ) from None
        if run_as.uid == 0:
            # a config check refuses "root"; another name for uid 0 is caught here
            raise OptionError(
                f"{cfg.source}: key 'airflow_config.command_user' is {user!r}, uid 0; "
                f"{variable} comes from the env file and never runs as root"
            )
        child: Dict[str, str] = dict(env)
        child.update(PATH=SERVICE_PATH, HOME=run_as.home, USER=user, LOGNAME=user)
        # as Airflow's units: the task role's credentials, never the instance role's
        child.update(airflow_aws_env(cfg))
        switch = None if run_as.uid == os.geteuid() else run_as
        result = process.run(
            argv,
            timeout=timeout,
            env=child,
            user=switch,
            umask=0o077,
            cwd="/",
            die_with_parent=True,
            label=f"the command of {variable} (as {user})",
        )
        if result.returncode != 0:
            raise OptionError(
                f"the command of {variable} (as {user}) failed (exit status "
                f"{result.returncode}); Airflow would fail to read the option too"
            )
        return result.stdout

    return run


def secrets_manager_lookup(cfg, clients: Any = None):
    """`(backend, secret_id) -> SecretString or None` with the agent's AWS clients."""
    from agent.platform.aws import AWS_ERRORS, AwsClients, describe_error

    made: Dict[Optional[str], Any] = {}

    def client(region: Optional[str]) -> Any:
        if region not in made:
            if region is None:
                base = clients if clients is not None else AwsClients(cfg)
            else:
                # the backend's region_name: only which of AWS's own endpoints answers
                aws = dataclasses.replace(cfg.aws, region=region)
                imds = clients.imds if clients is not None else None
                base = AwsClients(dataclasses.replace(cfg, aws=aws), imds)
            made[region] = base.client("secretsmanager")
        return made[region]

    def lookup(backend: SecretsManagerConfig, secret_id: str) -> Optional[str]:
        try:
            answer = client(backend.region_name).get_secret_value(SecretId=secret_id)
        except AWS_ERRORS as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in NOT_SET_CODES:
                log.warning("Secrets Manager secret %s: %s (not set)", secret_id, code)
                return None
            raise OptionError(
                f"Secrets Manager GetSecretValue of {secret_id}: {describe_error(exc)}"
            ) from None
        return answer.get("SecretString")

    return lookup


def airflow_options(
    cfg, env: Mapping[str, str], source: str, clients: Any = None
) -> AirflowOptions:
    """The Airflow options of `env` (an env file's variables) as the agent reads them."""
    return AirflowOptions(
        env,
        source,
        run_command=command_runner(cfg, env),
        lookup_secret=secrets_manager_lookup(cfg, clients),
        command_refused=(
            f"the agent runs such commands only as airflow_config.command_user, which is null "
            f"in {cfg.source}"
        ),
    )


def sql_alchemy_conn(cfg) -> Optional[str]:
    """Airflow's `[database] sql_alchemy_conn` from `env.file`, read the way Airflow reads it
    (plain, `_CMD`, `_SECRET`); None when the file gives it in no form. The value is registered
    as a secret (scrubbed from every log line). AgentError when it cannot be read or resolved."""
    try:
        with open(cfg.env.file, "rb") as f:
            env = parse_env(f.read())
    except OSError as exc:
        raise AgentError(f"cannot read {cfg.env.file}: {exc.strerror}") from None
    resolved = airflow_options(cfg, env, cfg.env.file).get("database", "sql_alchemy_conn")
    if resolved is None:
        return None
    register_secrets([resolved.value])
    return resolved.value
