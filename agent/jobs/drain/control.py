"""The one way the agent gets remote control of the local worker: `worker_control(cfg)`.

Drain, stop-consuming and undrain (through DrainShell's default factory), `lifecycle watch`
(busy counts, the running tasks) and the deploy hook's worker ping all build their
WorkerControl here, so every remote-control call waits the operator's `drain.reply_timeout`
for the worker's reply: a loaded worker may take seconds to answer, and a long timeout costs
nothing when it does (the call returns on the reply).

Waiting for a worker that may still be starting is different: a ping is a fanout broadcast,
and one sent before the worker's mailbox listens is lost, so one long ping could wait the
whole reply timeout for an answer that never comes. `ping_waits()` gives such a loop its
per-ping waits: 1 s first, doubling up to `drain.reply_timeout`, so a starting worker is caught
by a later ping and a slow (loaded) one by a longer wait.
"""

from __future__ import annotations

from typing import Iterator, Optional

from agent.jobs.drain.broker import node_name, read_broker
from agent.worker.celery_control import BrokerSettings, WorkerControl

FIRST_PING_WAIT = 1.0


def ping_waits(reply_timeout: float) -> Iterator[float]:
    """Per-ping reply waits of a loop waiting for the worker: 1, 2, 4, ... s, at most
    `reply_timeout`."""
    wait = min(FIRST_PING_WAIT, reply_timeout)
    while True:
        yield wait
        wait = min(wait * 2, reply_timeout)


def worker_control(
    cfg, settings: Optional[BrokerSettings] = None, node: Optional[str] = None
) -> WorkerControl:
    """Remote control of the local worker, replies awaited for `drain.reply_timeout` seconds."""
    return WorkerControl(
        settings if settings is not None else read_broker(cfg),
        node or node_name(cfg),
        reply_timeout=cfg.drain.reply_timeout,
    )
