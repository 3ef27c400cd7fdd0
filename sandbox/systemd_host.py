"""A disposable real systemd 252 as a test host, for tests, `make demo` and bench/.

`SystemdHost` boots /lib/systemd/systemd as PID 1 of fresh cgroup, pid, mount, uts, ipc and net
namespaces, on an overlay of the machine's root whose writable layer is a tmpfs (see
sandbox/systemd_host_init.sh for every step, and TESTING.md "A real systemd as a test host"
for why each is there). Units, EnvironmentFile parsing, Type=notify, timers, restarts and
journald then behave as on an instance, and nothing the host does reaches the real machine:

- the launcher moves itself into fresh child cgroups of the name=systemd and unified
  hierarchies before `unshare`, so systemd's cgroup tree is a subtree we own and remove;
- it is driven only with `nsenter -t PID -a` (every namespace, its root);
- it is torn down ONLY by SIGKILL of its PID 1 from outside, never by a shutdown, and then the
  cgroup directories it left are removed leaf-first; `stop()` is idempotent and also runs from
  `__exit__` and an atexit guard; if the Python process dies, the kernel kills the launcher
  (PR_SET_PDEATHSIG) and `unshare --kill-child` kills systemd.

Typical use::

    with SystemdHost(shared_dir) as host:          # boots, waits for running/degraded
        host.install_project(repo_dir)             # the agent as cfn-init installs it
        host.bridge_port(moto_port)                # host 127.0.0.1:port reachable inside
        host.set_default_environment({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}"})
        host.systemctl("start", "airflow-agent-env.service")
        print(host.journal("airflow-agent-env.service"))

PIDs returned by `main_pid()` are PIDs inside the host's pid namespace; `pid` is systemd's PID
as seen from outside.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, TypeVar, Union

from sandbox.netbridge import ForwarderError, start_forwarder
from sandbox.proc import die_with_parent, wait_for
from sandbox.tiers import heavy

__all__ = [
    "SystemdHost",
    "SystemdHostError",
    "CommandFailed",
    "wait_for",
    "build_wheelhouse",
    "sweep_stale",
]

SYSTEMD = "/lib/systemd/systemd"
INIT_SCRIPT = Path(__file__).resolve().with_name("systemd_host_init.sh")
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def enter_argv(pid: int) -> List[str]:
    """The argv prefix that runs a command inside the test host whose init is `pid`."""
    # -a: every namespace; -r/-w: the target's root and cwd (the overlay, after pivot_root).
    return ["nsenter", "-t", str(pid), "-a", "-r", "-w", "--"]


# Files whose content decides the wheelhouse (the package's sources and build metadata).
_BUILD_FILES = ("setup.cfg", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE")

T = TypeVar("T")


class SystemdHostError(RuntimeError):
    """The test host could not be booted, driven or torn down."""


class CommandFailed(subprocess.CalledProcessError):
    """A command run inside the host exited non-zero; str() includes its output."""

    def __str__(self) -> str:
        def text(b: object) -> str:
            if isinstance(b, bytes):
                return b.decode("utf-8", "replace")
            return str(b or "")

        return (
            f"{super().__str__()}\n--- stdout ---\n{text(self.stdout)[-4000:]}"
            f"\n--- stderr ---\n{text(self.stderr)[-4000:]}"
        )


# ---------------------------------------------------------------------------------------------
# process helpers


def _proc_starttime(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat: identifies a process across PID reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parens; fields after the last ')' are fixed.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _children(pid: int) -> List[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(x) for x in text.split()]
    except OSError:
        pass
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ns(kind: str) -> str:
    return os.readlink(f"/proc/self/ns/{kind}")


def _cgroup_dirs_leaf_first(root: Path) -> List[Path]:
    dirs = [Path(dp) for dp, _, _ in os.walk(root)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _cgroup_procs(root: Path) -> List[int]:
    pids: List[int] = []
    for d in _cgroup_dirs_leaf_first(root):
        with contextlib.suppress(OSError):
            pids += [int(x) for x in (d / "cgroup.procs").read_text().split()]
    return pids


_TAG_PREFIX = "aea-sdhost-"
_STALE_RE = re.compile(r"^aea-sdhost-.+-(\d+)-[0-9a-f]{8}(-[^/]*)?$")


def sweep_stale() -> List[str]:
    """Remove what test hosts of *dead* processes left: cgroup dirs and temp dirs. Returns them.

    A test process killed outright (SIGKILL, OOM) cannot run stop(); the kernel still kills its
    systemd (PR_SET_PDEATHSIG + unshare --kill-child), but the empty cgroup directories stay.
    Only names made by this module whose creator PID is gone are touched, and only once no
    process is left in them.
    """
    removed: List[str] = []
    for root in (*CGROUP_ROOTS, Path(tempfile.gettempdir())):
        try:
            entries = list(root.iterdir())
        except OSError:
            continue
        for d in entries:
            m = _STALE_RE.match(d.name)
            if not m or not d.is_dir() or Path(f"/proc/{m.group(1)}").exists():
                continue
            if root in CGROUP_ROOTS:
                if _cgroup_procs(d):
                    continue
                for sub in _cgroup_dirs_leaf_first(d):
                    with contextlib.suppress(OSError):
                        os.rmdir(sub)
            else:
                base = d / "mnt"
                if base.exists() and (os.path.ismount(base) or any(base.iterdir())):
                    continue  # never recurse into anything that could be a mount
                with contextlib.suppress(OSError):
                    base.rmdir()
                with contextlib.suppress(OSError):
                    (d / "console.log").unlink()
                with contextlib.suppress(OSError):
                    d.rmdir()
            if not d.exists():
                removed.append(str(d))
    return removed


# ---------------------------------------------------------------------------------------------
# wheelhouse


def _source_files(repo: Path) -> List[Path]:
    files = [repo / n for n in _BUILD_FILES if (repo / n).is_file()]
    for dp, dns, fns in os.walk(repo / "agent"):
        dns[:] = sorted(d for d in dns if d != "__pycache__")
        files += [Path(dp) / f for f in sorted(fns) if not f.endswith((".pyc", ".pyo"))]
    return files


_META_FILES = ("setup.cfg", "setup.py", "pyproject.toml")


def _hash_files(repo: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256(f"py{sys.version_info[0]}.{sys.version_info[1]}\0".encode())
    for f in files:
        h.update(str(f.relative_to(repo)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# the interpreter the test host builds its venv with (Debian's python3, as on the instance's
# OS image): dependency wheels are resolved by it so environment markers match (redis needs
# async-timeout below Python 3.11.3, for one)
HOST_PYTHON = "/usr/bin/python3"


def _builder_python(cache: Path) -> str:
    """A venv of HOST_PYTHON with pip, made once under the cache."""
    venv = cache / "builder-venv"
    if not (venv / "bin" / "pip").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([HOST_PYTHON, "-m", "venv", str(venv)], check=True, timeout=300)
    return str(venv / "bin" / "python")


def pip_wheel(
    src: Path, out: Path, *flags: str, extras: str = "", python: Optional[str] = None
) -> None:
    proc = subprocess.run(
        [
            python or sys.executable,
            "-m",
            "pip",
            "wheel",
            "--disable-pip-version-check",
            "-q",
            *flags,
            "-w",
            str(out),
            str(src) + extras,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemdHostError(f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}")


def _cached_build(cache: Path, name: str, build: Callable[[Path], None]) -> Path:
    """cache/name, built once by build(tmpdir) and renamed into place; others of its kind go."""
    dest = cache / name
    if not (dest / ".complete").exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            build(out)
            (out / ".complete").write_text(name + "\n")
            if dest.exists():  # a half-built leftover of an interrupted run
                shutil.rmtree(dest)
            os.rename(out, dest)
    kind = name.rsplit("-", 1)[0]
    for old in cache.glob(f"{kind}-*"):
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def build_wheelhouse(repo_dir: Union[str, Path], cache_dir: Optional[Path] = None) -> Path:
    """Wheels of the package and all its dependencies, built on the machine (which has PyPI).

    Two caches under <repo>/.cache/systemd-host: the dependencies, keyed by the build metadata
    (setup.cfg & co.), and the package itself, keyed by metadata + agent/ sources, so editing
    the agent rebuilds one small wheel and an unchanged tree costs nothing. Returns a directory
    holding both sets (hard links). The package is built from a copy of its files so the work
    tree gets no build/ litter.
    """
    repo = Path(repo_dir).resolve()
    cache = Path(cache_dir) if cache_dir else repo / ".cache" / "systemd-host"
    files = _source_files(repo)
    meta = [f for f in files if f.name in _META_FILES and f.parent == repo]
    if not meta:
        raise SystemdHostError(f"{repo} has no setup.cfg/setup.py/pyproject.toml")

    def copy_src(tmp: Path) -> Path:
        src = tmp.parent / "src"
        for f in files:
            (src / f.relative_to(repo)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src / f.relative_to(repo))
        return src

    def build_deps(out: Path) -> None:
        # with the worker extra (celery), as cfn-init installs it on workers: a test host may
        # play any role
        pip_wheel(copy_src(out), out, extras="[worker]", python=_builder_python(cache))
        for w in out.glob("*.whl"):  # the package's own wheel comes from the pkg cache
            if _wheel_project(w) == _project_name(repo):
                w.unlink()

    def build_pkg(out: Path) -> None:
        # The package's wheel is built from `make dist`'s artifact, unpacked as the template's
        # cfn-init unpacks it, so the agent installed on a host is that artifact's code.
        # Without build isolation when this interpreter can build (setuptools + wheel): ~2 s
        # instead of ~6 s for a fresh isolated build environment.
        can_build = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))
        flags = ("--no-deps", "--no-build-isolation") if can_build else ("--no-deps",)
        pip_wheel(unpack_package(repo, out.parent / "src"), out, *flags)

    # the extras are part of what is built, so part of the key
    deps = _cached_build(cache, f"deps-worker-host-{_hash_files(repo, meta)}", build_deps)
    key = _hash_files(repo, files)
    pkg = _cached_build(cache, f"pkg-{key}", build_pkg)

    def link_both(out: Path) -> None:
        for d in (deps, pkg):
            for w in d.glob("*.whl"):
                os.link(w, out / w.name)

    return _cached_build(cache, f"wheelhouse-{deps.name}-{key}", link_both)


def unpack_package(repo: Path, dest: Path) -> Path:
    """`make dist`'s artifact for `repo` (tools/release.py) unpacked into dest, as the
    template's `tar -xzf ... -C /opt/airflow-agent/src` does; returns dest."""
    import io
    import tarfile

    from tools.release import build_dist

    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(build_dist(repo)), mode="r:gz") as tar:
        for member in tar.getmembers():  # our own archive: regular files at relative paths
            if not member.isfile() or member.name.startswith("/") or ".." in member.name:
                raise SystemdHostError(f"unexpected member in the agent package: {member.name}")
        tar.extractall(dest)
    return dest


