"""The systemd test host itself: it works, and it leaves the machine exactly as it found it.

These are the guard rails of every other systemd test (TESTING.md, "A real systemd as a test
host"): the machine's /tmp survives, the root mount is untouched, and after teardown no process,
mount, cgroup directory or /dev entry of the test host remains.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from sandbox.systemd_host import SystemdHost, sweep_stale, wait_for

pytestmark = pytest.mark.systemd


def _mounts() -> List[Tuple[str, str, str, str]]:
    """(mount point, fs type, source, options) of every mount in *our* mount namespace."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        f = left.split()
        fstype, source, super_opts = right.split()[:3]
        out.append((f[4], fstype, source, f[5] + "|" + super_opts))
    return out


def _root_mount() -> Tuple[str, str, str, str]:
    return [m for m in _mounts() if m[0] == "/"][-1]


def _supervisor_churn() -> Set[str]:
    """Cgroup dirs whose children come and go with whatever runs this test process: when it
    sits in a cgroup of its own below a hierarchy's root (one per command, say), that cgroup's
    parent. Its other children belong to other commands of the machine, not to the host."""
    parents = set()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if path.count("/") < 2:  # at the root or one level below it: nothing to skip
            continue
        hier = "unified" if not controllers else controllers.replace("name=", "")
        parents.add(str(Path("/sys/fs/cgroup", hier, path.lstrip("/")).parent))
    return parents


def _cgroup_dirs() -> Set[str]:
    churn = _supervisor_churn()
    dirs = set()
    for hier in Path("/sys/fs/cgroup").iterdir():
        for dp, dns, _ in os.walk(hier):
            dirs.add(dp)
            if dp in churn:
                dns[:] = []
    return dirs


def _dev_entries() -> Set[str]:
    return set(os.listdir("/dev"))


def _procs_in_pidns(ns: str) -> Dict[int, str]:
    """Host PID -> /proc/PID/stat start time, for every process in pid namespace `ns`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                found[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1]
        except OSError:
            continue
    return found


def _still_alive(procs: Dict[int, str]) -> List[int]:
    alive = []
    for pid, stat in procs.items():
        try:
            now = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
        except OSError:
            continue
        # Same PID and same start time (field 22) = the same process, not a reused PID.
        if now.split()[19] == stat.split()[19]:
            alive.append(pid)
    return alive


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = b"hello from the machine's loopback"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with SystemdHost(tmp_path_factory.mktemp("shared"), name="aea-hosttest") as h:
        yield h


def test_boots_to_running(host: SystemdHost) -> None:
    assert host.boot_state in ("running", "degraded")
    assert host.systemctl("is-system-running", check=False).stdout.strip() == "running", (
        host.systemctl("list-units", "--failed", check=False).stdout
    )
    # It knows it is a container, so it skips hardware and clock set-up.
    assert (
        host.run(["systemd-detect-virt", "--container"], check=False).stdout.strip()
        == "container-other"
    )
    # PID 1 inside is systemd, seen from outside as host.pid.
    assert host.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"


def test_unit_runs_and_journal_is_readable(host: SystemdHost) -> None:
    token = uuid.uuid4().hex
    host.write_file(
        "/etc/systemd/system/aea-hello.service",
        "[Service]\nType=oneshot\nExecStart=/bin/echo hello-" + token + "\n",
    )
    host.systemctl("daemon-reload")
    host.systemctl("start", "aea-hello.service")
    assert host.unit_property("aea-hello.service", "Result") == "success"
    wait_for(
        lambda: f"hello-{token}" in host.journal("aea-hello.service"),
        10,
        "the unit's output in the journal",
    )


def test_files_written_inside_stay_inside(host: SystemdHost) -> None:
    probe = f"/etc/aea-probe-{uuid.uuid4().hex}"
    host.write_file(probe, b"x\0y\n", mode=0o600)
    assert host.read_file(probe) == b"x\0y\n"
    assert host.run(["stat", "-c", "%a", probe]).stdout.strip() == "600"
    assert not Path(probe).exists(), "a write inside the test host reached the real /etc"


def test_shared_dir_is_shared(host: SystemdHost) -> None:
    (host.shared_dir / "from-outside").write_text("out")
    assert host.read_file(str(host.shared_dir / "from-outside")) == b"out"
    host.write_file(str(host.shared_dir / "from-inside"), "in")
    assert (host.shared_dir / "from-inside").read_text() == "in"


def test_a_repo_under_tmp_is_seen_inside_copy_on_write(tmp_path: Path) -> None:
    """A CI clone may live under /tmp, which is a private tmpfs inside: it is overlaid at its
    own path, so its venvs are usable in there while writes stay in the throwaway host."""
    repo = tmp_path / "clone"
    repo.mkdir()
    (repo / "marker").write_text("from the real tree\n")
    (tmp_path / "shared-cow").mkdir()
    with SystemdHost(tmp_path / "shared-cow", name="aea-repotest", repo_dir=repo) as h:
        assert h.read_file(str(repo / "marker")) == b"from the real tree\n"
        h.run(["sh", "-c", f"echo inside > {repo}/written-inside; rm {repo}/marker"])
        assert h.read_file(str(repo / "written-inside")) == b"inside\n"
    assert sorted(p.name for p in repo.iterdir()) == ["marker"]
    assert (repo / "marker").read_text() == "from the real tree\n"


def test_default_environment_reaches_units(host: SystemdHost) -> None:
    host.set_default_environment({"AEA_PROBE": "value with spaces", "AEA_OTHER": "2"})
    out = host.run(
        [
            "systemd-run",
            "--wait",
            "--pipe",
            "-q",
            "/bin/sh",
            "-c",
            'printf "%s|%s" "$AEA_PROBE" "$AEA_OTHER"',
        ]
    ).stdout
    assert out == "value with spaces|2"


def test_port_bridge_reaches_machine_loopback(host: SystemdHost, http_server: int) -> None:
    host.bridge_port(http_server)
    code = (
        "import urllib.request,sys;"
        f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{http_server}/',"
        "timeout=5).read().decode())"
    )
    assert host.run(["python3", "-c", code]).stdout == "hello from the machine's loopback"
    # Also from a unit, the way the agent will reach moto and IMDS.
    out = host.run(["systemd-run", "--wait", "--pipe", "-q", "python3", "-c", code]).stdout
    assert out == "hello from the machine's loopback"


def test_link_local_address_serves_a_machine_port(host: SystemdHost, http_server: int) -> None:
    """An instance's IMDS at 169.254.169.254:80: the address exists only on this host's lo,
    and the machine's namespace gains no address."""
    machine_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert host.serve_link_local(http_server) == "http://169.254.169.254:80"
    code = (
        "import urllib.request,sys;"
        "sys.stdout.write(urllib.request.urlopen('http://169.254.169.254/latest',"
        "timeout=5).read().decode())"
    )
    out = host.run(["systemd-run", "--wait", "--pipe", "-q", "python3", "-c", code]).stdout
    assert out == "hello from the machine's loopback"
    after = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert "169.254.169.254" not in after and after == machine_addrs


