"""The sandbox's one Celery app, configured like Airflow's CeleryExecutor, and its evidence.

Same delivery semantics as Airflow (`task_acks_late`, prefetch multiplier 1, no result
backend), so what a drain or a lifecycle hook does to its worker is what it does to Airflow's
worker, at a fraction of the start-up time. The worker reads its broker URL from
$AIRFLOW__CELERY__BROKER_URL, like the real one. `record(key, seconds)` sleeps and leaves
evidence in $SANDBOX_TASK_DIR/<key>.log: one `start` line per execution (so a rerun shows as
two), one `end` line when it finished normally. The test side sends tasks with `submit` and
reads the evidence with `records` and `times`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Union

from celery import Celery

TASK_DIR_ENV = "SANDBOX_TASK_DIR"

SETTINGS = dict(
    task_acks_late=True,  # Airflow's default: a message is acked after its task ran
    worker_prefetch_multiplier=1,
    task_default_queue="default",
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=True,
)

app = Celery("sandbox", broker=os.environ.get("AIRFLOW__CELERY__BROKER_URL"))
app.conf.update(SETTINGS)


def _log(key: str, what: str) -> None:
    with open(os.path.join(os.environ[TASK_DIR_ENV], f"{key}.log"), "a") as f:
        f.write(f"{what} {time.time():.3f} {os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())


@app.task(name="record")
def record(key: str, seconds: float) -> str:
    _log(key, "start")
    time.sleep(seconds)
    _log(key, "end")
    return key


# -- the test side ---------------------------------------------------------------------------


def client(broker_url: str) -> Celery:
    """An app of the test process on `broker_url` (not the worker's global one): each rig
    talks to its own broker even when several share one pytest process."""
    c = Celery("sandbox-client", broker=broker_url, set_as_current=False)
    c.conf.update(SETTINGS)
    return c


def submit(broker_url: str, key: str, seconds: float, queue: str = "default") -> None:
    c = client(broker_url)
    try:
        c.send_task("record", args=[key, seconds], queue=queue)
    finally:
        c.close()


def records(task_dir: Union[str, Path]) -> Dict[str, List[str]]:
    """key -> ['start', 'end', ...] in order, for every task that ran."""
    return {
        f.stem: [line.split()[0] for line in f.read_text().splitlines()]
        for f in sorted(Path(task_dir).glob("*.log"))
    }


def times(task_dir: Union[str, Path], key: str, what: str) -> List[float]:
    """When task `key` logged `what` ('start' or 'end'), one entry per time; [] if never."""
    f = Path(task_dir) / f"{key}.log"
    if not f.exists():
        return []
    rows = [line.split() for line in f.read_text().splitlines()]
    return [float(r[1]) for r in rows if r[0] == what]