def _wheel_project(wheel: Path) -> str:
    return wheel.name.split("-", 1)[0].lower().replace("_", "-").replace(".", "-")


def _project_name(repo: Path) -> str:
    m = (
        re.search(r"^name\s*=\s*(\S+)", (repo / "setup.cfg").read_text(), re.M)
        if (repo / "setup.cfg").is_file()
        else None
    )
    if not m:
        m = re.search(r'^name\s*=\s*"([^"]+)"', (repo / "pyproject.toml").read_text(), re.M)
    if not m:
        raise SystemdHostError(f"cannot find the project name in {repo}")
    return m.group(1).lower().replace("_", "-").replace(".", "-")


# ---------------------------------------------------------------------------------------------
# the host

_LIVE: set[SystemdHost] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    for host in list(_LIVE):
        try:
            host.stop()
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            sys.stderr.write(f"systemd_host: teardown of {host.name} failed: {exc}\n")


atexit.register(_stop_all_at_exit)


@heavy("systemd")
class SystemdHost:
    """A real systemd as PID 1 of its own namespaces; see the module docstring."""

    def __init__(
        self,
        shared_dir: Union[str, Path],
        name: str = "aea-test",
        repo_dir: Optional[Union[str, Path]] = None,
    ) -> None:
        self.shared_dir = Path(shared_dir).resolve()
        self.name = name
        # the project's tree is seen inside at its own path even when it lives under /tmp
        self.repo_dir = Path(repo_dir or Path(__file__).resolve().parents[1]).resolve()
        self.pid: Optional[int] = None  # systemd, as seen from outside
        self.boot_state: Optional[str] = None
        self.boot_seconds: Optional[float] = None
        self._starttime: Optional[int] = None
        self._launcher: Optional[subprocess.Popen] = None
        self._cgroups: List[Path] = []
        self._workdir: Optional[Path] = None
        self._base: Optional[Path] = None
        self._bridges: List[subprocess.Popen] = []
        self._lock = threading.RLock()
        self._stopped = False

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> SystemdHost:
        if self.pid is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def console_log(self) -> str:
        """What systemd printed on its console (its stdout/stderr) so far."""
        if self._workdir is None:
            return ""
        try:
            return (self._workdir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 30.0) -> SystemdHost:
        """Boot, and wait until `systemctl is-system-running` says running or degraded.

        Call it from a thread that outlives the host (normally the main thread): the launcher
        gets SIGKILL when the thread that forked it exits (PR_SET_PDEATHSIG).
        """
        if os.geteuid() != 0:
            raise SystemdHostError("the systemd test host needs root")
        if self.pid is not None or self._stopped:
            raise SystemdHostError("a SystemdHost can be started once")
        for tool in ("unshare", "nsenter", "setpriv", "findmnt"):
            if shutil.which(tool) is None:
                raise SystemdHostError(f"{tool} not found")
        if not self.shared_dir.is_dir():
            raise SystemdHostError(f"shared_dir {self.shared_dir} is not a directory")
        for root in CGROUP_ROOTS:
            if not (root / "cgroup.procs").exists():
                raise SystemdHostError(f"{root} is not a mounted cgroup hierarchy")
        t0 = time.monotonic()
        deadline = t0 + timeout
        sweep_stale()
        tag = f"{_TAG_PREFIX}{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
            self._base = self._workdir / "mnt"
            self._base.mkdir()
            for root in CGROUP_ROOTS:
                d = root / tag
                d.mkdir()
                self._cgroups.append(d)
            cgroups = list(self._cgroups)

            def preexec() -> None:
                # Runs in the forked launcher before exec: die with our process, and move into
                # the fresh cgroups so systemd's tree is a subtree of ours.
                die_with_parent()
                for d in cgroups:
                    with open(d / "cgroup.procs", "w") as f:
                        f.write(str(os.getpid()))

            env = {
                "PATH": INSIDE_PATH,
                "AEA_BASE": str(self._base),
                "AEA_SHARED": str(self.shared_dir),
                "AEA_REPO": str(self.repo_dir),
                "AEA_NAME": self.name,
                "AEA_HOST_MNTNS": _ns("mnt"),
                "AEA_HOST_NETNS": _ns("net"),
                "AEA_HOST_PIDNS": _ns("pid"),
                "AEA_HOST_CGNS": _ns("cgroup"),
            }
            with open(self._workdir / "console.log", "wb") as console:
                self._launcher = subprocess.Popen(
                    [
                        "unshare",
                        "--cgroup",
                        "--pid",
                        "--fork",
                        "--mount",
                        "--net",
                        "--uts",
                        "--ipc",
                        "--propagation",
                        "private",
                        "--kill-child=SIGKILL",
                        "/bin/sh",
                        str(INIT_SCRIPT),
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    preexec_fn=preexec,
                    close_fds=True,
                )
            launcher = self._launcher

            def systemd_pid() -> Optional[int]:
                if launcher.poll() is not None:
                    raise SystemdHostError(
                        f"launcher exited with {launcher.returncode}:\n{self.console_log}"
                    )
                for kid in _children(launcher.pid):
                    if _comm(kid) == "systemd":
                        return kid
                return None

            self.pid = wait_for(
                systemd_pid,
                max(1.0, deadline - time.monotonic()),
                "systemd to be exec'd",
                interval=0.02,
            )
            self._starttime = _proc_starttime(self.pid)

            def booted() -> Optional[str]:
                if launcher.poll() is not None:
                    raise SystemdHostError(f"systemd exited:\n{self.console_log}")
                state = self.run(
                    ["systemctl", "is-system-running"], check=False, timeout=10
                ).stdout.strip()
                return state if state in ("running", "degraded") else None

            self.boot_state = wait_for(
                booted,
                max(1.0, deadline - time.monotonic()),
                "systemctl is-system-running to say running/degraded",
            )
            self.boot_seconds = time.monotonic() - t0
            return self
        except BaseException:
            log = self.console_log
            self.stop()
            if log:
                sys.stderr.write(f"--- systemd test host console ---\n{log[-8000:]}\n")
            raise

    def stop(self) -> None:
        """SIGKILL PID 1 from outside, reap, remove our cgroups and temp dirs. Idempotent."""
        with self._lock:
            errors: List[str] = []
            for b in self._bridges:
                if b.poll() is None:
                    b.kill()
                try:
                    b.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    errors.append(f"bridge pid {b.pid} did not exit")
            self._bridges = [b for b in self._bridges if b.returncode is None]

            # Only ever the process we started: same PID *and* same start time.
            if self.pid is not None and _proc_starttime(self.pid) == self._starttime:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            if self._launcher is not None:
                try:
                    self._launcher.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    # unshare waits for its child; if it is still here, end it by its PID.
                    self._launcher.kill()
                    self._launcher.wait(timeout=10)

            for cg in list(self._cgroups):
                if not cg.exists():
                    self._cgroups.remove(cg)
                    continue
                try:
                    wait_for(lambda cg=cg: not _cgroup_procs(cg), 15, f"processes in {cg} to exit")
                except TimeoutError as exc:
                    errors.append(f"{exc}: {_cgroup_procs(cg)}")
                    continue
                for d in _cgroup_dirs_leaf_first(cg):
                    try:
                        os.rmdir(d)
                    except OSError as exc:
                        errors.append(f"rmdir {d}: {exc}")
                if not cg.exists():
                    self._cgroups.remove(cg)

            if self._workdir is not None and self._workdir.exists():
                # The base dir was a mount point only inside the dead mount namespace; here it
                # must be an empty directory. Never recurse into it.
                if self._base is not None and self._base.exists():
                    if os.path.ismount(self._base):
                        errors.append(f"{self._base} is a mount point in the host namespace!")
                    else:
                        try:
                            os.rmdir(self._base)
                        except OSError as exc:
                            errors.append(f"rmdir {self._base}: {exc}")
                with contextlib.suppress(FileNotFoundError):
                    (self._workdir / "console.log").unlink()
                try:
                    os.rmdir(self._workdir)
                except OSError as exc:
                    errors.append(f"rmdir {self._workdir}: {exc}")
            self._stopped = True
            if errors:
                raise SystemdHostError("teardown incomplete: " + "; ".join(errors))
            with _LIVE_LOCK:
                _LIVE.discard(self)

    @property
    def cgroup_dirs(self) -> List[Path]:
        """The host-side cgroup directories this host lives in (empty after stop())."""
        return list(self._cgroups)

    # -- driving it ----------------------------------------------------------------------------

    def _nsenter(self) -> List[str]:
        if self.pid is None or self._stopped:
            raise SystemdHostError("the test host is not running")
        return enter_argv(self.pid)

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 120,
        env: Optional[Mapping[str, str]] = None,
        input: Union[str, bytes, None] = None,  # noqa: A002 - mirrors subprocess.run
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run argv inside the host (all its namespaces) with a clean environment."""
        full_env = {
            "PATH": INSIDE_PATH,
            "LANG": "C.UTF-8",
            "HOME": "/root",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
            "TERM": "dumb",
        }
        full_env.update(env or {})
        if isinstance(input, str) and not text:
            input = input.encode()
        if isinstance(input, bytes) and text:
            input = input.decode("utf-8", "surrogateescape")
        proc = subprocess.run(
            self._nsenter() + list(argv),
            env=full_env,
            input=input,
            capture_output=True,
            text=text,
            errors="surrogateescape" if text else None,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, list(argv), proc.stdout, proc.stderr)
        return proc

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def journal_cursor(self) -> str:
        """The cursor of the journal's last entry; pass it to journal(since_cursor=)."""
        out = self.run(
            ["journalctl", "--no-pager", "-n", "1", "--show-cursor", "-o", "cat"], check=False
        ).stdout
        for line in out.splitlines():
            if line.startswith("-- cursor: "):
                return line[len("-- cursor: ") :].strip()
        return ""

    def journal(
        self, unit: Optional[str] = None, since_cursor: Optional[str] = None, output: str = "cat"
    ) -> str:
        """Journal text (default: messages only), optionally of one unit / after a cursor."""
        cmd = ["journalctl", "--no-pager", "-q", "-o", output]
        if unit:
            cmd += ["-u", unit]
        if since_cursor:
            cmd += ["--after-cursor", since_cursor]
        return self.run(cmd, check=False).stdout

    def write_file(
        self, path: str, data: Union[str, bytes], mode: int = 0o644, owner: Optional[str] = None
    ) -> None:
        """Atomically write a file inside the host (parents created), via nsenter.

        Not through /proc/PID/root: absolute symlinks met on the way would resolve on the
        real machine.
        """
        if isinstance(data, str):
            data = data.encode()
        # Parents get 0755 (like install -d); the file itself is private until chmod.
        script = (
            'set -e; (umask 022; mkdir -p "$(dirname "$1")"); umask 077; t="$1.aea-tmp.$$"; '
            'cat >"$t"; chmod "$2" "$t"; if [ -n "$3" ]; then chown "$3" "$t"; fi; '
            'mv -f "$t" "$1"'
        )
        self.run(
            ["sh", "-c", script, "sh", path, format(mode, "o"), owner or ""], input=data, text=False
        )

    def read_file(self, path: str) -> bytes:
        return self.run(["cat", "--", path], text=False).stdout

    def main_pid(self, unit: str) -> int:
        """MainPID of a unit, in the host's pid namespace (0 when it has none)."""
        return int(self.systemctl("show", "-p", "MainPID", "--value", unit).stdout.strip() or 0)

    def unit_property(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 30,
        what: str = "condition",
        interval: float = 0.05,
    ) -> T:
        return wait_for(predicate, timeout, what, interval)

    def wait_active(self, unit: str, timeout: float = 30) -> None:
        """Wait until a unit is active; fail early, with its journal, if it failed."""

        def active() -> bool:
            state = self.unit_property(unit, "ActiveState")
            if state == "failed":
                raise SystemdHostError(f"{unit} failed:\n{self.journal(unit)}")
            return state == "active"

        try:
            wait_for(active, timeout, f"{unit} to be active")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.journal(unit)}") from exc

    # -- environment -----------------------------------------------------------------------------

    def set_default_environment(self, env: Mapping[str, str]) -> None:
        """Make every unit started from now on see `env` (system.conf DefaultEnvironment=).

        Test values only (endpoints, fake credentials): they are world-readable inside.
        """
        parts = []
        for k, v in sorted(env.items()):
            if (
                not k
                or not (k[0].isalpha() or k[0] == "_")
                or not all(c.isalnum() or c == "_" for c in k)
            ):
                raise ValueError(f"bad variable name {k!r}")
            if any(c in v for c in '"\\\n\r\0'):
                raise ValueError(f"value of {k} has a character DefaultEnvironment cannot quote")
            parts.append(f'"{k}={v}"')
        conf = "[Manager]\nDefaultEnvironment=" + " ".join(parts) + "\n"
        self.write_file("/etc/systemd/system.conf.d/50-aea-test-env.conf", conf)
        # daemon-reload re-reads system.conf in systemd 252; prove it took effect.
        self.systemctl("daemon-reload")
        seen = self.run(
            ["systemd-run", "--wait", "--pipe", "-q", "/usr/bin/env", "-0"], text=False
        ).stdout.split(b"\0")
        missing = [k for k, v in env.items() if f"{k}={v}".encode() not in seen]
        if missing:
            raise SystemdHostError(f"DefaultEnvironment not applied for {missing}")

    # -- the port bridge -------------------------------------------------------------------------

    def bridge_port(
        self,
        host_port: int,
        timeout: float = 10,
        addr: str = "127.0.0.1",
        listen_port: Optional[int] = None,
    ) -> None:
        """Make the host's 127.0.0.1:host_port reachable inside at addr:listen_port (default
        127.0.0.1:host_port). addr must exist inside; see serve_link_local for 169.254.x."""
        if self.pid is None or self._stopped:
            raise SystemdHostError("the test host is not running")
        lport = int(host_port if listen_port is None else listen_port)
        try:
            proc = start_forwarder(f"/proc/{self.pid}/ns/net", addr, lport, host_port, timeout)
        except ForwarderError as exc:
            raise SystemdHostError(f"port bridge: {exc}") from None
        self._bridges.append(proc)

    def serve_link_local(
        self, host_port: int, addr: str = "169.254.169.254", port: int = 80
    ) -> str:
        """Serve the host's 127.0.0.1:host_port at addr:port inside (an instance's IMDS at
        169.254.169.254:80). The address goes on the host's own lo, so only this host sees it;
        returns "http://addr:port"."""
        have = self.run(["ip", "-o", "addr", "show", "dev", "lo"]).stdout
        if f" {addr}/" not in have:
            self.run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
        self.bridge_port(host_port, addr=addr, listen_port=port)
        return f"http://{addr}:{port}"

    # -- installing the product ------------------------------------------------------------------

    def install_project(
        self, repo_dir: Union[str, Path], cache_dir: Optional[Path] = None
    ) -> Dict[str, float]:
        """Install the agent the way cfn-init does; returns timings of the steps in seconds.

        Wheelhouse built on the machine (cached), then inside: a venv at
        /opt/airflow-agent/venv, `pip install --no-index --find-links` (the host has no
        network), /usr/local/bin/airflow-agent, and systemd/install-units.sh (units, airflow
        user via systemd-sysusers, tmpfiles, daemon-reload).
        """
        repo = Path(repo_dir).resolve()
        timings: Dict[str, float] = {}
        t = time.monotonic()
        wheelhouse = build_wheelhouse(repo, cache_dir)
        timings["wheelhouse"] = time.monotonic() - t

        t = time.monotonic()
        stage = self.shared_dir / "aea-install"
        if stage.exists():
            shutil.rmtree(stage)
        shutil.copytree(wheelhouse, stage / "wheelhouse")
        if (repo / "systemd").is_dir():
            shutil.copytree(repo / "systemd", stage / "systemd")
        self.run(["python3", "-m", "venv", "/opt/airflow-agent/venv"])
        self.run(
            [
                "/opt/airflow-agent/venv/bin/pip",
                "install",
                "-q",
                "--no-index",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--find-links",
                str(stage / "wheelhouse"),
                "airflow-ec2-agent[worker]",
            ]
        )
        self.run(
            [
                "ln",
                "-sfn",
                "/opt/airflow-agent/venv/bin/airflow-agent",
                "/usr/local/bin/airflow-agent",
            ]
        )
        timings["venv"] = time.monotonic() - t

        t = time.monotonic()
        if (stage / "systemd" / "install-units.sh").exists():
            self.run(["sh", str(stage / "systemd" / "install-units.sh")])
        timings["units"] = time.monotonic() - t
        return timings
