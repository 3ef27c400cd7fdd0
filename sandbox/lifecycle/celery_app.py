"""A plain Celery app for the lifecycle tests: Airflow's worker settings, one marker task."""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery import Celery

app = Celery("lc", broker=os.environ.get("LC_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_acks_late=True,  # Airflow's default: a message is acked after its task ran
    worker_prefetch_multiplier=1,
    task_default_queue="lcq",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def _mark(tag: str, what: str) -> None:
    path = Path(os.environ["LC_MARK_DIR"]) / f"{tag}.{what}"
    with open(path, "a") as f:
        f.write(f"{time.time()}\n")


@app.task(name="lc.sleep")
def sleep(tag: str, seconds: float) -> str:
    _mark(tag, "started")
    time.sleep(seconds)
    _mark(tag, "finished")
    return tag
