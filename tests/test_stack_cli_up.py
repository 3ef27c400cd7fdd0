"""docs/sandbox.md, the quick start on the sandbox, run as a newcomer runs it: every block
marked `<!-- local: ... -->` (tools/doc_blocks.py), in doc order, from the repository's root,
as written. The first, `make sandbox`, runs on in the background as the stack's supervisor;
each later block must exit 0 with its `expect:` texts (status, a deployment of `make bundle
DAGS=examples/dags` on every instance, the admin's credentials, `hello` run to success through
the load balancer put on this machine's 127.0.0.1, a runbook command in `sandbox shell`, a
setting changed through the embedded SSM and `shell --all` until Airflow reads it), and
the last, `down`, ends the supervisor with exit 0, every process the state file names and the
embedded servers' directories in /tmp.

Besides the doc: the state file names the supervisor and every instance's host; the runbook's
push check, fed to `shell --all` on stdin, sees the setting on every instance; `shell` refuses
a name that is neither an instance nor a role, listing them; a revision whose DAG does not
import fails its first instance's AfterInstall, names it, and stops there (exit 1).

The stack is the smallest one (one instance a group), through the Makefile's own knobs
(WORKERS, PARAMS from the environment) and a run directory of the test's ($AEA_SANDBOX_RUN),
so the doc's commands stay verbatim."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sandbox.proc import end_process, running, wait_for
from sandbox.stack.parameters import EXAMPLE_PARAMETERS, read_parameters
from tools.doc_blocks import local_blocks, sandbox_blocks

pytestmark = [pytest.mark.systemd, pytest.mark.airflow, pytest.mark.aws, pytest.mark.redis]
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        capture_output=True, text=True, cwd=str(REPO), timeout=600, env=env,
    )  # fmt: skip


def bash(text: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-eo", "pipefail", "-c", text], capture_output=True, text=True, cwd=str(REPO),
        env=env, stdin=subprocess.DEVNULL, timeout=900, **kw,
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


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def broken_bundle(tmp_path: Path, env: dict) -> str:
    dags = tmp_path / "broken-dags"
    dags.mkdir()
    # (with "airflow" and "dag" in it: Airflow's safe mode skips a file without both words)
    (dags / "broken.py").write_text(
        "from airflow.sdk import dag\nimport a_module_nobody_installed\n"
    )
    p = bash(f"make -s bundle DAGS={dags} DIST={tmp_path / 'dist'}", env)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_the_sandbox_quick_start_runs_as_written(tmp_path):
    first, *steps = local_blocks(REPO)
    assert first.role == "background" and all(b.role == "run" for b in steps), [
        (b.name, b.role) for b in local_blocks(REPO)
    ]
    *steps, last = steps
    assert "sandbox down" in last.text, last.name
    state = tmp_path / "state"
    # the smallest stack (one instance a group): the Makefile's PARAMS and WORKERS knobs
    params = read_parameters(EXAMPLE_PARAMETERS)
    params["WebserverCount"] = "1"
    params_file = tmp_path / "parameters.json"
    params_file.write_text(json.dumps(params))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MAKEFLAGS")}
    env.update(AEA_SANDBOX_RUN=str(state), WORKERS="1", PARAMS=str(params_file))
    rigs_before = set(Path(tempfile.gettempdir()).glob("aea-rig-*"))
    free_before = mem_available_kib()
    t0 = time.monotonic()
    up = subprocess.Popen(
        ["bash", "-eo", "pipefail", "-c", first.text], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, cwd=str(REPO), env=env,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    # a thread reads the pipe: select() on the fd misses lines already in the file's buffer
    threading.Thread(target=lambda: [lines.put(ln) for ln in up.stdout], daemon=True).start()
    out: list = []
    try:
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline and up.poll() is None:
            try:
                out.append(lines.get(timeout=5))
            except queue.Empty:
                continue
            if all(text in "".join(out) for text in first.expect):
                break
        out += quiet_after(lines, 3)  # the rest of what `up` prints once the stack is up
        printed = "".join(out)
        assert all(text in printed for text in first.expect), printed[-5000:]
        print(f"\n{first.name}: stack up after {time.monotonic() - t0:.0f} s")
        assert "http://127.0.0.1:" in printed and "credentials" in printed, printed[-3000:]
        doc = json.loads((state / "stack.json").read_text())
        assert running(doc["pid"]) and doc["ui"].startswith("http://127.0.0.1:")
        hosts = [i["host_pid"] for i in doc["instances"]]
        assert len(hosts) == 3 and all(running(p) for p in hosts)  # one of each role
        print(f"memory taken by the stack: {(free_before - mem_available_kib()) / 2**20:.1f} GiB")
        failed = []
        for block in steps:
            t = time.monotonic()
            p = bash(block.text, env)
            output = p.stdout + p.stderr
            missing = [text for text in block.expect if text not in output]
            print(f"{block.name}: rc {p.returncode} in {time.monotonic() - t:.1f} s")
            if p.returncode != 0 or missing:
                failed.append((block.name, p.returncode, missing, output[-3000:]))
                break  # the later steps build on this one
        assert failed == []

        # beyond the doc: the runbook's push check, as sandbox.md says to run a saved block on
        # every instance (`shell --all < block.sh`), until step 6's setting is on all of them
        (check,) = [b for b in sandbox_blocks(REPO) if "config_rev=" in b.text]
        t = time.monotonic()

        def pushed_everywhere():
            p = subprocess.run(
                [sys.executable, "-m", "sandbox", "shell", "--all"], input=check.text,
                capture_output=True, text=True, cwd=str(REPO), timeout=300, env=env,
            )  # fmt: skip
            rows = [ln for ln in p.stdout.splitlines() if ln.startswith("role=")]
            done = p.returncode == 0 and len(rows) == len(doc["instances"])
            return rows if done and all("confapply=in-sync" in ln for ln in rows) else None

        rows = wait_for(pushed_everywhere, 300, "the setting on every instance")
        assert all("env-sync=ok" in ln and "held=none" in ln for ln in rows), rows
        print(f"push check: every instance in sync {time.monotonic() - t:.0f} s after step 6")
        # a wrong instance name is refused, naming what there is
        p = cli("shell", "database", env=env)
        assert p.returncode == 2 and "no instance or role 'database'" in p.stderr
        assert all(i["name"] in p.stderr for i in doc["instances"])
        # a DAG that does not import: the first instance's AfterInstall fails, the deployment
        # stops there, and deploy says so with exit 1
        p = cli("deploy", broken_bundle(tmp_path, env), env=env)
        assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
        assert "FAILED: Script at specified location:" in p.stderr, p.stderr[-2000:]
        assert "a_module_nobody_installed" in p.stderr, p.stderr[-2000:]
        assert "not deployed (a deployment stops at its first failure)" in p.stderr

        t = time.monotonic()
        p = bash(last.text, env)
        if p.returncode != 0:  # the supervisor dumped its threads' stacks (SIGUSR2): show them
            out += quiet_after(lines, 10)
        assert p.returncode == 0 and all(x in p.stdout for x in last.expect), p.stdout + "".join(
            out[-200:]
        )
        assert up.wait(timeout=60) == 0
        print(f"{last.name}: rc 0, everything ended {time.monotonic() - t:.1f} s after down")
        wait_for(lambda: not any(running(h) for h in hosts), 30, "every host to be gone")
        assert not running(doc["pid"])
        assert not (state / "stack.json").exists() and not (state / "control.sock").exists()
        assert cli("status", env=env).returncode == 3
        # the embedded servers' directories (port files, logs) went with them
        assert set(Path(tempfile.gettempdir()).glob("aea-rig-*")) - rigs_before == set()
    finally:
        if up.poll() is None:  # a failed step: end the stack through its supervisor
            cli("down", env=env)
        end_process(up)
