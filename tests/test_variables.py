"""`airflow-agent variables sync`, `variables.method: cli`, against the real Airflow 3 CLI
(SQLite) and moto over HTTP.

One `airflow db migrate` per module; each test copies the migrated AIRFLOW_HOME. The Airflow
command is a wrapper script that logs each call (argv words only, never a value), can drop one
key from the import file (a key that "fails to import" while the CLI exits 0) or block (to be
SIGKILLed mid-run), and then execs the real CLI. What landed is read straight from Airflow's
database (decrypting with the fernet key from the env file), so it costs no CLI call.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List

import boto3
import pytest
from cryptography.fernet import Fernet

from sandbox import variable_shapes
from sandbox.airflow_cluster import AIRFLOW
from sandbox.proc import wait_for
from tests.conftest import REPO_ROOT

SECRET_ID = "airflow/test/variables"
FERNET_KEY = Fernet.generate_key().decode()

WRAPPER = """#!{python}
import json, os, sys, time
here = {here!r}
with open(os.path.join(here, "calls.log"), "a") as f:
    f.write(" ".join(sys.argv[1:3]) + "\\n")
drop = os.path.join(here, "drop-key")
if sys.argv[1:3] == ["variables", "import"] and os.path.exists(drop):
    name = sys.argv[3]
    with open(name) as f:
        doc = json.load(f)
    doc.pop(open(drop).read().strip(), None)
    with open(name, "w") as f:
        json.dump(doc, f)
