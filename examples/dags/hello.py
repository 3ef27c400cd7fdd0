"""The example DAG `make bundle DAGS=examples/dags` ships: two tasks, one passing a value to the
other, on Airflow 3's task SDK. Trigger it from the UI (it has no schedule) after the first
deployment; the second task's log says `hello from <the hostname of the worker that ran the
first>` (the two may run on different workers)."""

from __future__ import annotations

import datetime
import socket

from airflow.sdk import dag, task


@dag(
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1),
    catchup=False,
    tags=["example", "airflow-ec2-agent"],
)
def hello():
    @task
    def greet() -> str:
        return f"hello from {socket.gethostname()}"

    @task
    def show(greeting: str) -> None:
        print(greeting, flush=True)

    show(greet())


hello()
