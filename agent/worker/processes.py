"""The worker unit's running task processes, read from the unit's cgroup with psutil.

The drain's second witness (issue 12) and `status`'s view of what the worker runs; the
classification is agent.worker.processes_plan (pure). Which processes belong to the worker:

- the unit's cgroup, from systemd's `ControlGroup` property (`/system.slice/<unit>`), read at
  /sys/fs/cgroup/<cg> (cgroup v2), /sys/fs/cgroup/unified/<cg> (hybrid) or
  /sys/fs/cgroup/systemd/<cg> (v1 name=systemd), sub-cgroups included. Preferred: systemd puts
  every process the unit starts there and nothing leaves it, so a task runner whose supervisor
  died (reparented to PID 1) or a task's daemonized child is still seen, and they are exactly
  what a `systemctl stop` would kill;
- without a readable cgroup, MainPID and its descendants (a reparented process is lost then;
  the snapshot says which source it used).

Each process is read with psutil (parent, argv as a title to classify) and its start time from
/proc/<pid>/stat (psutil's needs /proc/stat, hidden by ProcSubset=pid); one that exits
meanwhile is skipped, a zombie has finished. A process the cgroup still lists but /proc does
not show is hidden from the reader (ProtectProc=invisible without CAP_SYS_PTRACE): then nothing
is counted (None), never a zero that is not one. Nothing read here is logged or returned but
pids, start times, a kind and an Airflow task-instance id (see processes_plan): a process's
argv may hold anything a task put there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import psutil

from agent.worker.processes_plan import Proc, WorkerTree, classify

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
# v2, hybrid (v2 beside v1), v1 (systemd's own name=systemd hierarchy)
HIERARCHIES = ("", "unified", "systemd")


@dataclass
class Snapshot:
    """What the unit runs now; tree is None when its processes could not be read."""

    unit: str
    tree: Optional[WorkerTree]
    source: str = ""  # "cgroup" | "main-pid" | "" (nothing read)
    error: str = ""
    taken: float = 0.0

    @property
    def count(self) -> Optional[int]:
        return None if self.tree is None else self.tree.count

    def to_dict(self) -> Dict[str, object]:
        """For `status --json`: counts, pids, ages; never a title or an argument."""
        tree = self.tree
        return {
            "unit": self.unit,
            "source": self.source or None,
            "error": self.error or None,
            "main_pid": tree.main_pid if tree else None,
            "processes": tree.processes if tree else None,
            "pool_slots": len(tree.pool_slots) if tree else None,
            "running": self.count,
            "tasks": [t.to_dict(self.taken) for t in tree.tasks] if tree else [],
        }


def cgroup_dir(control_group: str, root: str = CGROUP_ROOT) -> Optional[str]:
    """The unit's cgroup directory on this machine, or None (no such cgroup mounted)."""
    parts = [p for p in control_group.split("/") if p]
    if not control_group.startswith("/") or not parts or any(p in (".", "..") for p in parts):
        return None  # not a path systemd gives: never read outside the cgroup tree
    for hierarchy in HIERARCHIES:
        path = os.path.join(root, hierarchy, *parts) if hierarchy else os.path.join(root, *parts)
        if os.path.isfile(os.path.join(path, "cgroup.procs")):
            return path
    return None


def cgroup_pids(path: str) -> List[int]:
    """Every pid in the cgroup at `path` and its sub-cgroups (cgroup.procs lists only its own)."""
    pids: List[int] = []
    for dirpath, _dirs, files in os.walk(path):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids += [int(x) for x in f.read().split()]
        except (OSError, ValueError):  # a sub-cgroup removed while walking
            continue
    return sorted(set(pids))


def started_at(pid: int) -> float:
    """When `pid` started, epoch seconds, from its /proc/<pid>/stat start time and the boot
    clock: psutil's create_time() needs /proc/stat, which units with ProcSubset=pid (the
    agent's lifecycle unit) do not see."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # fields after the command (which may hold spaces and parentheses): state is field 3,
    # starttime field 22, in clock ticks since boot
    ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - since_boot


def read_procs(pids: Sequence[int]) -> Tuple[List[Proc], List[int]]:
    """psutil's view of each pid, and the pids it could not find. Zombies are left out (they
    have finished); a pid not found has exited, or is hidden from this process (the caller
    tells which)."""
    out: List[Proc] = []
    unseen: List[int] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                ppid = p.ppid()
                try:
                    title = " ".join(p.cmdline())
                except psutil.AccessDenied:
                    title = ""  # still placed by its parent
            started = started_at(pid)
        except psutil.ZombieProcess:
            continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
            unseen.append(pid)
            continue
        out.append(Proc(pid, ppid, title, started))
    return out, unseen


def descendant_pids(main_pid: int) -> List[int]:
    try:
        main = psutil.Process(main_pid)
        return [main_pid] + [c.pid for c in main.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


class WorkerProcesses:
    """Snapshots of one unit's task processes (systemctl: agent.platform.systemd.Systemctl)."""

    def __init__(
        self,
        systemctl,
        unit: str,
        clock: Callable[[], float] = time.time,
        cgroup_root: str = CGROUP_ROOT,
    ):
        self.systemctl = systemctl
        self.unit = unit
        self.clock = clock
        self.cgroup_root = cgroup_root

    def snapshot(self) -> Snapshot:
        """Never raises: what cannot be read is a snapshot without a tree, and says why."""
        try:
            return self._snapshot()
        except Exception as exc:  # a daemon's loop calls this: it must not end it
            return self._none(f"reading {self.unit}'s processes: {type(exc).__name__}: {exc}")

    def _snapshot(self) -> Snapshot:
        try:
            props = self.systemctl.show(self.unit, "ControlGroup", "MainPID", "ActiveState")
        except Exception as exc:  # systemd unreachable: say so, a caller carries on
            return self._none(f"systemctl show {self.unit}: {type(exc).__name__}")
        try:
            main_pid = int(props.get("MainPID") or 0)
        except ValueError:
            main_pid = 0
        control_group = props.get("ControlGroup") or ""
        path = cgroup_dir(control_group, self.cgroup_root) if control_group else None
        if path is not None:
            pids, source = cgroup_pids(path), "cgroup"
        elif main_pid:
            pids, source = descendant_pids(main_pid), "main-pid"
            if not pids:
                return self._none(f"cannot see {self.unit}'s main process {main_pid}")
        elif props.get("ActiveState") in ("inactive", "failed"):
            pids, source = [], "main-pid"  # nothing runs there: an honest zero
        else:
            return self._none(f"{self.unit} has no readable cgroup and no main process")
        procs, unseen = read_procs(pids)
        if unseen and path is not None:
            # still listed after the read: not exited but hidden from us (ProtectProc=invisible
            # or hidepid without CAP_SYS_PTRACE). Counting without them would say 0.
            hidden = sorted(set(unseen) & set(cgroup_pids(path)))
            if hidden:
                return self._none(
                    f"cannot see {len(hidden)} process(es) of {self.unit} in /proc "
                    f"(hidden from this process: ProtectProc=/hidepid?)"
                )
        return Snapshot(self.unit, classify(procs, main_pid), source, "", self.clock())

    def _none(self, why: str) -> Snapshot:
        return Snapshot(self.unit, None, "", why, self.clock())

    def count(self) -> Optional[int]:
        """Running tasks now, or None when they cannot be counted."""
        return self.snapshot().count
