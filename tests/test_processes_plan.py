"""Which of the worker unit's processes run tasks (agent.worker.processes_plan), pure.

The trees below are the ones read from a real Airflow 3.3 Celery worker (prefork, concurrency 4)
under the project's units on the systemd test host: idle, running two tasks, and idle again
after them (the pool slots keep the supervisor title they took for the task)."""

from __future__ import annotations

import json

from agent.worker.processes_plan import Proc, TaskProcess, classify, task_instance_of

TI1 = "01a22e4c-bf22-733a-b62a-036f3adaf8a2"
TI2 = "01a22e4c-bf23-772d-a416-2970d44fc27b"
MAIN = "[celeryd: celery@afhost:MainProcess] -active- (celery worker)"
BASE = [
    Proc(353, 1, MAIN, 100.0),
    Proc(360, 353, "airflow serve-logs", 101.0),
    Proc(
        361,
        353,
        "/opt/airflow/venv/bin/python3.11 /opt/airflow/venv/bin/airflow celery worker",
        101.0,
    ),
    Proc(367, 353, "[celeryd: celery@afhost:ForkPoolWorker-1]", 102.0),
    Proc(369, 353, "[celeryd: celery@afhost:ForkPoolWorker-3]", 102.0),
]
SLOTS_BUSY = [
    Proc(368, 353, f"airflow supervisor: {TI1}", 102.0),
    Proc(370, 353, f"airflow supervisor: {TI2}", 102.0),
]
RUNNERS = [
    Proc(377, 370, f"airflow worker -- {TI2}", 150.0),
    Proc(378, 368, f"airflow worker -- {TI1}", 151.0),
]


def test_an_idle_worker_runs_no_task():
    idle = BASE + [
        Proc(368, 353, "[celeryd: celery@afhost:ForkPoolWorker-2]", 102.0),
        Proc(370, 353, "[celeryd: celery@afhost:ForkPoolWorker-4]", 102.0),
    ]
    tree = classify(idle, 353)
    assert tree.count == 0 and tree.tasks == []
    assert tree.pool_slots == [367, 368, 369, 370]  # not serve-logs, not the bundle cleanup
    assert (tree.main_pid, tree.processes) == (353, 7)


def test_two_running_tasks_are_the_children_of_pool_slots():
    tree = classify(BASE + SLOTS_BUSY + RUNNERS, 353)
    assert tree.count == 2
    assert tree.tasks == [
        TaskProcess(377, "task", 150.0, TI2),
        TaskProcess(378, "task", 151.0, TI1),
    ]


def test_after_the_tasks_the_supervisor_titles_stay_but_nothing_runs():
    tree = classify(BASE + SLOTS_BUSY, 353)
    assert tree.count == 0
    assert sorted(tree.pool_slots) == [367, 368, 369, 370]


def test_a_task_counts_once_whatever_it_runs_below_it():
    below = [Proc(400, 378, "bash -c sleep 30", 152.0), Proc(401, 400, "sleep 30", 152.0)]
    tree = classify(BASE + SLOTS_BUSY + RUNNERS + below, 353)
    assert [t.pid for t in tree.tasks] == [377, 378]


def test_a_reparented_task_runner_is_still_counted():
    # its supervisor (pool slot 370) died: the runner now hangs off PID 1, outside the unit
    procs = BASE + SLOTS_BUSY[:1] + [Proc(377, 1, f"airflow worker -- {TI2}", 150.0), RUNNERS[1]]
    tree = classify(procs, 353)
    assert [(t.pid, t.kind, t.task_instance) for t in tree.tasks] == [
        (377, "orphan", TI2),
        (378, "task", TI1),
    ]


def test_a_daemonized_child_of_a_task_counts_until_it_ends():
    tree = classify(BASE + SLOTS_BUSY + [Proc(500, 1, "some-daemon --token=abc", 160.0)], 353)
    assert [(t.pid, t.kind, t.task_instance) for t in tree.tasks] == [(500, "orphan", None)]


def test_without_the_main_process_orphaned_slots_count_what_they_run():
    # the main process died (the unit is stopping): slots and runners are all orphans
    procs = [p for p in BASE if p.pid != 353] + SLOTS_BUSY + RUNNERS
    procs = [Proc(p.pid, 1 if p.ppid == 353 else p.ppid, p.title, p.started) for p in procs]
    tree = classify(procs, 0)
    assert tree.main_pid == 0 and tree.count == 3
    # the two runners through their orphaned slots; the untitled bundle cleanup is a stray
    # process a stop would kill; idle slots (they exit alone) and the log server do not count
    assert sorted((t.pid, t.kind) for t in tree.tasks) == [
        (361, "orphan"),
        (377, "orphan"),
        (378, "orphan"),
    ]


def test_a_pool_that_is_not_prefork_cannot_be_counted():
    threads = [Proc(353, 1, MAIN, 100.0), Proc(360, 353, "airflow serve-logs", 101.0)]
    assert classify(threads, 353).count is None
    assert classify([Proc(353, 1, MAIN, 100.0)], 353).count is None


def test_nothing_running_is_an_honest_zero():
    assert classify([], 0).count == 0


def test_untitled_pool_children_are_still_found():
    # no setproctitle: every child of main has main's argv; serve-logs is still known
    same = "/opt/airflow/venv/bin/airflow celery worker"
    procs = [
        Proc(10, 1, same, 1.0),
        Proc(11, 10, "airflow serve-logs", 1.0),
        Proc(12, 10, same, 1.0),
        Proc(13, 10, same, 1.0),
        Proc(20, 13, same, 5.0),
        Proc(21, 11, "uvicorn worker", 5.0),  # below serve-logs: not a task
    ]
    tree = classify(procs, 10)
    assert tree.pool_slots == [12, 13]
    assert [(t.pid, t.task_instance) for t in tree.tasks] == [(20, None)]


def test_a_main_pid_outside_the_snapshot_is_no_main_process():
    tree = classify(BASE[1:], 353)  # main exited between systemctl show and the read
    assert tree.main_pid == 0


def test_only_an_exact_task_runner_title_gives_a_task_instance():
    assert task_instance_of(f"airflow worker -- {TI1}") == TI1
    assert task_instance_of(f"airflow worker -- {TI1}   ") == TI1  # setproctitle padding
    assert task_instance_of(f"airflow worker -- {TI1} eyJhbGciOi.x.y") is None
    assert task_instance_of(f"airflow supervisor: {TI1}") is None
    assert task_instance_of("airflow worker -- not-a-uuid") is None


def test_nothing_of_a_title_leaves_the_classification():
    secret = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0aSJ9.c2lnbmF0dXJl"
    procs = (
        BASE
        + SLOTS_BUSY
        + [
            Proc(377, 370, f"python task.py --token {secret}", 150.0),
            Proc(600, 1, f"curl -H 'Authorization: Bearer {secret}'", 160.0),
        ]
    )
    tree = classify(procs, 353)
    shown = json.dumps([t.to_dict(200.0) for t in tree.tasks])
    assert tree.count == 2 and secret not in shown and "Bearer" not in shown
    assert [t.to_dict(200.0) for t in tree.tasks][0] == {
        "pid": 377,
        "kind": "task",
        "age": 50.0,
        "task_instance": None,
    }
