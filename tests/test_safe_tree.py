"""agent.platform.safe_tree and agent.jobs.deploy.bundle: the tree never leads root outside it.

Unit tests on real files (we run as root, so chown and other users are real); the race with a
second user swapping directories mid-walk is tests/test_deploy_race.py. A device crossing needs
a mount point inside a tree: a real one (/dev/shm under /dev, read-only walk) where the machine
has it, and an injected stat otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.jobs.deploy import bundle as deploy_bundle
from agent.platform import safe_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to other users needs root")

UID, GID = 65534, 65534  # nobody:nogroup, only numbers matter here


def owner(path: Path) -> tuple:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@pytest.fixture
def outside(tmp_path):
    """A root-owned directory with a file, outside every tree the tests walk."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_text("s")
    return d


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    (h / "dags" / "a" / "b").mkdir(parents=True)
    (h / "dags" / "a" / "b" / "deep.py").write_text("x")
    (h / "dags" / "top.py").write_text("x")
    (h / "plugins").mkdir()
    (h / "plugins" / "p.py").write_text("x")
    return h


def test_chown_gives_nested_dirs_and_files_but_follows_no_symlink(home, outside):
    (home / "dags" / "link").symlink_to(outside)
    (home / "dags" / "a" / "file-link").symlink_to(outside / "secret")
    tree = safe_tree.Tree(str(home))
    changed = tree.chown(UID, GID)
    for p in (home, home / "dags", home / "dags/a/b", home / "dags/a/b/deep.py", home / "plugins"):
        assert owner(p) == (UID, GID), p
    assert changed == 8  # 5 directories (home, dags, a, b, plugins) and 3 files
    assert owner(outside) == (0, 0) and owner(outside / "secret") == (0, 0)
    # the symlinks themselves are left as they are (documented: never chowned)
    assert owner(home / "dags" / "link") == (0, 0)
    assert sorted(tree.skipped) == [
        ("dags/a/file-link", safe_tree.SKIP_SYMLINK),
        ("dags/link", safe_tree.SKIP_SYMLINK),
    ]
    # a second pass changes nothing
    assert safe_tree.Tree(str(home)).chown(UID, GID) == 0


def test_a_root_that_is_a_symlink_is_refused(tmp_path, outside):
    (tmp_path / "h").symlink_to(outside)
    with pytest.raises(AgentError, match="is not a directory \\(or is a symlink\\)"):
        deploy_bundle.chown_tree(tmp_path / "h", UID, GID)
    with pytest.raises(AgentError, match="does not exist"):
        deploy_bundle.chown_tree(tmp_path / "missing", UID, GID)
    assert owner(outside) == (0, 0)


def test_a_directory_swapped_for_a_symlink_after_listing_is_not_entered(home, outside):
    # swap dags/a for a symlink to `outside` between the listing of dags and the open of a
    real_lstat = safe_tree.lstat_at
    swapped = []

    def lstat_then_swap(name, dir_fd):
        st = real_lstat(name, dir_fd)
        if name == "a" and not swapped:
            os.rename(home / "dags" / "a", home / "dags" / "a.moved")
            os.symlink(outside, home / "dags" / "a")
            swapped.append(name)
        return st

    tree = safe_tree.Tree(str(home), lstat=lstat_then_swap)
    tree.chown(UID, GID)
    assert swapped
    assert ("dags/a", safe_tree.SKIP_CHANGED) in tree.skipped
    assert owner(outside) == (0, 0) and owner(outside / "secret") == (0, 0)


def test_a_directory_swapped_for_another_directory_is_not_entered(home, tmp_path):
    # same name, another inode (a directory moved in from elsewhere): not the one listed
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("x")
    real_lstat = safe_tree.lstat_at

    def lstat_then_swap(name, dir_fd):
        st = real_lstat(name, dir_fd)
        if name == "a" and not (home / "a.moved").exists():
            os.rename(home / "dags" / "a", home / "a.moved")
            os.rename(other, home / "dags" / "a")
        return st

    tree = safe_tree.Tree(str(home), lstat=lstat_then_swap)
    tree.chown(UID, GID)
    assert ("dags/a", safe_tree.SKIP_CHANGED) in tree.skipped
    assert owner(home / "dags" / "a" / "f") == (0, 0)


def test_a_file_replaced_by_a_symlink_mid_walk_is_not_followed(home, outside):
    real_lstat = safe_tree.lstat_at

    def lstat_then_swap(name, dir_fd):
        st = real_lstat(name, dir_fd)
        if name == "top.py" and not os.path.islink(home / "dags" / "top.py"):
            os.unlink(home / "dags" / "top.py")
            os.symlink(outside / "secret", home / "dags" / "top.py")
        return st

    tree = safe_tree.Tree(str(home), lstat=lstat_then_swap)
    tree.chown(UID, GID)
    assert ("dags/top.py", safe_tree.SKIP_CHANGED) in tree.skipped
    assert owner(outside / "secret") == (0, 0)
    assert owner(home / "dags" / "a" / "b" / "deep.py") == (UID, GID)  # the rest went on


