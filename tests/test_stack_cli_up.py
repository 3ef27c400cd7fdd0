"""`python -m sandbox up` in the foreground as the stack's supervisor, then `status` and `down`
from other processes: the state file names its PID and every instance's host, `status` asks
each host, `down` signals the supervisor, which ends everything it started (no host, no IMDS,
no stand-in process left: each PID named in the state is gone)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sandbox.proc import end_process, running, wait_for
from sandbox.stack.parameters import EXAMPLE_PARAMETERS, read_parameters

pytestmark = [pytest.mark.systemd, pytest.mark.airflow, pytest.mark.aws, pytest.mark.redis]
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", "--run-dir", str(state), *args],
        capture_output=True, text=True, cwd=str(REPO), timeout=300,
    )  # fmt: skip


def quiet_after(lines: queue.Queue, seconds: float) -> list:
    """What comes from `lines` until nothing has for 2 s, or `seconds` have passed."""
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(lines.get(timeout=2))
        except queue.Empty:
            break
    return got


def test_up_status_down(tmp_path):
    state = tmp_path / "state"
    # the smallest stack (one instance a group): what is proven here is the supervisor's life
    params = read_parameters(EXAMPLE_PARAMETERS)
    params["WebserverCount"] = "1"
    params_file = tmp_path / "parameters.json"
    params_file.write_text(json.dumps(params))
    up = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--run-dir", str(state), "up", "--workers", "1",
         "--params", str(params_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO),
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    # a thread reads the pipe: select() on the fd misses lines already in the file's buffer
    threading.Thread(target=lambda: [lines.put(ln) for ln in up.stdout], daemon=True).start()
    out = []
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and up.poll() is None:
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                continue
            out.append(line)
            if line.startswith("stack up:"):
                break
        while not lines.empty():  # what it printed before it ended, if it did
            out.append(lines.get())
        assert any(ln.startswith("stack up:") for ln in out), "".join(out)[-5000:]
        doc = json.loads((state / "stack.json").read_text())
        assert doc["pid"] == up.pid
        hosts = [i["host_pid"] for i in doc["instances"]]
        assert len(hosts) == 3 and all(running(p) for p in hosts)  # one of each role
        p = cli("status", state=state)
        assert p.returncode == 0, p.stderr
        for inst in doc["instances"]:
            assert inst["name"] in p.stdout
        p = cli("down", state=state)
        if p.returncode != 0:  # the supervisor dumped its threads' stacks (SIGUSR2): show them
            out += quiet_after(lines, 10)
        assert p.returncode == 0 and "stack down" in p.stdout, p.stdout + "".join(out[-200:])
        assert up.wait(timeout=60) == 0
        wait_for(lambda: not any(running(h) for h in hosts), 30, "every host to be gone")
        assert not (state / "stack.json").exists()
        assert cli("status", state=state).returncode == 3
    finally:
        end_process(up)
