"""The agent's configuration: one typed object loaded from agent.yaml, defaults in one place.

`load_config(path)` returns an `AgentConfig` (its defaults are the README's contract); an unknown
key, a wrong type or a bad value raises `ConfigError` naming the dotted key and the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from agent.airflow.config_options import AirflowOptionsConfig
from agent.airflow.restart_slot_plan import CoordinationConfig, check_coordination
from agent.config_file import ConfigFile, config_sha256, parse_yaml, read_config_file
from agent.config_schema import build
from agent.errors import ConfigError
from agent.jobs.env_sync.plan import refused_variable
from agent.jobs.metrics.config import MetricsConfig, check_metrics
from agent.jobs.task_credentials.config import TaskCredentialsConfig, check_task_credentials
from agent.jobs.worker_db.config import WorkerDbConfig, check_worker_db
from agent.platform.target_group_config import TargetGroupConfig, check_target_group

DEFAULT_CONFIG_PATH = "/etc/airflow-agent/agent.yaml"
CONFIG_ENV_VAR = "AIRFLOW_AGENT_CONFIG"

ROLES = ("scheduler", "webserver", "worker")

DEFAULT_UNITS: Dict[str, List[str]] = {
    "scheduler": ["airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"],
    "webserver": ["airflow-api-server"],
    "worker": ["airflow-worker"],
}
_TASK_CREDENTIALS = "airflow-agent-task-credentials.timer"
DEFAULT_AGENT_UNITS: Dict[str, List[str]] = {
    "scheduler": [
        "airflow-agent-env",
        "airflow-agent-confapply",
        "airflow-agent-variables.timer",
        _TASK_CREDENTIALS,  # every role: the task role's credentials (agent.jobs.task_credentials)
        "airflow-agent-metrics",  # one publisher per cluster (agent.jobs.metrics)
    ],
    "webserver": ["airflow-agent-env", "airflow-agent-confapply", _TASK_CREDENTIALS],
    "worker": [
        "airflow-agent-env",
        "airflow-agent-confapply",
        "airflow-agent-lifecycle",
        _TASK_CREDENTIALS,
    ],
}

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _choice(*allowed: Any) -> Dict[str, Any]:
    return {"choices": allowed}


@dataclass
class RoleConfig:
    override: Optional[str] = field(default=None, metadata=_choice(None, *ROLES))
    tag: str = "airflow:role"
    # Auto Scaling group name or aws:cloudformation:logical-id glob pattern -> role
    groups: Dict[str, str] = field(default_factory=dict)


@dataclass
class EnvConfig:
    file: str = "/etc/sysconfig/airflow.env"
    ssm_paths: List[str] = field(default_factory=lambda: ["/airflow/prod/"])
    static: Dict[str, str] = field(
        default_factory=lambda: {"AIRFLOW_HOME": "/airflow"},
        repr=False,  # values may be secret
    )
    required: List[str] = field(default_factory=list)
    max_drop_fraction: float = 0.2
    owner: str = "root"
    group: str = "airflow"
    mode: str = "0640"
    # how long a run waits for another one to finish (the boot unit allows 300 s in all)
    lock_timeout: float = 120.0
    # fleet scale (agent.jobs.env_sync.pacing). `env sync --splay` first waits a random 0..splay
    # s, so a fleet triggered at once (cfn-hup, Run Command) spreads its SSM calls; boot: none
    splay: float = 30.0
    # a throttled SSM call is retried (full-jitter backoff, at most backoff_cap s per wait)
    # until this long after the run's first call; 0: only botocore's aws.max_attempts. With
    # lock_timeout it fits the boot unit's 300 s; at SSM's 40 TPS: ~150 * 40 / pages instances
    fetch_deadline: float = 150.0
    backoff_cap: float = 8.0

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


@dataclass
class ConfapplyConfig:
    # files besides env.file whose content change restarts the role's units
    watch: List[str] = field(default_factory=list)
    debounce: float = 2.0
    max_wait: float = 15.0
    # how long each restarted unit may take to become active
    unit_timeout: float = 120.0
    watchdog_interval: float = 10.0
    # re-hash this often without an event: retries a failed apply, covers a missed event
    recheck_interval: float = 60.0


@dataclass
class VariablesConfig:
    secret_id: Optional[str] = None
    airflow_command: List[str] = field(default_factory=lambda: ["/opt/airflow/venv/bin/airflow"])
    # the environment the Airflow CLI runs with; null means env.file
    env_file: Optional[str] = None
    user: Optional[str] = "airflow"
    timeout: float = 300.0
    # api: a co-process in the Airflow venv's python writes through airflow.models.Variable
    # and verifies by digest; cli: `airflow variables import` of a 0600 file + export
    method: str = field(default="api", metadata=_choice("api", "cli"))
    # the Airflow venv's interpreter (api); null means the `python` beside airflow_command[0]
    airflow_python: Optional[str] = None
    # `variables watch`: seconds between GetSecretValue polls
    watch_interval: float = 30.0


@dataclass
class DrainConfig:
    timeout: float = 3000.0
    on_deadline: str = field(default="fail", metadata=_choice("fail", "stop"))
    # Celery node name of the local worker; null means celery@<hostname>
    node_name: Optional[str] = None
    # each poll asks the worker twice (active, reserved) and returns on its reply
    poll_interval: float = 1.0
    worker_unit: str = "airflow-worker"
    # how long a running worker may take to answer remote control (it may still be starting)
    # before the drain falls back to a warm shutdown through systemctl stop
    reply_timeout: float = 30.0
    # how long an idle worker's `systemctl stop` may take
    stop_timeout: float = 120.0


@dataclass
class LifecycleConfig:
    hook_name: Optional[str] = None
    # null: read from the instance tag aws:autoscaling:groupName
    group_name: Optional[str] = None
    poll_interval: float = 5.0
    spot_margin: float = 20.0
    rebalance: str = field(default="ignore", metadata=_choice("ignore", "stop-consuming"))
    scale_in_protection: bool = False
    idle_before_unprotect: float = 300.0
    # null: HeartbeatTimeout/3 capped at 300 s; an override is capped at HeartbeatTimeout/2
    heartbeat_interval: Optional[float] = None
    # stop heartbeating and complete this long before the hook's global timeout
    complete_margin: float = 60.0
    # null: hold a termination up to the global timeout; else at most this many seconds
    max_wait: Optional[float] = None


@dataclass
class DeployConfig:
    # a file CodeDeploy's bundle installs; a worker without it is not started at boot
    first_revision_marker: str = "/airflow/.deployed-revision"
    boot_gate: bool = True
    validate_timeout: float = 300.0
    # AfterInstall: the installed tree is chowned to this user/group (CodeDeploy copies as root)
    owner: str = "airflow"
    group: str = "airflow"
    # AfterInstall: `airflow dags list-import-errors --local` fails the deploy on an import error
    check_import_errors: bool = True
    airflow_command: List[str] = field(default_factory=lambda: ["/opt/airflow/venv/bin/airflow"])
    check_timeout: float = 600.0
    # ValidateService on the webserver role: this URL must answer 200
    health_url: Optional[str] = "http://127.0.0.1:8080/api/v2/monitor/health"


@dataclass
class AwsConfig:
    region: Optional[str] = None
    max_attempts: int = 6  # total attempts per call, the first included
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


@dataclass
class ImdsConfig:
    # null: AWS_EC2_METADATA_SERVICE_ENDPOINT or http://169.254.169.254/
    endpoint: Optional[str] = None
    timeout: float = 1.0
    attempts: int = 3
    token_ttl: int = 21600


@dataclass
class AgentConfig:
    cluster: str = "prod"
    state_dir: str = "/var/lib/airflow-agent"
    airflow_home: str = "/airflow"
    systemctl: List[str] = field(default_factory=lambda: ["systemctl"])
    role: RoleConfig = field(default_factory=RoleConfig)
    units: Dict[str, List[str]] = field(default_factory=dict)
    agent_units: Dict[str, List[str]] = field(default_factory=dict)
    env: EnvConfig = field(default_factory=EnvConfig)
    confapply: ConfapplyConfig = field(default_factory=ConfapplyConfig)
    variables: VariablesConfig = field(default_factory=VariablesConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    airflow_config: AirflowOptionsConfig = field(default_factory=AirflowOptionsConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    imds: ImdsConfig = field(default_factory=ImdsConfig)
    task_credentials: TaskCredentialsConfig = field(default_factory=TaskCredentialsConfig)
    worker_db: WorkerDbConfig = field(default_factory=WorkerDbConfig)
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    target_group: TargetGroupConfig = field(default_factory=TargetGroupConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})  # for errors; no key
    # set by load_config (not a field: no key, not in asdict); the daemons watch it
    loaded_from = None  # Optional[ConfigFile]

    def units_for(self, role: str) -> List[str]:
        """The role's Airflow units, in start order."""
        return list(self.units.get(role, DEFAULT_UNITS[role]))

    def agent_units_for(self, role: str) -> List[str]:
        return list(self.agent_units.get(role, DEFAULT_AGENT_UNITS[role]))


