"""`env sync` runs take turns: real CLI processes against the embedded AWS (moto over HTTP).

Two runs at once (the cfn-hup hook and the boot unit) used to delete each other's temp file
(the loser's rename failed uncaught, unrecorded) and an older SSM snapshot could win. Now a run
holds `<state_dir>/env.lock` around fetch, render and write, so the later run fetches after the
earlier one wrote; a run that waits longer than `env.lock_timeout` exits 4 naming the holder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3

from agent.jobs.env_sync.plan import FILE_HEADER
from agent.platform.envfile import encode_env, parse_env
from agent.platform.fsutil import FileLock

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS = 20
CONSTANT = {f"AIRFLOW__BULK__KEY_{i:02d}": f"{i:02d}-" + "v" * 120 for i in range(35)}
# what a run that gave up waiting says (the only non-zero ending a concurrent run may have)
LOCK_MESSAGE = "gave up waiting"


def ssm():
    return boto3.client("ssm", region_name="us-east-1")


def put(name, value):
    ssm().put_parameter(Name=name, Value=value, Type="String", Overwrite=True)


def variables(snapshot: int):
    return {**CONSTANT, "SNAPSHOT": str(snapshot), "AIRFLOW_HOME": "/airflow"}


def rendered(snapshot: int) -> bytes:
    return encode_env(variables(snapshot), header=FILE_HEADER)


def seed():
    # 36 parameters: four pages, so a run's fetch spans several requests
    for i in range(35):
        put(f"/airflow/test/bulk/key_{i:02d}", CONSTANT[f"AIRFLOW__BULK__KEY_{i:02d}"])
    put("/airflow/test/env/SNAPSHOT", "0")


def env_file(cfg: Path) -> Path:
    return cfg.parent / "sysconfig" / "airflow.env"


def state_dir(cfg: Path) -> Path:
    return Path(json.loads(cfg.read_text())["state_dir"])


def start_sync(cfg: Path, env, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(cfg), "env", "sync", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(REPO_ROOT),
    )


class Watcher(threading.Thread):
    """Reads the env file in a tight loop; every sample must be one rendered snapshot."""

    def __init__(self, path: Path, highest: list):
        super().__init__(daemon=True)
        self.path, self.highest = path, highest
        self.stop = threading.Event()
        self.samples = 0
        self.seen = set()
        self.bad = []

    def run(self):
        while not self.stop.is_set():
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                self.bad.append("missing")
                continue
            self.samples += 1
            snap = parse_env(data).get("SNAPSHOT", "")
            if not snap.isdigit() or int(snap) > self.highest[0] or data != rendered(int(snap)):
                self.bad.append(data[:200])
                continue
            self.seen.add(int(snap))


def test_twenty_concurrent_syncs_take_turns_and_the_last_snapshot_wins(
    aws, make_config, run_agent, agent_env
):
    seed()
    cfg = make_config()
    # every fourth run is impatient (same files, same lock): it may give up, with the message
    impatient = make_config({"env": {"lock_timeout": 0.5}}, name="impatient.yaml")
    path = env_file(cfg)
    assert run_agent(cfg, "env", "sync").returncode == 0
    assert path.read_bytes() == rendered(0)

    highest = [0]  # the newest snapshot put so far (the watcher accepts up to it)
    watcher = Watcher(path, highest)
    watcher.start()
    procs = [start_sync(impatient if i % 4 == 0 else cfg, agent_env) for i in range(RUNS)]
    try:
        # change SSM while the runs start, wait and write, until half have ended; the other
        # half (at most one of them holding the lock) fetch after the last change
        deadline = time.monotonic() + 240
        while sum(p.poll() is not None for p in procs) < RUNS // 2:
            assert time.monotonic() < deadline, "runs did not end"
            highest[0] += 1
            put("/airflow/test/env/SNAPSHOT", str(highest[0]))
            time.sleep(0.1)  # pacing of the changes, not a wait for a result
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        watcher.stop.set()
        watcher.join()

    for i, (p, (_out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 or (p.returncode == 4 and LOCK_MESSAGE in err), err
        assert "internal error" not in err and "Traceback" not in err, err
        assert p.returncode == 0 or i % 4 == 0, err  # the patient ones all got their turn
    print(
        f"exits {sorted(p.returncode for p in procs)}, {watcher.samples} samples, "
        f"snapshots seen {sorted(watcher.seen)}, last {highest[0]}"
    )
    assert watcher.bad == [], watcher.bad[:3]
    assert watcher.samples > 100 and len(watcher.seen) >= 2, (watcher.samples, watcher.seen)
    assert highest[0] >= 2
    # the last snapshot in SSM is what the file holds, and env.json describes that file
    final = path.read_bytes()
    assert final == rendered(highest[0])
    doc = json.loads((state_dir(cfg) / "env.json").read_text())
    assert doc["last_sync_result"] == "ok"
    assert doc["file_sha256"] == hashlib.sha256(final).hexdigest()
    assert sorted(p.name for p in path.parent.iterdir()) == ["airflow.env"]


def hold_lock(cfg: Path, who: str) -> FileLock:
    lock = FileLock(state_dir(cfg) / "env.lock")
    lock.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    assert lock.acquire(until=0)
    lock.write_holder(who)
    return lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_that_waits_too_long_names_the_holder_and_touches_nothing(
    aws, make_config, run_agent
):
    seed()
    cfg = make_config({"env": {"lock_timeout": 1}})
    path = env_file(cfg)
    assert run_agent(cfg, "env", "sync").returncode == 0
    before = os.stat(path)
    env_json = (state_dir(cfg) / "env.json").read_bytes()
    put("/airflow/test/env/SNAPSHOT", "1")
    # a temp file being written by a live writer, and one a killed writer left
    live_tmp = path.parent / f".airflow.env.{os.getpid()}.tmp-agent"
    live_tmp.write_bytes(b"being written")
    stale_tmp = path.parent / f".airflow.env.{dead_pid()}.tmp-agent"
    stale_tmp.write_bytes(b"left by a killed run")

    lock = hold_lock(cfg, "pid 4242 (env sync) since 2026-11-30T17:00:00Z")
    try:
        started = time.monotonic()
        proc = run_agent(cfg, "env", "sync")
        waited = time.monotonic() - started
    finally:
        lock.release()
    assert proc.returncode == 4, proc.stderr
    assert LOCK_MESSAGE in proc.stderr and "pid 4242 (env sync)" in proc.stderr, proc.stderr
    assert "env.lock_timeout" in proc.stderr and str(lock.path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert waited >= 1.0
    # nothing touched: the file, both temp files, and env.json (the holder records its run)
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert live_tmp.read_bytes() == b"being written" and stale_tmp.exists()
    assert (state_dir(cfg) / "env.json").read_bytes() == env_json

    # with the lock free: the stale temp goes, the live writer's stays, the new snapshot lands
    proc = run_agent(cfg, "env", "sync")
    assert proc.returncode == 0, proc.stderr
    assert path.read_bytes() == rendered(1)
    assert not stale_tmp.exists() and live_tmp.read_bytes() == b"being written"


def test_a_waiting_run_fetches_after_the_holder_is_done(aws, make_config, agent_env):
    seed()
    cfg = make_config()
    path = env_file(cfg)
    aws.clear_calls()
    lock = hold_lock(cfg, f"pid {os.getpid()} (the test)")
    try:
        proc = start_sync(cfg, agent_env)
        # it says it waits, naming the holder, before it fetches anything
        line = proc.stderr.readline()
        assert "waiting" in line and f"pid {os.getpid()} (the test)" in line, line
        assert not path.exists() and aws.calls("GetParametersByPath") == []
        # what the holder "writes" meanwhile: the waiter must see this snapshot, not an older one
        put("/airflow/test/env/SNAPSHOT", "7")
    finally:
        lock.release()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert path.read_bytes() == rendered(7)
