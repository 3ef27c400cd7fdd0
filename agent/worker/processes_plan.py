"""Which processes of the worker unit are running Airflow tasks, pure.

The drain's second witness (issue 12): remote control answers through the broker, so a broker
that restarts or reconnects leaves the drain blind; the worker unit's processes do not. This
module decides, from a snapshot of the unit's processes (pid, parent pid, process title, start
time), how many tasks run; agent.worker.processes takes the snapshot.

The tree of an Airflow 3 Celery worker (prefork pool), as seen on a real cluster:

    [celeryd: celery@host:MainProcess] ...            MainPID
    ├─ airflow serve-logs                             log server (not a task)
    ├─ airflow celery worker                          stale-bundle cleanup Process (not a task)
    ├─ [celeryd: celery@host:ForkPoolWorker-1]        an idle pool slot
    └─ airflow supervisor: <ti uuid>                  a pool slot that has run a task; the title
       └─ airflow worker -- <ti uuid>                 stays after the task: only the child, the
                                                       task runner, proves a task is running

So a running task is a *child of a pool slot*: count those, never the slots (a slot's title says
what it ran last, not what it runs). A process in the unit whose parent is not in the unit
(reparented, e.g. a task runner whose supervisor died, or a task's daemonized child) still runs
there and a stop would kill it: it counts too (kind "orphan"), unless it is an idle pool slot,
which exits by itself once its master is gone, or the log server.

A pool that is not prefork (threads, solo, gevent) runs tasks inside the main process: there is
nothing to count, and `count` is None (the drain then has remote control alone, as before).

Titles are only classified here: they may hold anything a task put in its argv, so nothing but
an Airflow task-instance id (a UUID, matched exactly) leaves this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

# a Celery prefork pool child, before and after Airflow's supervisor retitles it
_POOL_SLOT = re.compile(r"ForkPoolWorker-\d+|^airflow (task )?supervisor: ")
# children of the main process that are never pool slots and never run tasks
_AUXILIARY = re.compile(r"^airflow serve-logs\b")
# Airflow's task runner: setproctitle(f"airflow worker -- {ti.id}")
_TASK_RUNNER = re.compile(
    r"^airflow worker -- ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\s*$"
)


@dataclass(frozen=True)
class Proc:
    """One process of the unit as read from /proc (title: its argv joined, classified only)."""

    pid: int
    ppid: int
    title: str
    started: float


@dataclass(frozen=True)
class TaskProcess:
    """A running task's process, in a form safe to log, store and print."""

    pid: int
    kind: str  # "task" (child of a pool slot) or "orphan" (parent outside the unit)
    started: float
    task_instance: Optional[str] = None  # Airflow's TI id, when the title is the task runner's

    def to_dict(self, now: float) -> Dict[str, object]:
        return {
            "pid": self.pid,
            "kind": self.kind,
            "age": round(max(0.0, now - self.started), 1),
            "task_instance": self.task_instance,
        }


@dataclass
class WorkerTree:
    """The unit's processes, classified."""

    main_pid: int
    processes: int  # everything in the unit
    pool_slots: List[int] = field(default_factory=list)
    tasks: List[TaskProcess] = field(default_factory=list)
    countable: bool = True

    @property
    def count(self) -> Optional[int]:
        """Running tasks, or None when this pool cannot be counted from its processes."""
        return len(self.tasks) if self.countable else None


def task_instance_of(title: str) -> Optional[str]:
    m = _TASK_RUNNER.match(title.strip())
    return m.group(1) if m else None


def _is_pool_slot(title: str) -> bool:
    return bool(_POOL_SLOT.search(title))


def _pool_slots(children: List[Proc]) -> List[Proc]:
    """Which children of the main process are pool slots.

    By title when Celery titled them (setproctitle installed, as Airflow requires on Linux);
    without titles, every child but the known auxiliaries (conservative: a child of the
    bundle-cleanup process would then count as a task, and the drain waits for it)."""
    titled = [c for c in children if _is_pool_slot(c.title)]
    if titled:
        return titled
    return [c for c in children if not _AUXILIARY.search(c.title)]


def _task(p: Proc, kind: str) -> TaskProcess:
    return TaskProcess(p.pid, kind, p.started, task_instance_of(p.title))


def classify(procs: Iterable[Proc], main_pid: int) -> WorkerTree:
    """The running tasks among a unit's processes (see the module docstring)."""
    by_pid: Dict[int, Proc] = {}
    for p in procs:
        by_pid[p.pid] = p
    children: Dict[int, List[Proc]] = {}
    for p in by_pid.values():
        children.setdefault(p.ppid, []).append(p)
    for kids in children.values():
        kids.sort(key=lambda p: p.pid)

    tree = WorkerTree(main_pid=main_pid if main_pid in by_pid else 0, processes=len(by_pid))
    tasks: Dict[int, TaskProcess] = {}
    if tree.main_pid:
        slots = _pool_slots(children.get(main_pid, []))
        tree.pool_slots = [s.pid for s in slots]
        for slot in slots:
            for child in children.get(slot.pid, []):
                tasks[child.pid] = _task(child, "task")
    orphans = [
        p
        for p in sorted(by_pid.values(), key=lambda p: p.pid)
        if p.pid != tree.main_pid and p.ppid not in by_pid
    ]
    for p in orphans:
        if _is_pool_slot(p.title):
            # a slot that lost its master: what it runs is a task; an idle one exits alone
            for child in children.get(p.pid, []):
                tasks[child.pid] = _task(child, "orphan")
        elif not _AUXILIARY.search(p.title):
            tasks[p.pid] = _task(p, "orphan")
    tree.tasks = sorted(tasks.values(), key=lambda t: (t.started, t.pid))
    # a main process without pool slots runs its tasks itself (threads/solo/gevent pools)
    tree.countable = not (tree.main_pid and not tree.pool_slots and not tree.tasks)
    return tree
