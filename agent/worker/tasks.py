"""What the agent keeps of a running Celery task: what identifies it, never its arguments.

Celery's `inspect active` entry is {id, name, args, kwargs, type, hostname, time_start,
acknowledged, delivery_info, worker_pid}. Airflow 3's Celery task is `execute_workload` with
one argument, the workload's JSON (airflow.executors.workloads: ExecuteTask, ExecuteCallback,
TestConnection), and that JSON holds the workload's execution-API `token`. So the agent keeps
`safe_task()`'s form only — the Celery name, id, start time and worker pid, and for an Airflow
workload its type and task-instance identity (dag_id, task_id, run_id, try_number, map_index),
copied field by field out of the parsed JSON — and `WorkerControl.active_tasks()` applies it
before anything else sees a task. Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional

# Airflow 3's Celery task: one argument, the workload JSON (airflow.executors.workloads)
AIRFLOW_WORKLOAD_TASK = "execute_workload"
# what identifies an Airflow task instance; never the workload's `token`
_TI_FIELDS = (
    ("dag_id", str),
    ("task_id", str),
    ("run_id", str),
    ("try_number", int),
    ("map_index", int),
)
_MAX_FIELD = 250  # Airflow's own limit for dag_id/task_id/run_id


def _text(value: Any) -> Optional[str]:
    return value[:_MAX_FIELD] if isinstance(value, str) else None


def _workload_identity(args: Any) -> Optional[Dict[str, Any]]:
    """An Airflow workload's type and task-instance identity, read from its JSON argument.

    Only whitelisted fields of the expected type are copied out of the parsed document; the
    document itself (token included) is dropped with this frame. Anything else (Celery's
    `safe` reprs, another Airflow version's shape) gives None: the task is then named by its
    Celery name and id only.
    """
    if not (isinstance(args, (list, tuple)) and len(args) == 1 and isinstance(args[0], str)):
        return None
    try:
        doc = json.loads(args[0])
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    out: Dict[str, Any] = {}
    kind = _text(doc.get("type"))
    if kind:
        out["type"] = kind
    ti = doc.get("ti")
    if isinstance(ti, dict):
        for key, kind_of in _TI_FIELDS:
            value = ti.get(key)
            if isinstance(value, kind_of) and not isinstance(value, bool):
                out[key] = _text(value) if kind_of is str else value
    return out or None


def safe_task(item: Mapping[str, Any]) -> Dict[str, Any]:
    """What the agent keeps of one `inspect active` entry: what identifies it, no secret.

    Celery's entry is {id, name, args, kwargs, type, hostname, time_start, acknowledged,
    delivery_info, worker_pid}; args/kwargs are the task's inputs (for Airflow 3, the workload
    with its execution-API token) and are never kept.
    """
    task: Dict[str, Any] = {
        "id": _text(item.get("id")),
        "name": _text(item.get("name")),
        "started": item.get("time_start")
        if isinstance(item.get("time_start"), (int, float))
        and not isinstance(item.get("time_start"), bool)
        else None,
        "worker_pid": item.get("worker_pid") if type(item.get("worker_pid")) is int else None,
    }
    if task["name"] == AIRFLOW_WORKLOAD_TASK:
        identity = _workload_identity(item.get("args"))
        if identity:
            task["airflow"] = identity
    return task


def describe_task(task: Mapping[str, Any]) -> str:
    """One task for a log line, from its safe form: name[id] and the Airflow identity."""
    line = f"{task.get('name') or '?'}[{task.get('id') or '?'}]"
    ti = task.get("airflow")
    if isinstance(ti, dict) and ti.get("dag_id"):
        line += (
            f" {ti.get('dag_id')}.{ti.get('task_id')} run {ti.get('run_id')}"
            f" try {ti.get('try_number')}"
        )
        if ti.get("map_index", -1) != -1:
            line += f" map {ti.get('map_index')}"
    return line