def test_unbridged_ports_are_unreachable(host: SystemdHost, http_server: int) -> None:
    # A fresh server on another port that was never bridged: the host's own netns has no route
    # to the machine's loopback.
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    try:
        port = srv.server_address[1]
        code = (
            "import socket,sys\ntry:\n socket.create_connection(('127.0.0.1',"
            f"{port}),timeout=3)\nexcept OSError:\n sys.exit(7)\n"
        )
        assert host.run(["python3", "-c", code], check=False).returncode == 7
    finally:
        srv.server_close()


def test_teardown_leaves_the_machine_as_it_was(tmp_path: Path, http_server: int) -> None:
    sentinels = [
        Path("/tmp") / f"aea-sentinel-{uuid.uuid4().hex}",
        Path("/var/tmp") / f"aea-sentinel-{uuid.uuid4().hex}",
    ]
    for s in sentinels:
        s.write_text("must survive")
    try:
        root_before = _root_mount()
        mounts_before = sorted(_mounts())
        cgroups_before = _cgroup_dirs()
        dev_before = _dev_entries()

        h = SystemdHost(tmp_path, name="aea-teardown")
        h.start()
        try:
            assert all(s.exists() for s in sentinels), "boot touched the machine's /tmp"
            # Some use: a long-running unit, a process started by nsenter, a bridge.
            h.run(["systemd-run", "--unit=aea-sleeper", "sleep", "1000"])
            h.run(["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"])
            h.bridge_port(http_server)
            pidns = os.readlink(f"/proc/{h.pid}/ns/pid")
            procs = wait_for(
                lambda: (lambda p: p if len(p) >= 4 else None)(_procs_in_pidns(pidns)),
                10,
                "systemd, journald and both sleeps",
            )
            cg_dirs = h.cgroup_dirs
            assert cg_dirs and all(d.is_dir() for d in cg_dirs)
            assert _root_mount() == root_before
        finally:
            h.stop()
        h.stop()  # idempotent

        assert all(s.read_text() == "must survive" for s in sentinels)
        assert not _still_alive(procs), "a process of the test host survived teardown"
        assert not _procs_in_pidns(pidns)
        assert not any(d.exists() for d in cg_dirs)
        assert _cgroup_dirs() == cgroups_before, "cgroup directories changed"
        assert _root_mount() == root_before, "the root mount changed"
        assert sorted(_mounts()) == mounts_before, "the mount table changed"
        assert _dev_entries() == dev_before, "/dev changed"
        assert not h.cgroup_dirs
        assert not list(Path(tempfile.gettempdir()).glob("aea-sdhost-aea-teardown-*"))
    finally:
        for s in sentinels:
            s.unlink()


