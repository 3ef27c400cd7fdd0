"""The one way the agent gets remote control of the local worker: `worker_control(cfg)`.

Drain, stop-consuming and undrain (through DrainShell's default factory), `lifecycle watch`
(busy counts, the running tasks) and the deploy hook's worker ping all build their
WorkerControl here, so every remote-control call waits the operator's `drain.reply_timeout`
for the worker's reply: a loaded worker may take seconds to answer, and a long timeout costs
nothing when it does (the call returns on the reply).
"""

from __future__ import annotations

from typing import Optional

from agent.jobs.drain.broker import node_name, read_broker
from agent.worker.celery_control import BrokerSettings, WorkerControl


def worker_control(
    cfg, settings: Optional[BrokerSettings] = None, node: Optional[str] = None
) -> WorkerControl:
    """Remote control of the local worker, replies awaited for `drain.reply_timeout` seconds."""
    return WorkerControl(
        settings if settings is not None else read_broker(cfg),
        node or node_name(cfg),
        reply_timeout=cfg.drain.reply_timeout,
    )
