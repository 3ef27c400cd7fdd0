"""Which Celery worker a drain talks to, and how: the node name and the worker's broker
settings, read from the env file every Airflow unit reads (Airflow is not imported).

Shared by drain/undrain, `lifecycle watch` (busy counts) and the deploy hook (worker ping);
`worker_control()` is how each of them gets its WorkerControl, so every remote-control call
waits `drain.reply_timeout` for the worker's reply.
"""

from __future__ import annotations

import socket
import urllib.parse
from pathlib import Path
from typing import Optional

from agent.errors import AgentError
from agent.logs import register_secrets
from agent.platform.envfile import parse_env
from agent.worker.celery_control import BrokerSettings, WorkerControl, broker_settings


def node_name(cfg) -> str:
    return cfg.drain.node_name or f"celery@{socket.gethostname()}"


def read_broker(cfg) -> BrokerSettings:
    """The worker's broker settings from the env file every Airflow unit reads."""
    path = Path(cfg.env.file)
    try:
        env = parse_env(path.read_bytes())
    except FileNotFoundError:
        raise AgentError(f"{path} not found: run `airflow-agent env sync` first") from None
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise AgentError(f"{path} is not a valid env file: {exc}") from None
    settings = broker_settings(env, source=str(path))
    # the URL's password is the secret (a bare "sqs://" is not worth scrubbing from logs)
    password = urllib.parse.urlsplit(settings.url).password
    if password:
        register_secrets([settings.url, password])
    return settings


def worker_control(cfg, settings: Optional[BrokerSettings] = None) -> WorkerControl:
    """Remote control of the local worker, replies awaited for `drain.reply_timeout` seconds."""
    return WorkerControl(
        settings if settings is not None else read_broker(cfg),
        node_name(cfg),
        reply_timeout=cfg.drain.reply_timeout,
    )
