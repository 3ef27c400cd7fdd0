"""FileLock's holder note and the stale-temp cleanup's guard for live writers (fast)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agent.platform.fsutil import FileLock, atomic_write, remove_stale_temps


def test_the_holder_note_is_read_by_a_waiter_and_replaced_by_the_next_holder(tmp_path):
    first, second = FileLock(tmp_path / "env.lock"), FileLock(tmp_path / "env.lock")
    assert first.acquire(until=0)
    first.write_holder("pid 1 (env sync) since a long time ago, a longer note than the next")
    assert not second.acquire(until=0)
    assert second.holder() == "pid 1 (env sync) since a long time ago, a longer note than the next"
    first.release()
    assert second.acquire(until=0)
    second.write_holder("pid 2")
    assert first.holder() == "pid 2"  # truncated, not overwritten in place
    second.release()


def test_holder_note_needs_the_lock_and_is_bounded(tmp_path):
    lock = FileLock(tmp_path / "x.lock")
    with pytest.raises(RuntimeError, match="not held"):
        lock.write_holder("me")
    assert lock.holder() == ""  # no file yet
    assert lock.acquire(until=0)
    lock.write_holder("x" * 1000)
    assert lock.holder() == "x" * 200
    lock.release()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_go_but_a_live_writers_stays(tmp_path):
    path = tmp_path / "airflow.env"
    atomic_write(path, b"A=1\n")
    dead = tmp_path / f".airflow.env.{dead_pid()}.tmp-agent"
    mine = tmp_path / f".airflow.env.{os.getpid()}.tmp-agent"  # ours: we are not writing now
    live = tmp_path / f".airflow.env.{os.getppid()}.tmp-agent"  # a live process's
    odd = tmp_path / ".airflow.env.not-a-pid.tmp-agent"
    other = tmp_path / ".other.env.1.tmp-agent"  # another file's temp
    for p in (dead, mine, live, odd, other):
        p.write_bytes(b"partial")
    assert remove_stale_temps(path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["airflow.env", live.name, other.name]
    )
    assert remove_stale_temps(tmp_path / "missing-dir" / "x.env") == 0