def test_a_file_replaced_by_another_file_mid_walk_is_left_alone(home, outside):
    # a hard link to a file outside the tree (possible where fs.protected_hardlinks is 0)
    real_lstat = safe_tree.lstat_at

    def lstat_then_swap(name, dir_fd):
        st = real_lstat(name, dir_fd)
        if name == "top.py" and os.lstat(home / "dags" / "top.py").st_nlink == 1:
            os.unlink(home / "dags" / "top.py")
            os.link(outside / "secret", home / "dags" / "top.py")
        return st

    tree = safe_tree.Tree(str(home), lstat=lstat_then_swap)
    tree.chown(UID, GID)
    assert ("dags/top.py", safe_tree.SKIP_CHANGED) in tree.skipped
    assert owner(outside / "secret") == (0, 0)


def test_hard_linked_files_are_not_chowned(home, outside):
    os.link(outside / "secret", home / "dags" / "hard")
    tree = safe_tree.Tree(str(home))
    tree.chown(UID, GID)
    assert ("dags/hard", safe_tree.SKIP_LINKS) in tree.skipped
    assert owner(outside / "secret") == (0, 0)


def test_a_directory_on_another_device_is_not_entered_injected_stat(home):
    real_lstat = safe_tree.lstat_at

    def lstat(name, dir_fd):
        st = real_lstat(name, dir_fd)
        if name == "plugins":  # as a mount point's lstat shows: the mounted root's device
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1) + tuple(st)[3:])
        return st

    tree = safe_tree.Tree(str(home), lstat=lstat)
    tree.chown(UID, GID)
    assert ("plugins", safe_tree.SKIP_DEVICE) in tree.skipped
    assert owner(home / "plugins") == (0, 0) and owner(home / "plugins" / "p.py") == (0, 0)
    assert owner(home / "dags" / "top.py") == (UID, GID)


def test_an_opened_directory_on_another_device_is_refused_injected_fstat(home):
    # the listing agreed but the descriptor shows another device (mounted in between)
    real_fstat = os.fstat
    plugins_ino = os.lstat(home / "plugins").st_ino

    def fstat(fd):
        st = real_fstat(fd)
        if st.st_ino == plugins_ino:
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1) + tuple(st)[3:])
        return st

    tree = safe_tree.Tree(str(home), fstat=fstat)
    tree.chown(UID, GID)
    assert ("plugins", safe_tree.SKIP_DEVICE) in tree.skipped
    assert owner(home / "plugins") == (0, 0)


def test_a_real_mount_point_is_not_crossed():
    # /dev/shm is its own filesystem under /dev on most machines; the walk only reads
    try:
        crosses = os.stat("/dev").st_dev != os.lstat("/dev/shm").st_dev
    except OSError:
        crosses = False
    if not crosses:
        pytest.skip("no mount point under /dev here (covered by the injected-stat tests)")
    tree = safe_tree.Tree("/dev")
    seen = [rel for rel, _, _, _ in tree.walk()]
    assert "shm" not in seen
    assert ("shm", safe_tree.SKIP_DEVICE) in tree.skipped


def test_walk_prunes_like_os_walk_and_closes_every_descriptor(home):
    before = len(os.listdir("/proc/self/fd"))
    seen = []
    for rel, _, _, entries in safe_tree.Tree(str(home)).walk():
        seen.append(rel)
        entries[:] = [e for e in entries if e.name != "a"]
    assert seen == ["", "dags", "plugins"] or seen == ["", "plugins", "dags"]
    # a walk abandoned half-way closes what it opened
    walk = safe_tree.Tree(str(home)).walk()
    next(walk)
    next(walk)
    walk.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_remove_at_unlinks_symlinks_without_following_them(home, outside):
    cache = home / "dags" / "__pycache__"
    (cache / "sub").mkdir(parents=True)
    (cache / "x.pyc").write_text("c")
    (cache / "sub" / "link").symlink_to(outside)
    (cache / "file-link").symlink_to(outside / "secret")
    assert deploy_bundle.clear_pycache(home, ["dags", "plugins"]) == 1
    assert not cache.exists()
    assert (outside / "secret").read_text() == "s"


