"""A writer killed with SIGKILL at random moments never leaves a partial or missing env file."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.platform.fsutil import remove_stale_temps

REPO_ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent(
    """
    import sys
    from agent.platform.fsutil import atomic_write
    from agent.platform.envfile import encode_env
    path = sys.argv[1]
    # two large, distinct files so a torn write would be visible
    a = encode_env({f"K{i}": "a" * 200 for i in range(1500)})
    b = encode_env({f"K{i}": "b" * 200 for i in range(1500)})
    print("ready", flush=True)
    n = 0
    while True:
        atomic_write(path, a if n % 2 else b, mode=0o640)
        n += 1
    """
)


@pytest.mark.slow  # 220 writer processes: ~20 s
def test_sigkill_at_random_moments_never_tears_the_file(tmp_path):
    from agent.platform.envfile import encode_env

    path = tmp_path / "airflow.env"
    good = {
        encode_env({f"K{i}": "a" * 200 for i in range(1500)}),
        encode_env({f"K{i}": "b" * 200 for i in range(1500)}),
    }
    path.write_bytes(next(iter(good)))
    rng = random.Random(20261121)
    writers = 220
    killed = 0  # writers that SIGKILL ended (not one that exited or crashed on its own)
    for _ in range(writers):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        assert proc.stdout.readline().strip() == "ready"
        # kill somewhere inside the write loop: each write of ~300 KB takes a few ms
        deadline = rng.uniform(0.0, 0.03)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=deadline)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        killed += proc.returncode == -signal.SIGKILL
        assert path.read_bytes() in good, "env file torn or missing after SIGKILL"
    assert killed == writers
    # a writer's temp file (one per PID) is left only when the kill landed inside a write:
    # without some of those, no kill hit the window where a file could be torn
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "airflow.env"]
    assert len(leftovers) >= writers // 10, f"only {len(leftovers)} kills landed inside a write"
    # the next sync removes them
    assert remove_stale_temps(path) == len(leftovers)
    assert [p.name for p in tmp_path.iterdir()] == ["airflow.env"]


def test_file_lock_is_exclusive_and_gives_up_at_its_deadline(tmp_path):
    from agent.platform.fsutil import FileLock

    first, second = FileLock(tmp_path / "job.lock"), FileLock(tmp_path / "job.lock")
    assert first.acquire(until=0)
    now = [0.0]

    def sleep(s):
        now[0] += s

    assert not second.acquire(until=1.0, clock=lambda: now[0], sleep=sleep)
    assert second.fd is None and now[0] >= 1.0
    first.release()
    assert second.acquire(until=0)
    second.release()