# Durations a zero or negative value would turn into a busy loop (a poll, a re-check, a
# heartbeat every instant) or an instant failure (a timeout): they must be > 0.
POSITIVE_KEYS = (
    "confapply.debounce",
    "confapply.max_wait",
    "confapply.unit_timeout",
    "confapply.watchdog_interval",
    "confapply.recheck_interval",
    "variables.timeout",
    "variables.watch_interval",
    "drain.timeout",
    "drain.poll_interval",
    "drain.reply_timeout",
    "drain.stop_timeout",
    "lifecycle.poll_interval",
    "lifecycle.heartbeat_interval",
    "deploy.validate_timeout",
    "deploy.check_timeout",
    "airflow_config.command_timeout",
    "task_credentials.refresh_before",
    "worker_db.timeout",
    "env.backoff_cap",
    "aws.max_attempts",
    "aws.connect_timeout",
    "aws.read_timeout",
    "imds.timeout",
    "imds.attempts",
)
MAX_SPLAY = 3600.0
# margins and waits where 0 means "none" (no wait, no margin), which loops nothing
NON_NEGATIVE_KEYS = (
    "env.lock_timeout",
    "env.splay",
    "env.fetch_deadline",
    "lifecycle.spot_margin",
    "lifecycle.idle_before_unprotect",
    "lifecycle.complete_margin",
    "lifecycle.max_wait",
)


