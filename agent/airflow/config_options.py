"""Airflow config options as Airflow 3.3 reads them from its environment, for the root agent.

The env file every Airflow unit loads may give an option in three forms, and Airflow's
`_get_env_var_option` takes the first one present, in this order:

1. `AIRFLOW__<SECTION>__<KEY>`: the value (Airflow expands `$NAME` in it from its environment;
   here from the env file's own variables, the part of that environment the agent knows);
2. `AIRFLOW__<SECTION>__<KEY>_CMD`: a command whose standard output is the value;
3. `AIRFLOW__<SECTION>__<KEY>_SECRET`: a config key looked up through the configured secrets
   backend (`[secrets] backend` / `backend_kwargs`).

Forms 2 and 3 count only for the options Airflow marks sensitive (`SENSITIVE_OPTIONS`); for any
other option Airflow ignores them, and so does this module. A present variable wins even when
its value is empty, as in Airflow. Airflow then reads airflow.cfg, its `_cmd`/`_secret` keys
and its defaults; the agent reads only the environment, so an option given nowhere in it is
"not set" here (`get` returns None) and the caller says so.

Who runs what: `option_form` is the pure precedence core. `AirflowOptions` applies it with two
injected doors. A `_CMD` command string comes from the env file, i.e. from whoever may write the
SSM parameters; Airflow runs it as the Airflow user, so that writer can already run code as that
user, but never as root. The agent therefore runs it only as `airflow_config.command_user`
(`command_runner`: through agent.platform.process with RunAs, the env file as its environment,
a timeout, never uid 0), and refuses the form when that key is null. A `_SECRET` key is looked
up by `SecretsManagerConfig` + `secrets_manager_lookup`, the agent's own implementation of the
Amazon provider's `SecretsManagerBackend.get_config` (the only backend the template uses; any
other backend is an error naming it), with the agent's instance credentials and its own AWS
endpoint: backend kwargs that would change where or as whom it calls are refused.

Values of sensitive options, whatever their form, are registered with the log scrubber (a URL's
password, not a URL without one: see `secret_parts`); messages name variables, secret ids and
error codes, never a value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from agent.errors import AgentError
from agent.logs import register_secrets

log = logging.getLogger(__name__)

PREFIX = "AIRFLOW__"
PLAIN, COMMAND, SECRET = "plain", "command", "secret"
COMMAND_SUFFIX, SECRET_SUFFIX = "_CMD", "_SECRET"

# (section, key) that Airflow 3.3.2 with the Celery provider marks `sensitive: true`
# (conf.sensitive_config_values, measured); only these honour _CMD and _SECRET
SENSITIVE_OPTIONS = frozenset(
    {
        ("api", "secret_key"),
        ("api_auth", "jwt_secret"),
        ("atlas", "password"),
        ("celery", "broker_url"),
        ("celery", "flower_basic_auth"),
        ("celery", "result_backend"),
        ("celery_broker_transport_options", "sentinel_kwargs"),
        ("celery_result_backend_transport_options", "sentinel_kwargs"),
        ("core", "asset_manager_kwargs"),
        ("core", "fernet_key"),
        ("core", "sql_alchemy_conn"),
        ("database", "sql_alchemy_conn"),
        ("database", "sql_alchemy_conn_async"),
        ("database", "sql_alchemy_engine_args"),
        ("logging", "remote_task_handler_kwargs"),
        ("opensearch", "password"),
        ("secrets", "backend_kwargs"),
        ("sentry", "sentry_dsn"),
        ("webserver", "secret_key"),
        ("workers", "secrets_backend_kwargs"),
    }
)

SECRETS_MANAGER_BACKEND = (
    "airflow.providers.amazon.aws.secrets.secrets_manager.SecretsManagerBackend"
)
# SecretsManagerBackend kwargs that do not change a config lookup (connections, variables)
IGNORED_BACKEND_KWARGS = frozenset(
    {
        "connections_prefix",
        "connections_lookup_pattern",
        "variables_prefix",
        "variables_lookup_pattern",
        "extra_conn_words",
        "full_url_mode",
        "are_secret_values_urlencoded",
    }
)
# ... and those the agent follows; anything else (endpoint_url, profile_name, role_arn, keys,
# verify, config_kwargs, ...) would choose where or as whom root calls AWS: refused
USED_BACKEND_KWARGS = frozenset({"config_prefix", "config_lookup_pattern", "sep", "region_name"})

Runner = Callable[[str, str], str]  # (variable, command) -> stdout
Lookup = Callable[["SecretsManagerConfig", str], Optional[str]]  # (backend, secret id) -> value


@dataclass
class AirflowOptionsConfig:
    """agent.yaml `airflow_config`: an option's `_CMD` form (e.g.
    AIRFLOW__CELERY__BROKER_URL_CMD) runs as `command_user`, as Airflow runs it; null refuses
    that form. Never root: the command comes from the env file (agent.config checks)."""

    command_user: Optional[str] = "airflow"
    command_timeout: float = 60.0


class OptionError(AgentError):
    """An Airflow option's form cannot be resolved the way Airflow would."""


