"""Celery remote control of the local worker, without importing Airflow.

A bare `celery.Celery` app is built from the worker's own broker settings (read from the env
file every Airflow unit uses, each option in the form Airflow takes it: the plain variable,
else `_CMD`, else `_SECRET` through the secrets backend; see agent.airflow.config_options),
and talks to one node only (`destination=[node]`), so a drain on
one instance never touches another instance's worker. Every call is bounded:

- the broker connection is made explicitly with one attempt and a connect timeout, so an
  unreachable broker is a `BrokerUnreachable` in seconds, not kombu's endless retry loop;
- replies are awaited for `reply_timeout` seconds with `limit=1` (one node answers, so the
  call returns as soon as it has), and no reply is `NoReply` — Celery's "No nodes replied".
  The timeout is the operator's `drain.reply_timeout` (agent.jobs.drain.broker.worker_control
  builds every WorkerControl the agent uses): a loaded worker may take seconds to answer, and
  a long timeout costs nothing when it does answer, because the call returns on the reply.

What a running task is, as the agent keeps it: `inspect active` replies carry each task's
arguments, and Airflow 3's `execute_workload` argument is the workload JSON with the task's
execution-API token in it. `active_tasks()` is the one door through which running tasks enter
the agent, and it keeps only `safe_task()`'s form (name, id, start time, worker pid, and for an
Airflow workload its type and task-instance identity): arguments never reach a log line, a
state file or `status`.

Celery is imported lazily: only the `worker` extra (`celery[redis]==5.6.3`) brings it, and
only drain/undrain/deploy-hook on a worker need it.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from agent.airflow.config_options import AirflowOptions, OptionError
from agent.errors import AgentError
from agent.worker.tasks import safe_task

log = logging.getLogger(__name__)

BROKER_URL_VAR = "AIRFLOW__CELERY__BROKER_URL"
TRANSPORT_OPTIONS_PREFIX = "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__"
# Brokers whose kombu transport has no fanout/reply queues, hence no remote control.
NO_REMOTE_CONTROL_SCHEMES = ("sqs",)

CONNECT_TIMEOUT = 4.0
# for callers polling a worker in a loop (tests' rigs): the agent itself always passes the
# configured drain.reply_timeout (agent.jobs.drain.control.worker_control)
DEFAULT_REPLY_TIMEOUT = 1.0


class ControlError(AgentError):
    """Remote control of the worker failed."""


class BrokerUnreachable(ControlError):
    """The broker did not accept a connection."""


class NoReply(ControlError):
    """The node did not answer within the reply timeout."""


@dataclass(frozen=True)
class BrokerSettings:
    url: str
    transport_options: Dict[str, Any]

    @property
    def scheme(self) -> str:
        return urllib.parse.urlsplit(self.url).scheme.lower()

    @property
    def remote_control(self) -> bool:
        return self.scheme.split("+")[0] not in NO_REMOTE_CONTROL_SCHEMES

    @property
    def redacted(self) -> str:
        """scheme://host:port/..., for logs: never the credentials."""
        return redact_url(self.url)


