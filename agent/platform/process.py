"""The one way the agent starts a process: `run` (start, wait, collect) and `spawn` (a
long-lived co-process with pipes, the Airflow bridge).

Both prepare the child the same way:
- its environment is the given mapping (or ours) without the service manager's notify variables
  (`NOTIFY_SOCKET`, `WATCHDOG_*`): systemd logs, and ignores, notifications from a PID that is
  not the unit's main one;
- optionally another user (`RunAs`: uid, gid and exactly the supplementary groups given), a
  umask, a working directory;
- stdin is /dev/null and stdout/stderr are pipes or /dev/null, never ours: a CodeDeploy hook's
  output pipe must close when the hook exits, so nothing the hook starts may hold it;
- optionally a parent-death signal (SIGKILL), so a killed agent leaves no child still writing.

A program that cannot be started, a timeout, and (with check=True) a non-zero exit raise
`ProcessError`, or the subclass the caller names. Its message names the program, or the
caller's label, and never the arguments or the environment; `reason` tells the cases apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import grp
import os
import pwd
import signal
import subprocess
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Type, Union

from agent.errors import EXIT_TIMEOUT, AgentError
from agent.platform.notify import NOTIFY_ENV

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT

# ProcessError.reason
NOT_FOUND = "not found"
NOT_EXECUTABLE = "not executable"
CANNOT_START = "cannot start"
TIMEOUT = "timeout"
FAILED = "failed"

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

Stream = Union[int, IO[Any], None]


class ProcessError(AgentError):
    """A child could not be started, outlived its timeout, or (check=True) exited non-zero."""

    def __init__(
        self, message: str, *, program: str, reason: str, returncode: Optional[int] = None
    ):
        super().__init__(message)
        self.program = program
        self.reason = reason
        self.returncode = returncode
        if reason == TIMEOUT:
            # the same answer as every other deadline the agent keeps (README: exit codes)
            self.exit_code = EXIT_TIMEOUT


@dataclass(frozen=True)
class RunAs:
    """The user a child runs as: uid, gid and exactly these supplementary groups."""

    name: str
    uid: int
    gid: int
    groups: Tuple[int, ...]
    home: str

    @classmethod
    def lookup(cls, user: str, group: Optional[str] = None, supplementary: bool = True) -> RunAs:
        """`user` with its primary group (or `group`), and its groups from /etc/group unless
        supplementary=False. KeyError naming the user or group when there is no such one."""
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise KeyError(f"user {user!r} does not exist") from None
        gid = pw.pw_gid
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise KeyError(f"group {group!r} does not exist") from None
        groups = tuple(os.getgrouplist(user, gid)) if supplementary else ()
        return cls(user, pw.pw_uid, gid, groups, pw.pw_dir)


@dataclass(frozen=True)
class Result:
    """What a finished child left: its exit status and its output, decoded (bad UTF-8 replaced).
    stderr is "" when it was merged into stdout or discarded."""

    returncode: int
    stdout: str
    stderr: str


def child_env(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """`env` (default: ours) without the variables that belong to the unit's main process."""
    out = dict(os.environ if env is None else env)
    for name in NOTIFY_ENV:
        out.pop(name, None)
    return out


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not a glibc/musl system
        return None


