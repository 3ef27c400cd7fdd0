"""The one place AWS clients are made.

boto3 already honours AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_<SERVICE>; what it does not do is
take the region from instance metadata, so the factory asks IMDS when neither agent.yaml nor
the environment names one. Every client uses botocore's adaptive retry mode, which backs off
on throttling and client-side rate-limits itself.

Retries in layers: botocore's (aws.max_attempts in all, per call) are the inner layer for every
client and stay as they are. A job that must outlast a throttled account adds its own outer
loop on top, which takes over only once botocore has given up on a throttling error: env sync's
fetch (agent.jobs.env_sync.pacing) retries the same page with full-jitter backoff until
env.fetch_deadline, so one page may be attempted max_attempts times per outer attempt.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import boto3
import botocore.config
import botocore.exceptions

from agent.errors import AgentError
from agent.platform.imds import ImdsClient

log = logging.getLogger(__name__)


class AwsClients:
    def __init__(self, cfg, imds: Optional[ImdsClient] = None):
        self._cfg = cfg
        self._imds = imds
        self._region: Optional[str] = None
        self._session: Optional[boto3.session.Session] = None
        self._clients: Dict[str, Any] = {}

    @property
    def imds(self) -> ImdsClient:
        if self._imds is None:
            self._imds = ImdsClient.from_config(self._cfg)
        return self._imds

    def region(self) -> str:
        if self._region is None:
            self._region = (
                self._cfg.aws.region
                or os.environ.get("AWS_REGION")
                or os.environ.get("AWS_DEFAULT_REGION")
                or self.imds.region()
            )
        return self._region

    def client(self, service: str) -> Any:
        if service not in self._clients:
            if self._session is None:
                self._session = boto3.session.Session(region_name=self.region())
            config = botocore.config.Config(
                retries={"mode": "adaptive", "total_max_attempts": self._cfg.aws.max_attempts},
                connect_timeout=self._cfg.aws.connect_timeout,
                read_timeout=self._cfg.aws.read_timeout,
                user_agent_extra="airflow-ec2-agent",
            )
            self._clients[service] = self._session.client(service, config=config)
        return self._clients[service]


def describe_error(exc: BaseException) -> str:
    """A one-line, value-free description of a boto error for logs and exit messages."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'Error')}: {err.get('Message', '')}".strip()
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"endpoint unreachable ({exc.kwargs.get('endpoint_url', '')})"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no AWS credentials found (instance profile, environment or config)"
    if isinstance(exc, AgentError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