def test_clear_pycache_removes_nested_caches(home):
    for d in ("dags/__pycache__", "dags/a/b/__pycache__", "plugins/__pycache__"):
        (home / d).mkdir()
        (home / d / "m.cpython-311.pyc").write_bytes(b"x")
    assert deploy_bundle.clear_pycache(home, ["dags", "plugins"]) == 3
    assert not list(home.rglob("__pycache__"))
    assert (home / "dags" / "a" / "b" / "deep.py").exists()


def test_a_symlinked_dags_pointing_outside_is_not_touched(home, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "__pycache__").mkdir(parents=True)
    (elsewhere / "__pycache__" / "keep.pyc").write_bytes(b"x")
    (elsewhere / "sub" / "__pycache__").mkdir(parents=True)
    os.rename(home / "dags", tmp_path / "old-dags")
    (home / "dags").symlink_to(elsewhere)
    (home / "plugins" / "__pycache__").mkdir()
    with caplog.at_level(logging.INFO, logger="agent.jobs.deploy.bundle"):
        assert deploy_bundle.clear_pycache(home, ["dags", "plugins"]) == 1
    assert (elsewhere / "__pycache__" / "keep.pyc").exists()
    assert (elsewhere / "sub" / "__pycache__").exists()
    assert not (home / "plugins" / "__pycache__").exists()
    assert f"{home}/dags is a symlink (to {elsewhere}): not entered" in caplog.text


def test_describe_skips_is_one_bounded_line():
    skips = [(f"d/{i}", safe_tree.SKIP_CHANGED) for i in range(8)]
    line = safe_tree.describe_skips(skips, limit=3)
    assert line == (
        "d/0 (changed during the walk), d/1 (changed during the walk), "
        "d/2 (changed during the walk) and 5 more"
    )


def test_the_marker_is_written_below_home_without_following_symlinks(home, outside, tmp_path):
    deploy_bundle.write_marker(home, home / ".deployed-revision", b"d-1\n")
    assert (home / ".deployed-revision").read_bytes() == b"d-1\n"
    assert os.stat(home / ".deployed-revision").st_mode & 0o777 == 0o644
    # a symlink planted at the name is replaced, its target untouched
    (home / ".deployed-revision").unlink()
    (home / ".deployed-revision").symlink_to(outside / "secret")
    deploy_bundle.write_marker(home, home / ".deployed-revision", b"d-2\n")
    assert not (home / ".deployed-revision").is_symlink()
    assert (outside / "secret").read_text() == "s"
    # a directory on the way that is a symlink out of home: refused, nothing written there
    (home / "state").symlink_to(outside)
    with pytest.raises(AgentError, match="a directory on the way is a symlink"):
        deploy_bundle.write_marker(home, home / "state" / "marker", b"d-3\n")
    assert sorted(os.listdir(outside)) == ["secret"]
    # missing directories below home are made; a marker outside home is a plain write
    deploy_bundle.write_marker(home, home / "new" / "dir" / "m", b"d-4\n")
    assert (home / "new" / "dir" / "m").read_bytes() == b"d-4\n"
    deploy_bundle.write_marker(home, tmp_path / "etc" / "m", b"d-5\n")
    assert (tmp_path / "etc" / "m").read_bytes() == b"d-5\n"
    assert not [n for n in os.listdir(home) if n.endswith(".tmp-agent")]


def test_before_install_on_a_fresh_instance_has_nothing_to_clear(tmp_path, outside):
    assert deploy_bundle.clear_pycache(tmp_path / "not-yet", ["dags", "plugins"]) == 0
    (tmp_path / "home-link").symlink_to(outside)  # but a symlinked home is refused
    with pytest.raises(AgentError, match="is a symlink"):
        deploy_bundle.clear_pycache(tmp_path / "home-link", ["dags"])


def test_before_install_leaves_a_dags_symlink_out_of_home_alone(home, tmp_path, caplog):
    # the real hook event (DeployHook), as `airflow-agent deploy-hook BeforeInstall` runs it
    from agent.config import config_from_dict
    from agent.jobs.deploy.hook import DeployHook

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "pkg" / "__pycache__").mkdir(parents=True)
    (elsewhere / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"x")
    os.rename(home / "dags", tmp_path / "old-dags")
    (home / "dags").symlink_to(elsewhere)
    (home / "plugins" / "__pycache__").mkdir()
    cfg = config_from_dict(
        {"state_dir": str(tmp_path / "state"), "airflow_home": str(home)}, "test"
    )
    with caplog.at_level(logging.INFO):
        DeployHook(cfg, "worker", "BeforeInstall").run()
    assert (elsewhere / "pkg" / "__pycache__" / "m.pyc").exists()
    assert not (home / "plugins" / "__pycache__").exists()
    assert "dags is a symlink" in caplog.text and "not entered" in caplog.text
    assert f"removed 1 __pycache__ directory under {home}" in caplog.text