def _die_with_parent_preexec() -> Optional[Callable[[], None]]:
    libc = _libc()
    if libc is None:  # pragma: no cover
        return None
    parent = os.getpid()

    def preexec() -> None:
        # runs in the child after the user switch (which clears the setting), before exec.
        # The "parent" is the forking thread: spawn from a thread that outlives the child.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def spawn(
    argv: Sequence[str],
    *,
    env: Optional[Mapping[str, str]] = None,
    user: Optional[RunAs] = None,
    umask: Optional[int] = None,
    cwd: Optional[Union[str, os.PathLike]] = None,
    stdin: Stream = DEVNULL,
    stdout: Stream = DEVNULL,
    stderr: Stream = DEVNULL,
    die_with_parent: bool = False,
    error: Type[ProcessError] = ProcessError,
) -> subprocess.Popen:
    """Start `argv` (bytes pipes) and return at once; the caller owns, waits for and reaps it."""
    argv = [str(a) for a in argv]
    program = argv[0]
    kwargs: Dict[str, Any] = {}
    if user is not None:
        kwargs.update(user=user.uid, group=user.gid, extra_groups=list(user.groups))
    try:
        return subprocess.Popen(
            argv,
            env=child_env(env),
            cwd=None if cwd is None else str(cwd),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            umask=-1 if umask is None else umask,
            preexec_fn=_die_with_parent_preexec() if die_with_parent else None,
            close_fds=True,
            **kwargs,
        )
    except FileNotFoundError as exc:
        if cwd is not None and exc.filename == str(cwd):
            raise error(
                f"cannot run {program}: working directory {cwd} does not exist",
                program=program,
                reason=CANNOT_START,
            ) from None
        raise error(f"cannot run {program}: not found", program=program, reason=NOT_FOUND) from None
    except PermissionError as exc:
        if exc.filename == program:
            raise error(
                f"cannot run {program}: not executable", program=program, reason=NOT_EXECUTABLE
            ) from None
        raise error(
            f"cannot run {program}: {exc.strerror}", program=program, reason=CANNOT_START
        ) from None
    except (OSError, subprocess.SubprocessError) as exc:
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise error(f"cannot run {program}: {why}", program=program, reason=CANNOT_START) from None


def end(proc: subprocess.Popen) -> None:
    """SIGKILL (if still running), reap, close our pipe ends. Does not wait for grandchildren
    that may hold a pipe."""
    proc.kill()  # a no-op once it has exited
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):  # a broken pipe on flush
                stream.close()


def _tail(text: str, limit: int = 400) -> str:
    return " ".join(text.strip().splitlines())[:limit]


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Optional[Mapping[str, str]] = None,
    user: Optional[RunAs] = None,
    umask: Optional[int] = None,
    cwd: Optional[Union[str, os.PathLike]] = None,
    input: Optional[bytes] = None,  # noqa: A002 - mirrors subprocess.run
    capture: bool = True,
    merge_stderr: bool = False,
    die_with_parent: bool = False,
    check: bool = False,
    quote_stderr: bool = False,
    label: Optional[str] = None,
    error: Type[ProcessError] = ProcessError,
) -> Result:
    """Run `argv` to its end, at most `timeout` seconds (then SIGKILL and `error`).

    capture=False sends its output to /dev/null; merge_stderr puts stderr into stdout. `label`
    names the run in messages (default: the program). check=True raises on a non-zero exit;
    quote_stderr adds the tail of its stderr (or stdout) to that message — only for programs
    whose output cannot quote a secret. Any exception while waiting (a signal handler raising,
    KeyboardInterrupt) kills the child first.
    """
    name = label or str(argv[0])
    out_to = PIPE if capture else DEVNULL
    proc = spawn(
        argv,
        env=env,
        user=user,
        umask=umask,
        cwd=cwd,
        stdin=DEVNULL if input is None else PIPE,
        stdout=out_to,
        stderr=(STDOUT if merge_stderr else PIPE) if capture else DEVNULL,
        die_with_parent=die_with_parent,
        error=error,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        end(proc)
        raise error(
            f"{name} did not finish within {timeout:g} s; killed",
            program=str(argv[0]),
            reason=TIMEOUT,
        ) from None
    except BaseException:
        end(proc)
        raise
    result = Result(
        proc.returncode,
        (out or b"").decode("utf-8", errors="replace"),
        (err or b"").decode("utf-8", errors="replace"),
    )
    if check and result.returncode != 0:
        msg = f"{name} failed (exit status {result.returncode})"
        if quote_stderr:
            detail = _tail(result.stderr or result.stdout)
            msg += f": {detail}" if detail else ""
        raise error(msg, program=str(argv[0]), reason=FAILED, returncode=result.returncode)
    return result