def redact_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable broker URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _option_value(text: str) -> Any:
    """Airflow's transport options arrive as strings; kombu wants numbers/bools where it
    compares or sleeps (visibility_timeout, socket_timeout, ...)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"[+-]?\d+", text.strip()):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", text.strip()):
        return float(text)
    return text


def broker_settings(
    env: Mapping[str, str], source: str = "the env file", options: Optional[AirflowOptions] = None
) -> BrokerSettings:
    """The worker's broker URL and transport options from its environment, each option in
    the form Airflow takes it (agent.airflow.config_options: plain, `_CMD`, `_SECRET`).

    `options` is the AirflowOptions to resolve with (it runs commands and reads secrets);
    without one only plain values resolve (pure), and an indirect form is an error naming it.
    """
    if options is None:
        options = AirflowOptions(
            env, source, command_refused="resolve it with the agent's AirflowOptions"
        )
    try:
        resolved = options.get("celery", "broker_url")
    except OptionError as exc:
        raise ControlError(str(exc)) from None
    url = resolved.value.strip() if resolved is not None else ""
    if not url:
        what = f"{resolved.via} gives an empty URL" if resolved else f"has no {BROKER_URL_VAR}"
        raise ControlError(
            f"{source} {what} (nor its _CMD or _SECRET form): cannot reach the worker's broker"
        )
    transport: Dict[str, Any] = {}
    section = "celery_broker_transport_options"
    for key in sorted(env):
        if not key.startswith(TRANSPORT_OPTIONS_PREFIX) or len(key) <= len(
            TRANSPORT_OPTIONS_PREFIX
        ):
            continue
        name = key[len(TRANSPORT_OPTIONS_PREFIX) :]
        # Airflow's getsection: a `_CMD` variable names its option without the suffix
        # (resolved only for a sensitive one, else Airflow fails); any other name is the
        # option's plain value, `_SECRET` suffix included
        if name.endswith("_CMD"):
            name = name[: -len("_CMD")]
        try:
            got = options.get(section, name.lower())
        except OptionError as exc:
            raise ControlError(str(exc)) from None
        if got is None:
            raise ControlError(
                f"{source} sets {key}, which Airflow cannot resolve ([{section}] "
                f"{name.lower()} takes no command)"
            )
        transport[name.lower()] = _option_value(got.value)
    return BrokerSettings(url=url, transport_options=transport)


@dataclass(frozen=True)
class QueueSpec:
    """A queue a worker consumes, as `inspect active_queues` reports it (enough to re-add)."""

    name: str
    exchange: Optional[str] = None
    exchange_type: str = "direct"
    routing_key: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "exchange": self.exchange,
            "exchange_type": self.exchange_type,
            "routing_key": self.routing_key,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QueueSpec:
        return cls(
            name=str(data["name"]),
            exchange=data.get("exchange"),
            exchange_type=data.get("exchange_type") or "direct",
            routing_key=data.get("routing_key"),
        )

    @classmethod
    def from_active_queues(cls, item: Mapping[str, Any]) -> QueueSpec:
        exchange = item.get("exchange") or {}
        return cls(
            name=str(item.get("name")),
            exchange=exchange.get("name") if isinstance(exchange, dict) else None,
            exchange_type=(exchange.get("type") if isinstance(exchange, dict) else None)
            or "direct",
            routing_key=item.get("routing_key"),
        )


class WorkerControl:
    """Remote control of one Celery node through a bare Celery app on the worker's broker."""

    def __init__(
        self, settings: BrokerSettings, node: str, reply_timeout: float = DEFAULT_REPLY_TIMEOUT
    ):
        if not reply_timeout > 0:
            raise ControlError(f"remote control reply timeout must be positive: {reply_timeout!r}")
        self.settings = settings
        self.node = node
        self.reply_timeout = reply_timeout
        self._app = None
        self._conn = None

    # -- plumbing ----------------------------------------------------------------------------

    def _connection(self):
        if self._conn is not None:
            return self._conn
        try:
            from celery import Celery
        except ImportError:
            raise ControlError(
                "celery is not installed in the agent's environment "
                "(install the agent with its 'worker' extra: celery[redis]==5.6.3)"
            ) from None
        opts = dict(self.settings.transport_options)
        if self.settings.scheme.startswith(("redis", "rediss")):
            # bound every socket operation: a dead broker must not hang a drain
            opts.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
            opts.setdefault("socket_timeout", max(10.0, self.reply_timeout * 2))
        app = Celery("airflow-agent-control", set_as_current=False)
        app.conf.update(
            broker_url=self.settings.url,
            broker_transport_options=opts,
            broker_connection_timeout=CONNECT_TIMEOUT,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
            broker_pool_limit=None,
        )
        conn = app.connection_for_write()
        try:
            conn.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT)
        except Exception as exc:  # kombu raises the transport's own errors; any means "down"
            conn.release()
            raise BrokerUnreachable(
                f"broker {self.settings.redacted} unreachable: {type(exc).__name__}: "
                f"{_scrub(str(exc), self.settings.url)}"
            ) from None
        self._app, self._conn = app, conn
        return conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception as exc:  # closing a dead connection may fail; nothing to keep
                log.debug("closing the broker connection: %s", type(exc).__name__)
        self._conn = None
        self._app = None

    def __enter__(self) -> WorkerControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn):
        conn = self._connection()
        try:
            return fn(self._app, conn)
        except ControlError:
            raise
        except Exception as exc:
            # a broken connection: drop it so the next call reconnects (bounded again)
            self.close()
            raise BrokerUnreachable(
                f"{what} to {self.node} via {self.settings.redacted} failed: "
                f"{type(exc).__name__}: {_scrub(str(exc), self.settings.url)}"
            ) from None

    def _inspect(self, method: str, timeout: Optional[float] = None) -> Any:
        def call(app, conn):
            insp = app.control.inspect(
                destination=[self.node],
                timeout=timeout or self.reply_timeout,
                limit=1,
                connection=conn,
            )
            return getattr(insp, method)()

        replies = self._call(f"inspect {method}", call) or {}
        if self.node not in replies:
            raise NoReply(
                f"{self.node} did not reply to '{method}' within {timeout or self.reply_timeout:g}s"
            )
        return replies[self.node]

    def _broadcast(self, command: str, arguments: Dict[str, Any]) -> Any:
        def call(app, conn):
            return app.control.broadcast(
                command,
                arguments=arguments,
                destination=[self.node],
                reply=True,
                timeout=self.reply_timeout,
                limit=1,
                connection=conn,
            )

        replies = self._call(command, call) or []
        for reply in replies:
            if isinstance(reply, dict) and self.node in reply:
                return reply[self.node]
        raise NoReply(f"{self.node} did not reply to '{command}' within {self.reply_timeout:g}s")

    # -- the calls a drain needs -------------------------------------------------------------

    def ping(self, timeout: Optional[float] = None) -> bool:
        """True when the node answers a ping; False when it does not (NoReply)."""
        try:
            self._inspect("ping", timeout)
            return True
        except NoReply:
            return False

    def active_queues(self) -> List[QueueSpec]:
        return [QueueSpec.from_active_queues(q) for q in self._inspect("active_queues") or []]

    def active_tasks(self) -> List[Dict[str, Any]]:
        """The node's running tasks, each in `safe_task()`'s form (never their arguments)."""
        return [safe_task(t) for t in self._inspect("active") or [] if isinstance(t, dict)]

    def busy(self) -> tuple[int, int]:
        """(active, reserved) task counts: a worker is idle only when both are 0."""
        active = len(self._inspect("active") or [])
        reserved = len(self._inspect("reserved") or [])
        return active, reserved

    def cancel_consumer(self, queue: str) -> None:
        reply = self._broadcast("cancel_consumer", {"queue": queue})
        _check_reply(reply, "cancel_consumer", queue, self.node)

    def add_consumer(self, spec: QueueSpec) -> None:
        args: Dict[str, Any] = {"queue": spec.name}
        if spec.exchange:
            args["exchange"] = spec.exchange
            args["exchange_type"] = spec.exchange_type
        if spec.routing_key:
            args["routing_key"] = spec.routing_key
        reply = self._broadcast("add_consumer", args)
        _check_reply(reply, "add_consumer", spec.name, self.node)


def _check_reply(reply: Any, command: str, queue: str, node: str) -> None:
    if isinstance(reply, dict) and "error" in reply:
        raise ControlError(f"{node} refused {command} {queue}: {reply['error']}")


def _scrub(text: str, url: str) -> str:
    """Exception texts may quote the URL (with its password): replace it."""
    if url and url in text:
        text = text.replace(url, redact_url(url))
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text