CRASHER = """
import sys, time
sys.path.insert(0, {repo!r})
from sandbox.systemd_host import SystemdHost
h = SystemdHost({shared!r}, name="aea-crash").start()
print(h.pid, *h.cgroup_dirs, flush=True)
time.sleep(600)
"""


def test_a_killed_test_process_takes_its_host_along(tmp_path: Path) -> None:
    # The test process itself dies by SIGKILL (no stop(), no atexit): the kernel must still
    # kill systemd, and the next SystemdHost start must remove the cgroup dirs left behind.
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER.format(repo=repo, shared=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().split()
        assert line, "the crasher did not boot a host"
        pid, cgroups = int(line[0]), [Path(p) for p in line[1:]]
        pidns = os.readlink(f"/proc/{pid}/ns/pid")
        assert _procs_in_pidns(pidns)
    finally:
        proc.kill()  # by PID: the process this test started
        proc.wait(timeout=10)
    wait_for(lambda: not _procs_in_pidns(pidns), 10, "the orphaned host's processes to die")
    assert all(c.exists() for c in cgroups)  # nobody ran stop()
    removed = sweep_stale()
    assert all(str(c) in removed for c in cgroups), removed
    assert not any(c.exists() for c in cgroups)
    assert not list(Path(tempfile.gettempdir()).glob(f"aea-sdhost-aea-crash-{proc.pid}-*"))


def _stamps(*dirs: Path) -> Dict[str, Tuple[int, int]]:
    """path -> (inode, mtime in ns) of every entry of `dirs`: a rebuild changes both."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for d in dirs for p in d.iterdir()}


def test_install_project_installs_the_agent_like_cfn_init(
    host: SystemdHost, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    repo = Path(__file__).resolve().parents[1]
    timings = host.install_project(repo)
    assert set(timings) == {"wheelhouse", "venv", "units"}
    assert "usage: airflow-agent" in host.run(["airflow-agent", "--help"]).stdout
    assert host.run(["readlink", "/usr/local/bin/airflow-agent"]).stdout.strip() == (
        "/opt/airflow-agent/venv/bin/airflow-agent"
    )
    # Installed from the wheelhouse, not from the work tree: the package lives in the venv.
    where = host.run(
        ["/opt/airflow-agent/venv/bin/python", "-c", "import agent; print(agent.__file__)"]
    ).stdout
    assert where.startswith("/opt/airflow-agent/venv/lib/")
    assert host.run(["id", "-un", "airflow"]).stdout.strip() == "airflow"
    assert host.unit_property("airflow-agent-env.service", "LoadState") == "loaded"
    # The wheelhouse is cached: building an unchanged tree again builds nothing. pip is
    # replaced by a tripwire, and every cache entry keeps its inode and mtime.
    from sandbox import systemd_host

    wheelhouse = systemd_host.build_wheelhouse(repo)
    before = _stamps(wheelhouse.parent, wheelhouse)

    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the wheelhouse was rebuilt: pip wheel {args}")

    monkeypatch.setattr(systemd_host, "pip_wheel", tripwire)
    assert systemd_host.build_wheelhouse(repo) == wheelhouse
    assert _stamps(wheelhouse.parent, wheelhouse) == before
    # ...and the tripwire is live: a tree whose agent/ differs by one line must build its wheel
    # (it fails before anything reaches the cache, so the real tree's entries stay)
    changed = tmp_path / "changed"
    shutil.copytree(repo / "agent", changed / "agent", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        if (repo / name).is_file():
            shutil.copy2(repo / name, changed / name)
    with open(changed / "agent" / "__init__.py", "a") as f:
        f.write("# changed\n")
    with pytest.raises(AssertionError, match="rebuilt"):
        systemd_host.build_wheelhouse(changed)
    assert _stamps(wheelhouse.parent, wheelhouse) == before