if sys.argv[1:3] == ["variables", "import"] and os.path.exists(os.path.join(here, "block")):
    with open(os.path.join(here, "blocked.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
os.execv({airflow!r}, [{airflow!r}] + sys.argv[1:])
"""


@pytest.fixture(scope="module")
def migrated_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow-template")
    env = _airflow_env(home)
    subprocess.run(
        [str(AIRFLOW), "db", "migrate"],
        env={"PATH": os.environ["PATH"], **env},
        check=True,
        capture_output=True,
        timeout=120,
    )
    return home


def _airflow_env(home: Path) -> Dict[str, str]:
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__FERNET_KEY": FERNET_KEY,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }


class Rig:
    """One test's Airflow home copy, env file, wrapper, config and secret."""

    def __init__(self, tmp_path: Path, migrated_home: Path, make_config, run_agent, **variables):
        self.tmp = tmp_path
        self.home = tmp_path / "airflow-home"
        shutil.copytree(migrated_home, self.home)
        self.env_file = tmp_path / "sysconfig" / "airflow.env"
        self.env_file.parent.mkdir()
        self.write_env({})
        self.wrap_dir = tmp_path / "wrap"
        self.wrap_dir.mkdir()
        wrapper = self.wrap_dir / "airflow"
        wrapper.write_text(
            WRAPPER.format(python=sys.executable, here=str(self.wrap_dir), airflow=str(AIRFLOW))
        )
        wrapper.chmod(0o755)
        self.state_dir = tmp_path / "state"
        self.config = make_config(
            {
                "variables": {
                    "secret_id": SECRET_ID,
                    "airflow_command": [str(wrapper)],
                    "env_file": str(self.env_file),
                    "user": None,
                    **variables,
                }
            }
        )
        self._run_agent = run_agent
        self.sm = boto3.client("secretsmanager", region_name="us-east-1")
        self.sm.create_secret(Name=SECRET_ID, SecretString="{}")

    def write_env(self, extra: Dict[str, str]) -> None:
        lines = [f'{k}="{v}"' for k, v in {**_airflow_env(self.home), **extra}.items()]
        self.env_file.write_text("\n".join(lines) + "\n")

    def put(self, secret) -> str:
        text = secret if isinstance(secret, str) else json.dumps(secret)
        return self.sm.put_secret_value(SecretId=SECRET_ID, SecretString=text)["VersionId"]

    def sync(self, *args: str) -> subprocess.CompletedProcess:
        return self._run_agent(self.config, "variables", "sync", *args)

    def calls(self) -> List[str]:
        log = self.wrap_dir / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def db(self) -> Dict[str, tuple]:
        """key -> (decrypted stored value, description), straight from Airflow's table."""
        fernet = Fernet(FERNET_KEY.encode())
        with sqlite3.connect(self.home / "airflow.db") as conn:
            rows = conn.execute("SELECT key, val, description, is_encrypted FROM variable")
            return {
                k: (fernet.decrypt(v.encode()).decode() if enc else v, d)
                for k, v, d, enc in rows.fetchall()
            }

    def tamper(self, key: str, stored: str) -> None:
        """Change a variable behind the agent's back, to see whether a sync rewrites it."""
        token = Fernet(FERNET_KEY.encode()).encrypt(stored.encode()).decode()
        with sqlite3.connect(self.home / "airflow.db") as conn:
            conn.execute("UPDATE variable SET val=?, is_encrypted=1 WHERE key=?", (token, key))

    def state(self) -> dict:
        path = self.state_dir / "variables.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def hashes(self) -> dict:
        path = self.state_dir / "variables-hashes.json"
        return json.loads(path.read_text())["hashes"] if path.exists() else {}

    def tmp_files(self) -> List[str]:
        d = self.state_dir / "variables-tmp"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def rig(tmp_path, migrated_home, make_config, run_agent, aws, imds) -> Rig:
    # these tests are about the CLI method (its wrapper, its temp files); the default method,
    # api, has tests/test_variables_api.py
    return Rig(tmp_path, migrated_home, make_config, run_agent, method="cli")


class CmdlineScanner:
    """Scans every /proc/*/cmdline while a run goes on, for the secret values."""

    def __init__(self, needles: List[str]):
        self.needles = [n.encode() for n in needles]
        self.found: List[str] = []
        self.saw_import = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"variables\0import" in cmd:
                    self.saw_import = True
                for n in self.needles:
                    if n in cmd:
                        self.found.append(cmd.decode(errors="replace"))

    def __enter__(self) -> CmdlineScanner:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _files_holding(root: Path, needles: List[str]) -> List[str]:
    hits = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


def _values(n: int, tag: str) -> Dict[str, str]:
    return {f"key_{i}": f"{tag}-value-{i}-{os.urandom(4).hex()}" for i in range(n)}


def test_sync_imports_only_changes_skips_unchanged_prunes_on_request(rig):
    secret: Dict = _values(4, "first")
    secret.update(variable_shapes.BASIC)
    secret["-dash"] = "dash-value-" + os.urandom(4).hex()
    assert len(secret) == 8
    # shapes whose export differs from the import (the verification must model Airflow's)
    secret.update(variable_shapes.EXPORT_DIFFERS)
    v1 = rig.put(secret)
    # the random values (short ones like "123" are everywhere in /proc)
    needles = [v for v in secret.values() if isinstance(v, str) and "-value-" in v]
    needles.append("with-desc-value")

    with CmdlineScanner(needles) as scan:
        first = rig.sync("--diff")
    assert first.returncode == 0, first.stderr
    assert scan.saw_import and scan.found == []
    assert sorted(first.stdout.split()) == sorted(["+"] * len(secret) + list(secret))
    db = rig.db()
    assert {k: db[k][0] for k in _values_keys(4)} == {k: secret[k] for k in _values_keys(4)}
    assert json.loads(db["json_value"][0]) == secret["json_value"]
    assert db["number"][0] == "42"
    assert db["described"] == ("with-desc-value", "a description")
    assert rig.calls() == ["variables import", "variables export"]
    st = rig.state()
    assert st["version_id"] == v1 and st["counts"]["imported"] == len(secret)
    assert set(rig.hashes()) == set(secret) and isinstance(st["synced_at"], float)
    assert all(len(h) == 64 for h in rig.hashes().values())

    # one of N changes: exactly that key is written (a tampered other key stays tampered)
    rig.tamper("key_1", "tampered")
    secret["key_0"] = "second-value-" + os.urandom(4).hex()
    needles.append(secret["key_0"])
    v2 = rig.put(secret)
    with CmdlineScanner(needles) as scan:
        second = rig.sync()
    assert second.returncode == 0, second.stderr
    assert scan.saw_import and scan.found == []
    db = rig.db()
    assert db["key_0"][0] == secret["key_0"]
    assert db["key_1"][0] == "tampered"
    assert "1 changed" in second.stderr and "1 imported" in second.stderr
    assert rig.state()["version_id"] == v2 and rig.state()["counts"]["imported"] == 1

    # unchanged secret: zero Airflow calls
    before = len(rig.calls())
    third = rig.sync()
    assert third.returncode == 0, third.stderr
    assert len(rig.calls()) == before
    assert "no Airflow call" in third.stderr

    # keys leave the secret: kept and reported without --prune (still no Airflow call)
    del secret["key_3"]
    del secret["-dash"]
    rig.put(secret)
    fourth = rig.sync("--diff")
    assert fourth.returncode == 0, fourth.stderr
    assert "- key_3" in fourth.stdout and "- -dash" in fourth.stdout
    assert "stay in Airflow (--prune deletes them): -dash, key_3" in fourth.stderr
    assert len(rig.calls()) == before
    assert "key_3" in rig.db() and "-dash" in rig.db()

    # --prune deletes it (same version: the pending prune is not skipped), verified by export
    fifth = rig.sync("--prune")
    assert fifth.returncode == 0, fifth.stderr
    assert "key_3" not in rig.db() and "-dash" not in rig.db()
    assert rig.calls()[before:] == ["variables delete"] * 2 + ["variables export"]
    assert "key_3" not in rig.hashes() and rig.state()["not_pruned"] == []
    assert rig.state()["counts"]["deleted"] == 2

    # --all repairs drift behind our back (key_1 was tampered with): every key again
    sixth = rig.sync("--all")
    assert sixth.returncode == 0, sixth.stderr
    assert rig.db()["key_1"][0] == secret["key_1"]
    assert rig.state()["counts"]["imported"] == len(secret)

    # nothing anywhere but Airflow's own database holds a value; temp files are gone
    runs = (first, second, third, fourth, fifth, sixth)
    outputs = "".join(p.stdout + p.stderr for p in runs)
    assert [n for n in needles if n in outputs] == []
    # (Airflow's database included: the fernet key from the env file encrypts what it stores)
    assert _files_holding(rig.tmp, needles) == []
    assert rig.tmp_files() == []
    assert stat.S_IMODE((rig.state_dir / "variables-tmp").stat().st_mode) == 0o700


def _values_keys(n: int) -> List[str]:
    return [f"key_{i}" for i in range(n)]


BAD_SECRETS = [
    ("not json", "not valid JSON"),
    ('["a", "b"]', "got an array"),
    ('{"key_0": "a", "key_0": "b"}', 'duplicate key "key_0"'),
    ('{"": "v"}', "empty key"),
    ('{"k": {"value": 1, "oops": 2}}', 'found "oops"'),
    ('{"k": NaN}', "NaN"),
]


def test_bad_secrets_are_refused_and_change_nothing(rig):
    good = _values(2, "good")
    rig.put(good)
    assert rig.sync().returncode == 0
    calls, db = rig.calls(), rig.db()
    kept = {k: rig.state()[k] for k in ("version_id", "synced_at", "counts")}
    hashes = rig.hashes()
    for text, problem in BAD_SECRETS:
        version = rig.put(text + " ")  # a new version every time
        proc = rig.sync()
        assert proc.returncode == 3, (text, proc.stderr)
        assert problem in proc.stderr and "nothing imported" in proc.stderr
        assert version in proc.stderr
        assert rig.calls() == calls and rig.db() == db
        st = rig.state()
        assert {k: st[k] for k in kept} == kept and rig.hashes() == hashes
        assert st["last_result"] == "refused" and problem in st["last_error"]
    # an empty object with --prune would delete every managed variable: refused
    rig.put("{}")
    proc = rig.sync("--prune")
    assert proc.returncode == 3 and "refusing to prune all 2 variables" in proc.stderr
    assert rig.calls() == calls and rig.db() == db
    # a binary secret has no SecretString
    rig.sm.put_secret_value(SecretId=SECRET_ID, SecretBinary=b"\x00\x01")
    proc = rig.sync()
    assert proc.returncode == 3 and "no SecretString" in proc.stderr


def test_a_key_that_does_not_land_fails_the_run_and_is_retried(rig):
    secret = _values(3, "land")
    version = rig.put(secret)
    (rig.wrap_dir / "drop-key").write_text("key_1")
    proc = rig.sync()
    assert proc.returncode == 1
    assert "did not land in Airflow: key_1" in proc.stderr
    assert "key_1" not in rig.db() and "key_0" in rig.db()
    st = rig.state()
    assert sorted(rig.hashes()) == ["key_0", "key_2"]
    assert st.get("version_id") != version and st["last_result"] == "failed"

    (rig.wrap_dir / "drop-key").unlink()
    n = len(rig.calls())
    again = rig.sync()
    assert again.returncode == 0, again.stderr
    assert "1 new, 0 changed, 2 unchanged" in again.stderr
    assert rig.db()["key_1"][0] == secret["key_1"]
    assert rig.state()["version_id"] == version
    assert rig.calls()[n:] == ["variables import", "variables export"]


def test_sigkill_mid_run_leaves_a_private_temp_file_the_next_run_removes(rig, agent_env):
    secret = _values(2, "killed")
    rig.put(secret)
    (rig.wrap_dir / "block").write_text("")
    argv = [sys.executable, "-m", "agent", "--config", str(rig.config), "variables", "sync"]
    agent = subprocess.Popen(
        argv,
        env=agent_env,
        cwd=str(REPO_ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pid_file = rig.wrap_dir / "blocked.pid"
        wait_for(pid_file.exists, 60, "the import to start")
        child = int(wait_for(lambda: pid_file.read_text().strip(), 10, "the child's pid"))
        left = rig.tmp_files()
        assert len(left) == 1 and left[0].startswith("import-")
        mode = (rig.state_dir / "variables-tmp" / left[0]).stat().st_mode
        assert stat.S_IMODE(mode) == 0o600
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    # the CLI child dies with the agent (parent-death signal), nothing keeps importing
    wait_for(
        lambda: (
            not Path(f"/proc/{child}").exists()
            or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
        ),
        10,
        "child to die",
    )
    assert rig.tmp_files() != []
    (rig.wrap_dir / "block").unlink()
    proc = rig.sync()
    assert proc.returncode == 0, proc.stderr
    assert "removed 1 temp file(s) a killed variables sync left" in proc.stderr
    assert rig.tmp_files() == []
    assert {k: rig.db()[k][0] for k in secret} == secret


def test_shadowed_variables_are_reported_and_dry_run_calls_nothing(rig):
    secret = _values(3, "shadow")
    rig.put(secret)
    rig.write_env(
        {
            "AIRFLOW_VAR_KEY_2": "from-env",
            "AIRFLOW__SECRETS__BACKEND": "airflow.secrets.local_filesystem.LocalFilesystemBackend",
        }
    )
    proc = rig.sync("--dry-run", "--diff")
    assert proc.returncode == 0, proc.stderr
    assert "shadowed by AIRFLOW_VAR_* in" in proc.stderr and ": key_2" in proc.stderr
    assert "AIRFLOW__SECRETS__BACKEND is set" in proc.stderr
    assert sorted(proc.stdout.split()) == sorted(["+"] * 3 + list(secret))
    assert rig.calls() == [] and rig.state() == {} and rig.db() == {}


STAND_IN = """#!/usr/bin/python3
# Stands in for the Airflow CLI as user nobody: this machine's Airflow venv runs on an
# interpreter under /root, which nobody cannot execute. It does what the real CLI does with the
# two files (read the import file, write the export file, both by the name it was given) and
# records who it ran as.
import json, os, sys
db = {db!r}
with open({log!r}, "a") as f:
    who = [os.getuid(), os.getgid(), os.getcwd(), os.umask(0o077)]
    f.write(json.dumps(who + sys.argv[1:3]) + "\\n")
data = json.load(open(db)) if os.path.exists(db) else {{}}
if sys.argv[1:3] == ["variables", "import"]:
    data.update(json.load(open(sys.argv[3])))
    json.dump(data, open(db, "w"))
elif sys.argv[1:3] == ["variables", "export"]:
    json.dump(data, open(sys.argv[3], "w"))
"""


@pytest.fixture
def world_tmp():
    """A directory user nobody can reach (pytest's tmp_path sits under a root 0700 dir)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="aea-variables-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_cli_runs_as_the_configured_user_across_a_root_only_state_dir(rig, world_tmp, make_config):
    import pwd

    nobody = pwd.getpwnam("nobody")
    os.chown(world_tmp, nobody.pw_uid, nobody.pw_gid)
    stand_in = world_tmp / "airflow"
    log = world_tmp / "calls.jsonl"
    stand_in.write_text(STAND_IN.format(db=str(world_tmp / "db.json"), log=str(log)))
    stand_in.chmod(0o755)
    config = make_config(
        {
            "variables": {
                "secret_id": SECRET_ID,
                "airflow_command": [str(stand_in)],
                "env_file": str(rig.env_file),
                "user": "nobody",
                "method": "cli",
            }
        },
        name="agent-nobody.yaml",
    )
    secret = _values(2, "as-nobody")
    rig.put(secret)
    proc = rig._run_agent(config, "variables", "sync")
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    tmp_dir = rig.state_dir / "variables-tmp"
    assert [c[4:] for c in calls] == [["variables", "import"], ["variables", "export"]]
    # as nobody, in the private temp dir, with a umask that keeps new files private
    assert {tuple(c[:4]) for c in calls} == {(nobody.pw_uid, nobody.pw_gid, str(tmp_dir), 0o077)}
    assert json.loads((world_tmp / "db.json").read_text()) == secret
    # the state dir stays root 0700; the CLI reached its files through its working directory
    assert stat.S_IMODE(rig.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(tmp_dir.stat().st_mode) == 0o711 and rig.tmp_files() == []
    assert rig.state()["counts"]["imported"] == 2


def test_sigterm_mid_run_removes_the_temp_file_and_the_cli(rig, agent_env):
    rig.put(_values(2, "term"))
    (rig.wrap_dir / "block").write_text("")
    argv = [sys.executable, "-m", "agent", "--config", str(rig.config), "variables", "sync"]
    agent = subprocess.Popen(
        argv, env=agent_env, cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        pid_file = rig.wrap_dir / "blocked.pid"
        wait_for(pid_file.exists, 60, "the import to start")
        child = int(wait_for(lambda: pid_file.read_text().strip(), 10, "the child's pid"))
        assert len(rig.tmp_files()) == 1
        agent.send_signal(signal.SIGTERM)
        _out, err = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 1
    assert "terminated by signal 15" in err.decode()
    assert rig.tmp_files() == []
    assert not Path(f"/proc/{child}").exists()
    assert rig.state()["last_result"] == "failed" and rig.hashes() == {}
