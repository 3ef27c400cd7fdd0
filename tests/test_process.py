"""agent.platform.process against real processes (/bin/sh, /usr/bin/env, python -c): the one
error type for not-found, timeout and failure; umask, user switch, parent-death signal, no
NOTIFY_SOCKET, stdin and stdout never ours; and the four callers on top of it (systemctl, the
Airflow CLI, the bridge's spawn, the deploy hook's exit code)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.airflow.bridge_client import AirflowBridge
from agent.airflow.execution import AirflowCli
from agent.errors import EXIT_FAILURE, EXIT_TIMEOUT, EXIT_USAGE, ConfigError
from agent.platform import process
from agent.platform.process import ProcessError, RunAs
from agent.platform.systemd import Systemctl, SystemctlError
from sandbox.proc import wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the user switch needs root")


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (it runs no more code)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] == "Z"


def _nobody() -> RunAs:
    return RunAs.lookup("nobody")


# ---------------------------------------------------------------- run: results and errors


def test_run_returns_status_and_both_streams_decoded():
    r = process.run(["/bin/sh", "-c", "printf 'out\\377'; echo err >&2; exit 3"], timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\ufffd", "err\n")
    merged = process.run(["/bin/sh", "-c", "echo a; echo b >&2"], timeout=10, merge_stderr=True)
    assert merged.stdout.split() == ["a", "b"] and merged.stderr == ""
    quiet = process.run(["/bin/sh", "-c", "echo a; echo b >&2"], timeout=10, capture=False)
    assert (quiet.stdout, quiet.stderr) == ("", "")


def test_timeout_kills_the_child_and_raises_the_one_error(tmp_path):
    pid_file = tmp_path / "pid"
    argv = ["/bin/sh", "-c", f"echo $$ > {pid_file}; exec sleep 30", "secret-arg"]
    with pytest.raises(ProcessError) as info:
        process.run(argv, timeout=0.5, label="the sleeper")
    err = info.value
    assert err.reason == process.TIMEOUT and err.program == "/bin/sh"
    assert str(err) == "the sleeper did not finish within 0.5 s; killed"
    assert err.exit_code == EXIT_TIMEOUT
    assert _gone(int(pid_file.read_text()))


def test_not_found_names_the_program(tmp_path):
    with pytest.raises(ProcessError) as info:
        process.run([str(tmp_path / "no-such-tool"), "--password=hunter2"], timeout=5)
    assert info.value.reason == process.NOT_FOUND
    assert str(info.value) == f"cannot run {tmp_path / 'no-such-tool'}: not found"
    assert info.value.exit_code == EXIT_FAILURE


def test_not_executable_and_a_missing_working_directory_are_told_apart(tmp_path):
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(ProcessError) as info:
        process.run([str(script)], timeout=5)
    assert info.value.reason == process.NOT_EXECUTABLE and str(script) in str(info.value)
    with pytest.raises(ProcessError) as info:
        process.run(["/bin/true"], timeout=5, cwd=tmp_path / "gone")
    assert info.value.reason == process.CANNOT_START
    assert (
        str(info.value)
        == f"cannot run /bin/true: working directory {tmp_path / 'gone'} does not exist"
    )


def test_check_raises_on_failure_and_quotes_stderr_only_when_asked():
    argv = ["/bin/sh", "-c", "echo 'the value is hunter2' >&2; exit 4", "hunter3"]
    with pytest.raises(ProcessError) as info:
        process.run(argv, timeout=10, check=True, label="tool")
    err = info.value
    assert (err.reason, err.returncode, str(err)) == (
        process.FAILED,
        4,
        "tool failed (exit status 4)",
    )
    with pytest.raises(ProcessError) as info:
        process.run(argv, timeout=10, check=True, quote_stderr=True, label="tool")
    assert str(info.value) == "tool failed (exit status 4): the value is hunter2"
    assert process.run(argv, timeout=10).returncode == 4  # check=False: the caller decides


def test_the_error_class_is_the_callers():
    class ToolError(ProcessError):
        pass

    with pytest.raises(ToolError):
        process.run(["/bin/false"], timeout=5, check=True, error=ToolError)
    with pytest.raises(ToolError):
        process.spawn(["/nonexistent/tool"], error=ToolError)


def test_an_exception_while_waiting_kills_and_reaps_the_child(tmp_path):
    """A signal handler that raises (the oneshot's SIGTERM handler does) ends the child."""
    pid_file = tmp_path / "pid"

    class Stop(Exception):
        pass

    def handler(_signum, _frame):
        raise Stop()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Stop):
            process.run(["/bin/sh", "-c", f"echo $$ > {pid_file}; exec sleep 30"], timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped, not a zombie


# ---------------------------------------------------------------- the child's preparation


def _our_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_umask_applies_to_files_the_child_creates(tmp_path):
    ours = _our_umask()
    for umask, mode in ((0o077, 0o600), (0o027, 0o640)):
        target = tmp_path / f"f{umask:o}"
        process.run(["/bin/sh", "-c", f": > {target}"], timeout=10, umask=umask)
        assert stat.S_IMODE(target.stat().st_mode) == mode
    assert _our_umask() == ours  # set in the child only


@as_root
def test_user_switch_sets_uid_gid_and_exactly_the_groups():
    nobody = _nobody()
    out = process.run(["/bin/sh", "-c", "id -u; id -g; id -G"], timeout=10, user=nobody).stdout
    uid, gid, groups = out.splitlines()
    assert (int(uid), int(gid)) == (nobody.uid, nobody.gid)
    assert sorted(int(g) for g in groups.split()) == sorted(set(nobody.groups) | {nobody.gid})
    assert 0 not in [int(g) for g in groups.split()]  # none of root's groups kept

    bare = RunAs.lookup("nobody", "nogroup", supplementary=False)
    out = process.run(["id", "-G"], timeout=10, user=bare).stdout
    assert out.split() == [str(bare.gid)]


def test_run_as_lookup_names_what_is_missing():
    with pytest.raises(KeyError, match="user 'no-such-user-x' does not exist"):
        RunAs.lookup("no-such-user-x")
    with pytest.raises(KeyError, match="group 'no-such-group-x' does not exist"):
        RunAs.lookup("nobody", "no-such-group-x")


def test_notify_variables_are_not_inherited(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("AEA_MARKER", "kept")
    inherited = process.run(["/usr/bin/env"], timeout=10).stdout.splitlines()
    assert "AEA_MARKER=kept" in inherited
    assert [v for v in inherited if v.startswith(("NOTIFY_SOCKET=", "WATCHDOG_"))] == []
    given = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": "/x", "A": "1"}
    assert process.run(["/usr/bin/env"], timeout=10, env=given).stdout.split() == [
        "PATH=/usr/bin:/bin",
        "A=1",
    ]


def test_stdin_is_closed_and_stdout_is_never_ours(tmp_path):
    # `cat` would wait forever on an inherited terminal or pipe; it sees EOF at once
    r = process.run(["/bin/sh", "-c", "cat; echo eof"], timeout=10)
    assert r.stdout == "eof\n"
    assert process.run(["cat"], timeout=10, input=b"given").stdout == "given"
    # a process left running holds /dev/null, not our stdout/stderr (a CodeDeploy hook's pipe)
    proc = process.spawn(["sleep", "30"])
    try:
        fds = {n: os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in (0, 1, 2)}
    finally:
        process.end(proc)
    assert fds == {0: "/dev/null", 1: "/dev/null", 2: "/dev/null"}
    assert proc.returncode == -signal.SIGKILL


def test_die_with_parent_kills_the_child_when_its_parent_is_killed(tmp_path):
    """A parent python runs process.run(sleep); SIGKILL it: the sleeper goes too. The same
    without die_with_parent survives (so the check can fail)."""

    def start(die: bool, name: str) -> tuple:
        pid_file = tmp_path / name
        script = textwrap.dedent(
            f"""
            from agent.platform import process
            process.run(["/bin/sh", "-c", "echo $$ > {pid_file}; exec sleep 60"],
                        timeout=120, die_with_parent={die})
            """
        )
        parent = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=str(REPO_ROOT),
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdin=subprocess.DEVNULL,
        )
        child = int(wait_for(lambda: pid_file.read_text().strip(), 30, f"{name} to start"))
        return parent, child

    parent, child = start(True, "dies")
    parent.kill()
    parent.wait()
    wait_for(lambda: _gone(child), 10, "the child of a killed parent to die")

    parent, child = start(False, "survives")
    try:
        parent.kill()
        parent.wait()
        with pytest.raises(TimeoutError):
            wait_for(lambda: _gone(child), 1, "an orphan without die_with_parent to die")
    finally:
        os.kill(child, signal.SIGKILL)


def test_spawn_gives_a_co_process_pipes_with_the_same_preparation(tmp_path):
    echo = 'while read line; do echo "$line $(id -u) $(umask) $(pwd) ${NOTIFY_SOCKET-none}"; done'
    user = _nobody() if os.geteuid() == 0 else None
    tmp_path.chmod(0o755)
    proc = process.spawn(
        ["/bin/sh", "-c", echo],
        env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": "/x"},
        user=user,
        umask=0o077,
        cwd=tmp_path,
        stdin=process.PIPE,
        stdout=process.PIPE,
        die_with_parent=True,
    )
    try:
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        reply = proc.stdout.readline().decode().split()
    finally:
        process.end(proc)
    uid = user.uid if user else os.getuid()
    assert reply == ["ping", str(uid), "0077", str(tmp_path), "none"]


# ---------------------------------------------------------------- the callers


def test_systemctl_errors_are_process_errors_quoting_systemctl():
    fake = ["/bin/sh", "-c", 'echo "Unit $2 not found." >&2; exit 5', "systemctl"]
    with pytest.raises(SystemctlError) as info:
        Systemctl(fake, timeout=10).stop("x.service")
    assert isinstance(info.value, ProcessError)
    assert (
        str(info.value)
        == "systemctl stop x.service failed (exit status 5): Unit x.service not found."
    )
    with pytest.raises(SystemctlError) as info:
        Systemctl(["/nonexistent/systemctl"]).start("x.service")
    assert info.value.reason == process.NOT_FOUND
    slow = ["/bin/sh", "-c", "exec sleep 30", "systemctl"]
    with pytest.raises(SystemctlError) as info:
        Systemctl(slow, timeout=0.3).restart("x.service")
    assert str(info.value) == "systemctl restart x.service did not finish within 0.3 s; killed"


def test_systemctl_show_parses_and_a_manager_that_cannot_be_run_is_a_reason():
    fake = ["/bin/sh", "-c", "printf 'ActiveState=active\\nMainPID=42\\n'", "systemctl"]
    assert Systemctl(fake).show("x", "ActiveState", "MainPID") == {
        "ActiveState": "active",
        "MainPID": "42",
    }
    reason = Systemctl(["/nonexistent/systemctl"]).manager_unreachable_reason()
    assert reason == "cannot run /nonexistent/systemctl: not found"


def test_airflow_cli_names_its_config_keys(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    missing = AirflowCli(["/nonexistent/airflow"], env, None, tmp_path, 10)
    with pytest.raises(ConfigError) as info:
        missing.run("variables", "import", "x.json")
    assert str(info.value) == "variables.airflow_command: /nonexistent/airflow not found"
    assert info.value.exit_code == EXIT_USAGE

    slow = AirflowCli(["/bin/sh", "-c", "exec sleep 30"], env, None, tmp_path, 0.3)
    with pytest.raises(ProcessError) as info:
        slow.run("variables", "export", "y.json")
    assert str(info.value) == (
        "airflow variables export did not finish within 0.3 s; killed (variables.timeout)"
    )
    assert info.value.exit_code == EXIT_TIMEOUT

    both = AirflowCli(["/bin/sh", "-c", "echo out; echo err >&2; exit 2"], env, None, tmp_path, 10)
    assert both.run("variables", "list") == (2, "out\nerr\n") and both.calls == 1


def test_the_bridge_names_a_missing_interpreter(tmp_path):
    bridge = AirflowBridge("/nonexistent/python", {"PATH": "/bin"}, None, tmp_path, 5)
    with pytest.raises(ConfigError) as info:
        bridge.start()
    assert str(info.value) == "variables.airflow_python: /nonexistent/python not found"