def env_var_name(section: str, key: str) -> str:
    return f"{PREFIX}{section.replace('.', '_').upper()}__{key.upper()}"


@dataclass(frozen=True)
class Form:
    """Where an option's value comes from: its kind, the variable, and that variable's text
    (the value, the command, or the config key to look up)."""

    kind: str
    variable: str
    text: str


def option_form(env: Mapping[str, str], section: str, key: str) -> Optional[Form]:
    """The form Airflow 3.3 takes the option from in `env`, or None (pure)."""
    name = env_var_name(section, key)
    if name in env:
        return Form(PLAIN, name, env[name])
    if (section.lower(), key.lower()) not in SENSITIVE_OPTIONS:
        return None
    for kind, suffix in ((COMMAND, COMMAND_SUFFIX), (SECRET, SECRET_SUFFIX)):
        if name + suffix in env:
            return Form(kind, name + suffix, env[name + suffix])
    return None


_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """os.path.expandvars with `env` for os.environ, repeated until nothing changes, as
    Airflow's expand_env_var does (pure; an unknown name stays as written)."""

    def one(m: re.Match) -> str:
        name = m.group(1)
        name = name[1:-1] if name.startswith("{") else name
        return env.get(name, m.group(0))

    for _ in range(100):  # a self-referencing value must not loop forever
        expanded = _VAR.sub(one, text)
        if expanded == text:
            break
        text = expanded
    return text


@dataclass(frozen=True)
class SecretsManagerConfig:
    """What `SecretsManagerBackend.get_config` needs, with the provider's defaults."""

    config_prefix: Optional[str] = "airflow/config"
    config_lookup_pattern: Optional[str] = None
    sep: str = "/"
    region_name: Optional[str] = None

    def secret_id(self, key: str) -> Optional[str]:
        """The secret the provider reads for config key `key`; None when it reads none (a null
        config_prefix, or a lookup pattern the key does not match)."""
        if self.config_prefix is None:
            return None
        if self.config_lookup_pattern and not re.match(
            self.config_lookup_pattern, key, re.IGNORECASE
        ):
            return None
        # the provider strips trailing separator characters from the prefix, then joins
        prefix = self.config_prefix.rstrip(self.sep) if self.config_prefix else ""
        return f"{prefix}{self.sep}{key}" if prefix else key


def secrets_manager_config(kwargs: Mapping[str, Any], source: str) -> SecretsManagerConfig:
    """The backend's kwargs checked and reduced to a SecretsManagerConfig (pure)."""
    refused = sorted(k for k in kwargs if k not in USED_BACKEND_KWARGS | IGNORED_BACKEND_KWARGS)
    if refused:
        raise OptionError(
            f"{source}: [secrets] backend_kwargs sets {', '.join(refused)}; the agent reads "
            "config secrets with its own instance credentials at its own AWS endpoint and "
            "does not let the env file change where or as whom it calls AWS"
        )
    values: Dict[str, Any] = {}
    for name in USED_BACKEND_KWARGS:
        if name not in kwargs:
            continue
        value = kwargs[name]
        if value is not None and not isinstance(value, str):
            raise OptionError(
                f"{source}: [secrets] backend_kwargs {name} must be a string or null, "
                f"got {type(value).__name__}"
            )
        values[name] = value
    if values.get("sep") is None:
        values.pop("sep", None)
    if values.get("config_lookup_pattern"):
        try:
            re.compile(values["config_lookup_pattern"])
        except re.error as exc:
            raise OptionError(
                f"{source}: [secrets] backend_kwargs config_lookup_pattern is not a regular "
                f"expression: {exc}"
            ) from None
    return SecretsManagerConfig(**values)


@dataclass(frozen=True)
class Resolved:
    value: str
    via: str  # for messages: the variable, and the command or secret it named (never values)


