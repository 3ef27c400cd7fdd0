"""The worker unit's task processes read from real processes (agent.worker.processes).

A process tree shaped like a Celery prefork worker's (a main process, pool slots titled as
Celery titles them, task runners titled as Airflow titles them) is started here for real;
the unit's cgroup is a directory laid out like /sys/fs/cgroup (v2, hybrid or v1) whose
cgroup.procs lists the tree's pids, and systemctl is a stand-in answering `show`. psutil reads
the real processes. The same reading of a real unit's cgroup under real systemd is proven by
tests/test_drain_witness_airflow.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import psutil
import pytest

from agent.worker.processes import WorkerProcesses, cgroup_dir, cgroup_pids
from sandbox.proc import wait_for

TI = "0193aa00-1111-7222-8333-444455556666"
# a pool slot: optionally starts a task runner (`cat` titled as Airflow's task runner, reading
# a pipe it holds open itself), or a runner that exits at once and is never reaped (a zombie)
SLOT = """
import os, subprocess, sys, time
mode = sys.argv[1]
if mode == "task":
    r, w = os.pipe()  # the runner holds the write end too: no EOF when the slot dies
    runner = subprocess.Popen(["airflow worker -- TI_ID"], executable="/bin/cat", stdin=r,
                              pass_fds=(w,))
elif mode == "zombie":
    runner = subprocess.Popen(["airflow worker -- TI_ID"], executable="/bin/true")
time.sleep(600)
""".replace("TI_ID", TI)
MAIN = """
import subprocess, sys, time
python, slot = sys.argv[1], sys.argv[2]  # a retitled interpreter has no sys.executable
slots = [subprocess.Popen(["[celeryd: celery@t:ForkPoolWorker-%d]" % (i + 1), "-c", slot, mode],
                          executable=python)
         for i, mode in enumerate(sys.argv[3:])]
