"""A real race: another user swaps a directory for a symlink while root's AfterInstall chowns.

AIRFLOW_HOME belongs to the `airflow` user, so any task can rename a directory in it and put a
symlink to anywhere in its place, over and over. A process running as `nobody` (the tree's
owner here, as `airflow` is on an instance) does exactly that in a tight loop, while the real
`deploy-hook AfterInstall` (DeployHook, and the CLI) chowns the tree again and again. The
sentinel directory the symlink points to, and the file in it, must keep their owner.

The same rig against the walk the hook used before (os.walk by path names + lchown) chowns the
sentinel within seconds: that test shows the rig can catch the bug it guards against.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from agent.config import config_from_dict
from agent.jobs.deploy.hook import DeployHook

REPO = Path(__file__).resolve().parents[1]
MIN_SWAPS = 1000
# the swapper runs as `nobody`, who cannot reach the test venv's interpreter (under /root)
SWAPPER_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root and another user")

SWAPPER = r"""
import os, sys
target, hidden, sentinel, stop = sys.argv[1:5]
print(os.getuid(), flush=True)
swaps = 0
while True:
    if swaps % 64 == 0 and os.path.exists(stop):
        break
    os.rename(target, hidden)       # the directory the walk listed goes away ...
    os.symlink(sentinel, target)    # ... and a symlink to the sentinel takes its name
    swaps += 1
    os.unlink(target)
    os.rename(hidden, target)
print(swaps, flush=True)
"""


class Rig:
    def __init__(self):
        self.user = pwd.getpwnam("nobody")
        self.uid, self.gid = self.user.pw_uid, self.user.pw_gid
        # /tmp/pytest-of-root is 0700: nobody needs a path it can traverse
        self.base = Path(tempfile.mkdtemp(prefix="aea-race-", dir="/tmp"))
        self.base.chmod(0o755)
        self.sentinel = self.base / "sentinel"
        self.sentinel.mkdir(mode=0o755)
        (self.sentinel / "secret").write_text("root's\n")
        self.home = self.base / "airflow"
        a = self.home / "dags" / "a"
        (a / "b" / "c").mkdir(parents=True)
        for rel in ("dags/a/x.py", "dags/a/b/y.py", "dags/a/b/c/z.py", "dags/top.py"):
            (self.home / rel).write_text("x = 1\n")
        for dirpath, dirnames, filenames in os.walk(self.home):  # before anyone races
            for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                os.lchown(name, self.uid, self.gid)
        self.stop = self.base / "stop"
        self.cfg = config_from_dict(
            {
                "cluster": "test",
                "state_dir": str(self.base / "state"),
                "airflow_home": str(self.home),
                "role": {"override": "worker"},
                "deploy": {
                    "owner": self.user.pw_name,
                    "group": "nogroup",
                    "check_import_errors": False,
                },
            }
        )

    def owners(self):
        return [
            (os.lstat(p).st_uid, os.lstat(p).st_gid)
            for p in (self.sentinel, self.sentinel / "secret")
        ]

    def start_swapper(self) -> subprocess.Popen:
        target = self.home / "dags" / "a"
        return subprocess.Popen(
            [SWAPPER_PYTHON, "-I", "-c", SWAPPER, str(target), str(target) + ".real"]
            + [str(self.sentinel), str(self.stop)],
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )

    def race(self, chown_once, runs: int, deadline_s: float = 120.0):
        """Run chown_once while the swapper swaps, until `runs` runs and MIN_SWAPS swaps."""
        swapper = self.start_swapper()
        n = 0
        try:
            assert swapper.stdout.readline().strip() == str(self.uid)  # it is swapping now
            deadline = time.monotonic() + deadline_s
            while n < runs and time.monotonic() < deadline:
                os.lchown(self.home / "dags" / "top.py", 0, 0)  # work for this run: a real chown
                chown_once()
                n += 1
                assert os.lstat(self.home / "dags" / "top.py").st_uid == self.uid
                if self.owners() != [(0, 0), (0, 0)]:
                    break
        finally:
            self.stop.touch()
            out, err = swapper.communicate(timeout=30)
            self.stop.unlink()
        assert swapper.returncode == 0, err
        return n, int(out.split()[-1])


@pytest.fixture
def rig():
    r = Rig()
    yield r
    shutil.rmtree(r.base, ignore_errors=True)


def test_after_install_never_chowns_the_sentinel_while_a_user_swaps_dirs_for_symlinks(rig):
    hook = DeployHook(rig.cfg, "worker", "AfterInstall")
    runs, swaps = rig.race(hook.run, runs=2000)
    # swaps counted by the swapper itself; the hook ran throughout
    assert swaps >= MIN_SWAPS, f"only {swaps} swaps in {runs} runs"
    assert runs >= 2000
    assert rig.owners() == [(0, 0), (0, 0)]
    # after the race the tree is whole again and the hook gives all of it to the owner
    hook.run()
    for dirpath, dirnames, filenames in os.walk(rig.home):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            assert (os.lstat(name).st_uid, os.lstat(name).st_gid) == (rig.uid, rig.gid), name


def test_the_cli_after_install_never_chowns_the_sentinel_during_swaps(rig, tmp_path):
    import yaml

    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cluster": "test",
                "state_dir": str(rig.base / "state"),
                "airflow_home": str(rig.home),
                "role": {"override": "worker"},
                "deploy": {"owner": "nobody", "group": "nogroup", "check_import_errors": False},
            }
        )
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), LIFECYCLE_EVENT="AfterInstall")

    def cli_once():
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(config), "deploy-hook"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "deploy-hook AfterInstall: done" in proc.stderr

    runs, swaps = rig.race(cli_once, runs=5)
    assert runs == 5 and swaps >= MIN_SWAPS
    assert rig.owners() == [(0, 0), (0, 0)]


def naive_chown(home: Path, uid: int, gid: int) -> None:
    """The walk AfterInstall used before: names listed, then re-resolved for each lchown."""
    for dirpath, dirnames, filenames in os.walk(home):
        for name in [dirpath] + [os.path.join(dirpath, f) for f in dirnames + filenames]:
            try:
                if (os.lstat(name).st_uid, os.lstat(name).st_gid) != (uid, gid):
                    os.lchown(name, uid, gid)
            except FileNotFoundError:
                pass


def test_the_rig_catches_the_old_walk_by_names(rig):
    # each run puts one file back to root so the naive walk has work; it races the swapper
    # until the sentinel changes hands (it always has, within a second or two) or 60 s pass
    def naive_once():
        for p in (rig.home / "dags" / "a" / "x.py", rig.home / "dags" / "a" / "b" / "y.py"):
            # through `a` when it is the directory; the sentinel has no such names
            with contextlib.suppress(FileNotFoundError):
                os.lchown(p, 0, 0)
        naive_chown(rig.home, rig.uid, rig.gid)

    try:
        runs, swaps = rig.race(naive_once, runs=10**9, deadline_s=60)
        assert rig.owners() != [(0, 0), (0, 0)], f"{runs} runs, {swaps} swaps: never hit"
    finally:
        os.lchown(rig.sentinel, 0, 0)
        os.lchown(rig.sentinel / "secret", 0, 0)
