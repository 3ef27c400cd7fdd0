"""A plain Celery app configured like Airflow's CeleryExecutor, for the drain tests.

Same delivery semantics as Airflow (`task_acks_late`, prefetch multiplier 1, a result backend
is not needed), so what a drain does to it is what it does to Airflow's worker, at a fraction
of the start-up time. The broker URL comes from $AIRFLOW__CELERY__BROKER_URL, like the real
worker. `record(key, seconds)` sleeps and leaves evidence in $DRAIN_TEST_DIR: one `start` line
per execution (so a rerun shows as two), one `end` line when it finished normally.
"""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("drain-test", broker=os.environ.get("AIRFLOW__CELERY__BROKER_URL"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue="default",
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=True,
)


def _log(key: str, what: str) -> None:
    directory = os.environ.get("DRAIN_TEST_DIR", "/tmp")
    with open(os.path.join(directory, f"{key}.log"), "a") as f:
        f.write(f"{what} {time.time():.3f} {os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())


@app.task(name="record")
def record(key: str, seconds: float) -> str:
    _log(key, "start")
    time.sleep(seconds)
    _log(key, "end")
    return key
