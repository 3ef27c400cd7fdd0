"""`python -m sandbox up` in the foreground as the stack's supervisor, then `status` and `down`
from other processes: the state file names its PID and every instance's host, `status` asks
each host, `down` signals the supervisor, which ends everything it started (no host, no IMDS,
no stand-in process left: each PID named in the state is gone)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.proc import end_process, wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.airflow, pytest.mark.aws, pytest.mark.redis]
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", "--run-dir", str(state), *args],
        capture_output=True, text=True, cwd=str(REPO), timeout=300,
    )  # fmt: skip


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_status_down(tmp_path):
    state = tmp_path / "state"
    up = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--run-dir", str(state), "up", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO),
    )  # fmt: skip
    out = []
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            ready, _, _ = select.select([up.stdout], [], [], 5)
            if ready:
                line = up.stdout.readline()
                if not line:
                    break
                out.append(line)
                if line.startswith("stack up:"):
                    break
        assert any(ln.startswith("stack up:") for ln in out), "".join(out)[-5000:]
        doc = json.loads((state / "stack.json").read_text())
        assert doc["pid"] == up.pid
        hosts = [i["host_pid"] for i in doc["instances"]]
        assert len(hosts) == 4 and all(alive(p) for p in hosts)  # 1 + 2 webservers + 1 worker
        p = cli("status", state=state)
        assert p.returncode == 0, p.stderr
        for inst in doc["instances"]:
            assert inst["name"] in p.stdout
        p = cli("down", state=state)
        assert p.returncode == 0 and "stack down" in p.stdout, p.stdout + p.stderr
        assert up.wait(timeout=60) == 0
        wait_for(lambda: not any(alive(h) for h in hosts), 30, "every host to be gone")
        assert not (state / "stack.json").exists()
        assert cli("status", state=state).returncode == 3
    finally:
        end_process(up)