def _value(cfg: AgentConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _numbers(obj: Any, prefix: str = "") -> List[tuple]:
    """(dotted key, value) of every float in the config tree."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _numbers(value, key + ".")
        elif isinstance(value, float):
            out.append((key, value))
    return out


def _validate(cfg: AgentConfig) -> None:
    src = cfg.source

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{src}: key '{key}' {why}")

    if not cfg.env.ssm_paths:
        fail("env.ssm_paths", "must list at least one SSM path")
    for i, p in enumerate(cfg.env.ssm_paths):
        if not p.startswith("/") or not p.endswith("/"):
            fail(f"env.ssm_paths[{i}]", f"must start and end with '/', got {p!r}")
    for name in list(cfg.env.static) + cfg.env.required:
        if not _ENV_NAME.match(name):
            fail("env.static/env.required", f"has an invalid variable name {name!r}")
    for name in cfg.env.static:
        why = refused_variable(name)
        if why:
            fail(f"env.static.{name}", f"sets {why}; the env file never carries it")
    for i, name in enumerate(cfg.env.required):
        why = refused_variable(name)
        if why:
            fail(f"env.required[{i}]", f"names {why}; the env file never carries it")
    if not 0.0 <= cfg.env.max_drop_fraction <= 1.0:
        fail("env.max_drop_fraction", f"must be between 0 and 1, got {cfg.env.max_drop_fraction}")
    if not re.fullmatch(r"0?[0-7]{3}", cfg.env.mode):
        fail("env.mode", f'must be an octal mode string like "0640", got {cfg.env.mode!r}')
    if cfg.env.mode_bits & 0o007:
        fail("env.mode", f"must not give access to others (secrets), got {cfg.env.mode!r}")
    if cfg.env.mode_bits & 0o020:
        # the group (airflow) could rewrite what root's units and the agent read
        fail("env.mode", f"must not let the group write the file, got {cfg.env.mode!r}")
    for key, number in _numbers(cfg):
        if not math.isfinite(number):
            fail(key, f"must be a finite number, got {number}")
    for key in POSITIVE_KEYS:
        value = _value(cfg, key)
        if value is not None and not value > 0:
            fail(key, f"must be positive (zero or less would loop or fail at once), got {value}")
    for key in NON_NEGATIVE_KEYS:
        value = _value(cfg, key)
        if value is not None and not value >= 0:
            fail(key, f"must be zero or more, got {value}")
    for role, units in list(cfg.units.items()) + list(cfg.agent_units.items()):
        if role not in ROLES:
            fail(f"units.{role}", f"is not a role; roles are {', '.join(ROLES)}")
        if not units:
            fail(f"units.{role}", "must list at least one unit")
    for pattern, role in cfg.role.groups.items():
        if role not in ROLES:
            fail(f"role.groups.{pattern}", f"maps to {role!r}; roles are {', '.join(ROLES)}")
    if cfg.env.splay > MAX_SPLAY:
        # a run waits this long first: beyond an hour it outlives Run Command's timeout
        fail("env.splay", f"must be at most {MAX_SPLAY:g} seconds, got {cfg.env.splay:g}")
    if cfg.confapply.max_wait < cfg.confapply.debounce:
        fail("confapply.max_wait", "must be >= confapply.debounce")
    if not 1 <= cfg.imds.token_ttl <= 21600:
        fail("imds.token_ttl", "must be 1..21600 seconds")
    if not cfg.systemctl:
        fail("systemctl", "must be a command")
    tc, wdb, tg = cfg.task_credentials, cfg.worker_db, cfg.target_group
    checks = (check_task_credentials(tc), check_worker_db(wdb), check_target_group(tg))
    for bad in (*checks, check_coordination(cfg.coordination, ROLES), check_metrics(cfg.metrics)):
        if bad:
            fail(*bad)
    if cfg.airflow_config.command_user in ("root", "0", ""):
        fail(
            "airflow_config.command_user",
            "must not be root: the commands come from the env file (null refuses them)",
        )


def config_from_dict(data: Optional[Dict[str, Any]], source: str = "<dict>") -> AgentConfig:
    """Build and validate a config from already-parsed YAML data."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    cfg = build(AgentConfig, data, "", source)
    cfg.source = source
    _validate(cfg)
    return cfg


def resolve_config_path(cli_path: Optional[str]) -> str:
    return cli_path or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


def load_config(path: Optional[str] = None) -> AgentConfig:
    """Load agent.yaml from `path`, $AIRFLOW_AGENT_CONFIG or the default path.

    A missing file at the *default* path means defaults (a fresh instance before cfn-init);
    a missing file that was named explicitly is an error. `cfg.loaded_from` records the file
    and the hash of what was read.
    """
    named = path or os.environ.get(CONFIG_ENV_VAR)
    resolved = resolve_config_path(path)
    data = read_config_file(resolved, bool(named))
    if data is None:
        cfg = config_from_dict({}, source=f"{resolved} (absent; defaults)")
    else:
        cfg = parse_config(data, resolved)
    cfg.loaded_from = ConfigFile(resolved, config_sha256(data), bool(named))
    return cfg


def parse_config(data: bytes, path: str) -> AgentConfig:
    """A config from a file's bytes (ConfigError naming the file and what is wrong)."""
    return config_from_dict(parse_yaml(data, path), source=path)