class AirflowOptions:
    """Airflow options from an env file's variables, resolved as Airflow resolves them."""

    def __init__(
        self,
        env: Mapping[str, str],
        source: str = "the env file",
        run_command: Optional[Runner] = None,
        lookup_secret: Optional[Lookup] = None,
        command_refused: str = "the agent runs no _CMD command here",
    ):
        self.env = env
        self.source = source
        self.run_command = run_command
        self.lookup_secret = lookup_secret
        self.command_refused = command_refused
        self._backend: Optional[Tuple[Optional[SecretsManagerConfig]]] = None

    def form(self, section: str, key: str) -> Optional[Form]:
        return option_form(self.env, section, key)

    def get(self, section: str, key: str) -> Optional[Resolved]:
        """The option's value, or None when the environment gives it in no form Airflow reads.
        OptionError when a form is present but cannot be resolved."""
        form = self.form(section, key)
        if form is None:
            return None
        sensitive = (section.lower(), key.lower()) in SENSITIVE_OPTIONS
        if form.kind == PLAIN:
            resolved = Resolved(expand_vars(form.text, self.env), form.variable)
        elif form.kind == COMMAND:
            resolved = Resolved(self._command(form), f"{form.variable} (its command's output)")
        else:
            resolved = self._secret(form, section, key)
        if sensitive:
            register_secrets(secret_parts(resolved.value))
        return resolved

    def _command(self, form: Form) -> str:
        if self.run_command is None:
            raise OptionError(f"{self.source} sets {form.variable}; {self.command_refused}")
        return self.run_command(form.variable, form.text)

    def backend(self) -> Optional[SecretsManagerConfig]:
        """The configured secrets backend (None: none configured), checked once."""
        if self._backend is None:
            self._backend = (self._read_backend(),)
        return self._backend[0]

    def _read_backend(self) -> Optional[SecretsManagerConfig]:
        # [secrets] backend is not sensitive: only its plain form counts
        name = env_var_name("secrets", "backend")
        cls = self.env.get(name, "").strip()
        if not cls:
            return None
        if cls != SECRETS_MANAGER_BACKEND:
            shown = cls if re.fullmatch(r"[\w.]+", cls) else "<not a class path>"
            raise OptionError(
                f"{self.source}: {name} is {shown!r}; the agent reads config secrets only "
                f"through {SECRETS_MANAGER_BACKEND}"
            )
        form = self.form("secrets", "backend_kwargs")
        if form is not None and form.kind == SECRET:
            # Airflow would ask the backend for its own kwargs
            raise OptionError(
                f"{self.source} sets {form.variable}: the backend's kwargs cannot come "
                "through the backend itself"
            )
        resolved = self.get("secrets", "backend_kwargs")
        kwargs: Dict[str, Any] = {}
        if resolved is not None and resolved.value.strip():
            try:
                parsed = json.loads(resolved.value)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                kwargs = parsed
            else:
                # Airflow warns and goes on with no kwargs (the provider's defaults); so do we
                log.warning(
                    "%s: %s is not a JSON object; using the backend's defaults, as Airflow does",
                    self.source,
                    resolved.via,
                )
        # per-key overrides (raw strings) win over the JSON, as in Airflow
        override = env_var_name("secrets", "backend_kwarg") + "__"
        for var, value in self.env.items():
            if var.startswith(override) and len(var) > len(override):
                kwargs[var[len(override) :].lower()] = value
        backend = secrets_manager_config(kwargs, self.source)
        if backend.region_name is None and self.env.get("AWS_DEFAULT_REGION"):
            # without region_name the provider's boto3 takes the process's AWS_DEFAULT_REGION,
            # which Airflow's units get from this file (a region only picks AWS's endpoint)
            backend = dataclasses.replace(backend, region_name=self.env["AWS_DEFAULT_REGION"])
        return backend

    def _secret(self, form: Form, section: str, key: str) -> Resolved:
        backend = self.backend()
        if backend is None:
            raise OptionError(
                f"{self.source} sets {form.variable} but no secrets backend "
                f"({env_var_name('secrets', 'backend')}); Airflow would not look it up"
            )
        secret_id = backend.secret_id(form.text)
        if secret_id is None:
            raise OptionError(
                f"{self.source} sets {form.variable}, but the backend's config_prefix is null "
                "or its config_lookup_pattern does not match the key: Airflow does not look "
                "it up"
            )
        if self.lookup_secret is None:
            raise OptionError(
                f"{self.source} sets {form.variable}; the agent cannot read Secrets Manager here"
            )
        value = self.lookup_secret(backend, secret_id)
        if value is None:
            raise OptionError(
                f"{form.variable} in {self.source}: Secrets Manager has no secret string "
                f"{secret_id!r} (Airflow would take [{section}] {key} as not set)"
            )
        return Resolved(value, f"{form.variable} (Secrets Manager secret {secret_id})")


def secret_parts(value: str) -> List[str]:
    """What of a sensitive option's value the log scrubber must hide: a URL's password (and the
    URL holding it), not a URL without one (`sqs://`, a host name: what logs name to say where);
    anything else whole (a key, a JSON of kwargs)."""
    if "://" not in value:
        return [value]
    out: List[str] = []
    for part in value.split(";"):  # Celery's failover list
        try:
            password = urllib.parse.urlsplit(part.strip()).password
        except ValueError:
            return [value]
        if password:
            out += [part.strip(), password, urllib.parse.unquote(password)]
    return out


def split_command(variable: str, command: str) -> list:
    """Airflow's run_command: shlex.split, no shell."""
    try:
        argv = shlex.split(command)
    except ValueError:
        raise OptionError(f"{variable}: the command cannot be split into words") from None
    if not argv:
        raise OptionError(f"{variable}: the command is empty")
    return argv