time.sleep(600)
"""


class ShowOnly:
    """systemctl stand-in: `show` of one unit (the unit's cgroup and main pid)."""

    def __init__(self, props: Dict[str, str]):
        self.props = props

    def show(self, unit: str, *props: str) -> Dict[str, str]:
        if isinstance(self.props, Exception):
            raise self.props
        return {k: v for k, v in self.props.items() if k in props}


class Tree:
    def __init__(self, *modes: str):
        self.main = subprocess.Popen(
            ["[celeryd: celery@t:MainProcess]", "-c", MAIN, sys.executable, SLOT, *modes],
            executable=sys.executable,
        )
        self.started: List[int] = [self.main.pid]
        want = 1 + len(modes) + sum(1 for m in modes if m in ("task", "zombie"))
        wait_for(
            lambda: self.main.poll() is None and len(self.pids()) == want,
            20,
            "the process tree",
            interval=0.05,
        )
        self.started = self.pids()

    def pids(self) -> List[int]:
        try:
            main = psutil.Process(self.main.pid)
            return [main.pid] + [c.pid for c in main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def slots(self) -> List[psutil.Process]:
        return psutil.Process(self.main.pid).children()

    def stop(self) -> None:
        for pid in reversed(self.started):  # only what this test started, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.main.wait(10)


@pytest.fixture
def tree_of():
    made: List[Tree] = []

    def make(*modes: str) -> Tree:
        made.append(Tree(*modes))
        return made[-1]

    yield make
    for t in made:
        t.stop()


def cgroup(root: Path, pids: List[int], hierarchy: str = "unified") -> Path:
    d = root / hierarchy / "system.slice" / "airflow-worker.service"
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    return d


def witness(root: Path, main_pid: int, active: str = "active") -> WorkerProcesses:
    props = {
        "ControlGroup": "/system.slice/airflow-worker.service",
        "MainPID": str(main_pid),
        "ActiveState": active,
    }
    return WorkerProcesses(ShowOnly(props), "airflow-worker", cgroup_root=str(root))


def test_a_running_task_is_counted_from_the_units_cgroup(tree_of, tmp_path):
    t = tree_of("idle", "task", "idle")
    cgroup(tmp_path, t.pids())
    snap = witness(tmp_path, t.main.pid).snapshot()
    assert (snap.source, snap.error, snap.count) == ("cgroup", "", 1)
    assert len(snap.tree.pool_slots) == 3
    shown = snap.to_dict()
    assert shown["running"] == 1 and shown["processes"] == 5 and shown["main_pid"] == t.main.pid
    (task,) = shown["tasks"]
    assert (task["kind"], task["task_instance"]) == ("task", TI) and 0 <= task["age"] < 30
    assert "cat" not in str(shown) and "celeryd" not in str(shown)  # no title leaves


def test_an_idle_worker_and_a_finished_task_count_zero(tree_of, tmp_path):
    t = tree_of("idle", "zombie")  # the runner exited; its slot has not reaped it yet
    cgroup(tmp_path, t.pids())
    zombie = [p for s in t.slots() for p in s.children()]
    assert [p.status() for p in zombie] == [psutil.STATUS_ZOMBIE]
    assert witness(tmp_path, t.main.pid).count() == 0


def test_a_runner_whose_supervisor_died_is_seen_in_the_cgroup_not_under_main_pid(tree_of, tmp_path):
    t = tree_of("task", "idle")
    slot = next(s for s in t.slots() if s.children())
    runner = slot.children()[0]
    slot.kill()
    wait_for(lambda: runner.ppid() != slot.pid, 10, "the runner to be reparented", interval=0.05)
    cgroup(tmp_path, t.started)  # systemd keeps it in the unit's cgroup
    snap = witness(tmp_path, t.main.pid).snapshot()
    assert [(x.pid, x.kind, x.task_instance) for x in snap.tree.tasks] == [
        (runner.pid, "orphan", TI)
    ]
    # without the cgroup (MainPID's descendants) it is lost: why the cgroup comes first
    fallback = witness(tmp_path / "nothing-mounted", t.main.pid).snapshot()
    assert (fallback.source, fallback.count) == ("main-pid", 0)


@pytest.mark.parametrize("hierarchy", ["", "unified", "systemd"])
def test_every_cgroup_layout_is_found_and_sub_cgroups_are_read(tree_of, tmp_path, hierarchy):
    t = tree_of("task")
    main, slot, runner = t.pids()
    d = cgroup(tmp_path, [main, slot], hierarchy)
    (d / "sub").mkdir()
    (d / "sub" / "cgroup.procs").write_text(f"{runner}\n")
    assert cgroup_dir("/system.slice/airflow-worker.service", str(tmp_path)) == str(d)
    assert cgroup_pids(str(d)) == sorted([main, slot, runner])
    assert witness(tmp_path, main).count() == 1


def test_a_cgroup_path_systemd_would_not_give_is_not_read(tmp_path):
    cgroup(tmp_path, [os.getpid()])
    for bad in ("system.slice/airflow-worker.service", "/../unified/system.slice", "/", ""):
        assert cgroup_dir(bad, str(tmp_path)) is None


def test_a_stopped_unit_runs_nothing_and_an_unreadable_one_is_not_counted(tmp_path):
    assert witness(tmp_path, 0, active="inactive").count() == 0
    unknown = witness(tmp_path, 0, active="activating").snapshot()
    assert unknown.count is None and "no readable cgroup" in unknown.error
    broken = WorkerProcesses(
        ShowOnly(RuntimeError("bus")), "airflow-worker", cgroup_root=str(tmp_path)
    )
    snap = broken.snapshot()
    assert snap.count is None and snap.error == "systemctl show airflow-worker: RuntimeError"
    assert snap.to_dict()["running"] is None and snap.to_dict()["tasks"] == []


def test_a_pid_that_exits_between_the_listing_and_the_read_is_skipped(
    tree_of, tmp_path, monkeypatch
):
    from agent.worker import processes

    t = tree_of("task")
    gone = subprocess.Popen(["true"])
    gone.wait()
    cgroup(tmp_path, t.pids() + [gone.pid])
    listings = [t.pids() + [gone.pid], t.pids()]  # the kernel drops it from the cgroup
    monkeypatch.setattr(processes, "cgroup_pids", lambda path: listings.pop(0))
    assert witness(tmp_path, t.main.pid).count() == 1 and listings == []


def test_a_process_the_cgroup_lists_but_proc_hides_is_never_a_zero(tree_of, tmp_path):
    """ProtectProc=invisible without CAP_SYS_PTRACE hides other users' /proc entries while
    the cgroup still lists them: a pid listed twice but not found is hidden, not gone."""
    t = tree_of("idle")
    hidden = subprocess.Popen(["true"])
    hidden.wait()  # a pid /proc does not show (as a hidden one looks)
    cgroup(tmp_path, t.pids() + [hidden.pid])
    snap = witness(tmp_path, t.main.pid).snapshot()
    assert snap.count is None and "cannot see 1 process(es)" in snap.error
    # MainPID's descendants: a main process we cannot see is not an idle worker either
    lost = witness(tmp_path / "none", hidden.pid).snapshot()
    assert lost.count is None and f"main process {hidden.pid}" in lost.error


def test_start_times_come_without_proc_stat(tree_of):
    """psutil's create_time() reads /proc/stat (hidden by ProcSubset=pid); started_at does not,
    and agrees with it."""
    from agent.worker.processes import started_at

    before = time.time()
    t = tree_of("idle")
    after = time.time()
    for pid in t.pids():
        assert before - 0.02 <= started_at(pid) <= after + 0.02
        # psutil's boot time is whole seconds
        assert started_at(pid) == pytest.approx(psutil.Process(pid).create_time(), abs=1.01)
