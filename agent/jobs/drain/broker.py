"""Which Celery worker a drain talks to, and how: the node name and the worker's broker
settings, read from the env file every Airflow unit reads (Airflow is not imported), each
option resolved as Airflow resolves it: `AIRFLOW__CELERY__BROKER_URL`, else its `_CMD` form
(run as `airflow_config.command_user`, never root), else its `_SECRET` form through the
configured Secrets Manager backend with the agent's instance credentials
(agent.airflow.config_options; the template gives workers only the `_SECRET` form).

Shared by drain/undrain, `lifecycle watch` (busy counts) and the deploy hook (worker ping),
through agent/jobs/drain/control.worker_control.

The file is written from SSM parameters and these callers run as root, so it is read as data
(agent/platform/envfile.parse_env), never loaded into the process environment (no root unit
has `EnvironmentFile=`), and the broker URL may only name a transport of kombu's own that the
agent knows: kombu resolves a URL scheme holding `.` or `:` as a module to import, a redis
URL's `credential_provider` query as a class to import and instantiate, and the `filesystem`
transport writes message files wherever its options say; none of that may be chosen by a
parameter writer in a root process. The URL a command or a secret yields is checked the same
way as a plain one.

Resolved settings are kept for `CACHE_SECONDS` per env-file content, so a daemon asking every
poll (lifecycle watch's busy count) does not call Secrets Manager or run a command each time;
a changed file is read afresh at once.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from agent.airflow.option_sources import airflow_options
from agent.errors import AgentError
from agent.logs import register_secrets
from agent.platform.envfile import parse_env
from agent.worker.celery_control import BROKER_URL_VAR, BrokerSettings, broker_settings

CACHE_SECONDS = 60.0
# (env file path, its sha256) -> (monotonic time read, settings)
_cache: Dict[Tuple[str, str], Tuple[float, BrokerSettings]] = {}
_cache_lock = threading.Lock()

# Airflow's Celery brokers (Redis, Sentinel, RabbitMQ, SQS) and kombu's in-process transport
ALLOWED_SCHEMES = frozenset(
    {"redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps", "pyamqp", "sqs", "memory"}
)
# URL query keys kombu/redis-py turn into an import or a class
FORBIDDEN_QUERY_KEYS = frozenset({"credential_provider", "connection_class"})


def node_name(cfg) -> str:
    return cfg.drain.node_name or f"celery@{socket.gethostname()}"


def broker_url_problem(url: str) -> str:
    """Why the agent (root) will not connect to `url`, or "" (pure). Never quotes the URL: it
    may hold a password."""
    # Celery takes `;`-separated failover URLs; kombu resolves each one's transport
    for n, part in enumerate(p.strip() for p in url.split(";")):
        which = f"URL {n + 1}" if ";" in url else "the URL"
        if "://" not in part:
            return f"{which} has no scheme://"
        scheme = part.split("://", 1)[0].lower()
        if scheme not in ALLOWED_SCHEMES:
            shown = scheme if scheme.replace("+", "").isalnum() else "<not a transport name>"
            return (
                f"{which} names transport {shown!r}; the agent connects only to "
                f"{', '.join(sorted(ALLOWED_SCHEMES))}"
            )
        try:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(part).query)
        except ValueError:
            return f"{which} cannot be parsed"
        bad = sorted(k for k in query if k.lower() in FORBIDDEN_QUERY_KEYS)
        if bad:
            return f"{which} sets {', '.join(bad)}, which would make the agent import code"
    return ""


def read_broker(cfg, clients: Any = None) -> BrokerSettings:
    """The worker's broker settings from the env file every Airflow unit reads. `clients`:
    the caller's AwsClients, for a `_SECRET` form (else one is made when needed)."""
    path = Path(cfg.env.file)
    try:
        data = path.read_bytes()
        env = parse_env(data)
    except FileNotFoundError:
        raise AgentError(f"{path} not found: run `airflow-agent env sync` first") from None
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise AgentError(f"{path} is not a valid env file: {exc}") from None
    key = (str(path), hashlib.sha256(data).hexdigest())
    cached = _cached(key)
    if cached is not None:
        return cached
    settings = broker_settings(
        env, source=str(path), options=airflow_options(cfg, env, str(path), clients)
    )
    # the URL's password is the secret (a bare "sqs://" is not worth scrubbing from logs)
    password = urllib.parse.urlsplit(settings.url).password
    if password:
        register_secrets([settings.url, password])
    problem = broker_url_problem(settings.url)
    if problem:
        raise AgentError(f"{BROKER_URL_VAR} in {path}: {problem}; refusing to use it")
    with _cache_lock:
        _cache.clear()  # one env file per agent: keep only the latest
        _cache[key] = (time.monotonic(), settings)
    return settings


def _cached(key: Tuple[str, str]) -> Optional[BrokerSettings]:
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
        return hit[1]
    return None
