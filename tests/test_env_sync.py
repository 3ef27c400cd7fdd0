"""`airflow-agent env sync` end to end: the real CLI against moto over HTTP and strict IMDSv2."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import psutil
import pytest

from agent.platform.envfile import parse_env

SECRET = 'pg-pass-Zq8!v$`"x\\y'


def ssm():
    return boto3.client("ssm", region_name="us-east-1")


def put(name, value, type_="String"):
    ssm().put_parameter(Name=name, Value=value, Type=type_, Overwrite=True)


def seed_basic():
    put("/airflow/test/core/parallelism", "32")
    put("/airflow/test/core/load-examples", "False")
    put(
        "/airflow/test/database/sql_alchemy_conn",
        f"postgresql://airflow:{SECRET}@db/airflow",
        "SecureString",
    )
    put("/airflow/test/env/TZ", "UTC")


@pytest.fixture
def cfg_path(make_config):
    return make_config()


def env_file(cfg_path):
    return cfg_path.parent / "sysconfig" / "airflow.env"


def test_sync_writes_mapped_decrypted_values_with_static_merge(aws, cfg_path, run_agent):
    seed_basic()
    proc = run_agent(cfg_path, "env", "sync", "--diff")
    assert proc.returncode == 0, proc.stderr
    values = parse_env(env_file(cfg_path).read_bytes())
    assert values == {
        "AIRFLOW__CORE__PARALLELISM": "32",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql://airflow:{SECRET}@db/airflow",
        "TZ": "UTC",
        "AIRFLOW_HOME": "/airflow",
    }
    assert proc.stdout.splitlines() == [
        "+ AIRFLOW_HOME",
        "+ AIRFLOW__CORE__LOAD_EXAMPLES",
        "+ AIRFLOW__CORE__PARALLELISM",
        "+ AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "+ TZ",
    ]
    assert SECRET not in proc.stderr + proc.stdout


def test_ssm_value_wins_over_static(aws, make_config, run_agent):
    put("/airflow/test/env/AIRFLOW_HOME", "/srv/airflow")
    cfg = make_config({"env": {"static": {"AIRFLOW_HOME": "/airflow", "EXTRA": "1"}}})
    assert run_agent(cfg, "env", "sync").returncode == 0
    values = parse_env(env_file(cfg).read_bytes())
    assert values["AIRFLOW_HOME"] == "/srv/airflow" and values["EXTRA"] == "1"


def test_more_than_250_parameters_across_pages(aws, cfg_path, run_agent):
    for i in range(263):
        put(f"/airflow/test/bulk/key_{i:03d}", f"value-{i}")
    proc = run_agent(cfg_path, "env", "sync")
    assert proc.returncode == 0, proc.stderr
    values = parse_env(env_file(cfg_path).read_bytes())
    assert len([k for k in values if k.startswith("AIRFLOW__BULK__")]) == 263
    assert values["AIRFLOW__BULK__KEY_262"] == "value-262"
    # 263 parameters at 10 a page: 27 pages, plus at most one empty trailing page
    assert len(aws.calls("GetParametersByPath")) in (27, 28)


def test_second_sync_writes_nothing_and_a_change_rewrites(aws, cfg_path, run_agent):
    seed_basic()
    assert run_agent(cfg_path, "env", "sync").returncode == 0
    path = env_file(cfg_path)
    before = os.stat(path)
    proc = run_agent(cfg_path, "env", "sync", "--diff")
    assert proc.returncode == 0 and proc.stdout == "" and "unchanged" in proc.stderr
    after = os.stat(path)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)

    put("/airflow/test/core/parallelism", "64")
    proc = run_agent(cfg_path, "env", "sync", "--diff")
    assert proc.returncode == 0 and proc.stdout == "~ AIRFLOW__CORE__PARALLELISM\n"
    assert os.stat(path).st_ino != before.st_ino
    assert parse_env(path.read_bytes())["AIRFLOW__CORE__PARALLELISM"] == "64"


def test_dry_run_writes_nothing(aws, cfg_path, run_agent):
    seed_basic()
    proc = run_agent(cfg_path, "env", "sync", "--dry-run", "--diff")
    assert proc.returncode == 0 and "+ TZ" in proc.stdout
    assert not env_file(cfg_path).exists()


def test_file_mode_and_owner(aws, make_config, run_agent):
    seed_basic()
    cfg = make_config({"env": {"mode": "0600", "owner": "root", "group": "root"}})
    assert run_agent(cfg, "env", "sync").returncode == 0
    st = os.stat(env_file(cfg))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_gid == 0
    # a drifted mode is put back even when the content is unchanged
    os.chmod(env_file(cfg), 0o644)
    assert run_agent(cfg, "env", "sync").returncode == 0
    assert stat.S_IMODE(os.stat(env_file(cfg)).st_mode) == 0o600


def test_unknown_group_is_a_config_error(aws, make_config, run_agent):
    seed_basic()
    cfg = make_config({"env": {"group": "no-such-group-xyz"}})
    proc = run_agent(cfg, "env", "sync")
    assert proc.returncode == 2 and "no-such-group-xyz" in proc.stderr


# -- faults keep the last good file ----------------------------------------------------------


@pytest.fixture
def synced(aws, cfg_path, run_agent):
    """A first good sync; returns the good file's bytes."""
    seed_basic()
    assert run_agent(cfg_path, "env", "sync").returncode == 0
    return env_file(cfg_path).read_bytes()


def assert_kept(cfg_path, good, proc, rc, reason):
    assert proc.returncode == rc, proc.stderr
    assert env_file(cfg_path).read_bytes() == good
    assert "kept the last good file" in proc.stderr and reason in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3
    # the job runner recorded the failure in env.json; what the last good sync wrote stays
    doc = json.loads((Path(json.loads(cfg_path.read_text())["state_dir"]) / "env.json").read_text())
    assert doc["last_sync_result"] == {1: "failed", 3: "refused"}[rc]
    assert reason in doc["last_failure_reason"] and doc["last_failure"] > 0
    assert doc["file_sha256"] == hashlib.sha256(good).hexdigest()


def test_access_denied_keeps_last_good(aws, synced, cfg_path, run_agent):
    aws.inject("GetParametersByPath", "AccessDeniedException", count=1, message="not allowed")
    assert_kept(cfg_path, synced, run_agent(cfg_path, "env", "sync"), 1, "AccessDeniedException")


def test_throttling_beyond_retries_keeps_last_good(aws, synced, make_config, run_agent):
    # env.fetch_deadline 0: no retries beyond botocore's (tests/test_env_sync_fleet.py has them)
    cfg = make_config({"aws": {"max_attempts": 3}, "env": {"fetch_deadline": 0}})
    aws.inject("GetParametersByPath", "ThrottlingException", count=3)
    assert_kept(cfg, synced, run_agent(cfg, "env", "sync"), 1, "ThrottlingException")


def test_throttling_within_retries_succeeds(aws, synced, make_config, run_agent):
    cfg = make_config({"aws": {"max_attempts": 4}})
    put("/airflow/test/core/parallelism", "48")
    aws.clear_calls()
    aws.inject("GetParametersByPath", "ThrottlingException", count=2)
    proc = run_agent(cfg, "env", "sync")
    assert proc.returncode == 0, proc.stderr
    assert parse_env(env_file(cfg).read_bytes())["AIRFLOW__CORE__PARALLELISM"] == "48"
    assert len(aws.calls("GetParametersByPath")) == 3  # two throttled, one answered


def test_endpoint_down_keeps_last_good(aws, synced, cfg_path, run_agent, make_config):
    cfg = make_config({"aws": {"max_attempts": 2, "connect_timeout": 1}})
    proc = run_agent(cfg, "env", "sync", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert_kept(cfg, synced, proc, 1, "unreachable")


def test_empty_result_keeps_last_good(aws, synced, make_config, run_agent):
    cfg = make_config({"env": {"ssm_paths": ["/airflow/nothing-here/"]}})
    assert_kept(cfg, synced, run_agent(cfg, "env", "sync"), 3, "no parameters")


def test_required_key_missing_keeps_last_good(aws, synced, make_config, run_agent):
    cfg = make_config({"env": {"required": ["AIRFLOW__CORE__FERNET_KEY"]}})
    assert_kept(cfg, synced, run_agent(cfg, "env", "sync"), 3, "AIRFLOW__CORE__FERNET_KEY")


def test_large_drop_keeps_last_good(aws, synced, cfg_path, run_agent):
    ssm().delete_parameters(Names=["/airflow/test/core/parallelism", "/airflow/test/env/TZ"])
    assert_kept(cfg_path, synced, run_agent(cfg_path, "env", "sync"), 3, "max_drop_fraction")
    proc = run_agent(cfg_path, "env", "sync", "--allow-drop", "--diff")
    assert proc.returncode == 0 and "- TZ" in proc.stdout


def test_bad_parameter_name_keeps_last_good_and_names_it(aws, synced, cfg_path, run_agent):
    put("/airflow/test/env/not-a-name", "x")
    assert_kept(
        cfg_path, synced, run_agent(cfg_path, "env", "sync"), 3, "/airflow/test/env/not-a-name"
    )


def test_variables_that_load_code_or_reach_aws_are_refused_naming_each(
    aws, synced, cfg_path, run_agent
):
    offenders = ["LD_PRELOAD", "PYTHONPATH", "AWS_ACCESS_KEY_ID", "AIRFLOW_AGENT_CONFIG"]
    for name in offenders:
        put(f"/airflow/test/env/{name}", "/tmp/evil", "SecureString")
    put("/airflow/test/env/AWS_DEFAULT_REGION", "eu-west-1")  # allowed: Airflow needs it
    proc = run_agent(cfg_path, "env", "sync")
    assert_kept(cfg_path, synced, proc, 3, "/airflow/test/env/LD_PRELOAD sets LD_PRELOAD")
    for name in offenders:
        assert f"/airflow/test/env/{name} sets {name} (" in proc.stderr
    assert "AWS_DEFAULT_REGION" not in proc.stderr and "/tmp/evil" not in proc.stderr
    # once they are gone, the allowed one is written
    ssm().delete_parameters(Names=[f"/airflow/test/env/{n}" for n in offenders])
    assert run_agent(cfg_path, "env", "sync").returncode == 0
    assert parse_env(env_file(cfg_path).read_bytes())["AWS_DEFAULT_REGION"] == "eu-west-1"


def test_env_static_with_a_refused_variable_is_a_config_error(aws, make_config, run_agent):
    seed_basic()
    cfg = make_config({"env": {"static": {"PYTHONSTARTUP": "/tmp/x.py"}}})
    proc = run_agent(cfg, "env", "sync")
    assert proc.returncode == 2 and "env.static.PYTHONSTARTUP" in proc.stderr, proc.stderr
    assert not env_file(cfg).exists()


def test_value_systemd_cannot_carry_keeps_last_good_and_names_it(aws, synced, cfg_path, run_agent):
    put("/airflow/test/core/weird", "a\ufffeb")
    assert_kept(cfg_path, synced, run_agent(cfg_path, "env", "sync"), 3, "/airflow/test/core/weird")


def test_no_region_and_no_imds_is_a_clear_error(aws, synced, cfg_path, run_agent):
    proc = run_agent(
        cfg_path, "env", "sync", env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9/"}
    )
    assert_kept(cfg_path, synced, proc, 1, "IMDS at http://127.0.0.1:9/ unreachable")


# -- secrets ------------------------------------------------------------------------------------


def test_no_secret_in_stderr_logs_or_any_argv(aws, make_config, agent_env, tmp_path):
    """Run syncs (DEBUG logging) while scanning every process's argv for the secret values."""
    secrets = [f"Sup3r-Secret-{i}-{'x' * i}" for i in range(5)]
    for i, s in enumerate(secrets):
        put(f"/airflow/test/secrets/s{i}", s, "SecureString")
    for i in range(40):
        put(f"/airflow/test/plain/p{i}", f"plain-{i}")
    cfg = make_config()
    seen = []
    stop = threading.Event()

    def scan():
        while not stop.is_set():
            for p in psutil.process_iter(["cmdline"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                if any(s in cmd for s in secrets):
                    seen.append(cmd)

    scanner = threading.Thread(target=scan)
    scanner.start()
    try:
        outputs = []
        for args in (["--diff"], ["--diff"], ["--dry-run", "--diff"]):
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "agent",
                    "--config",
                    str(cfg),
                    "--log-level",
                    "DEBUG",
                    "env",
                    "sync",
                    *args,
                ],
                capture_output=True,
                text=True,
                env=agent_env,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stderr
            outputs.append(proc.stdout + proc.stderr)
            put("/airflow/test/secrets/s0", secrets[0], "SecureString")
    finally:
        stop.set()
        scanner.join()
    assert seen == []
    for out in outputs:
        assert not any(s in out for s in secrets)
    # the only file holding them is the env file, which is not world-readable
    holders = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)
    ]
    assert holders == [env_file(cfg)]
    assert stat.S_IMODE(os.stat(holders[0]).st_mode) & 0o007 == 0


def test_an_unwritable_env_file_location_is_named_and_recorded(aws, make_config, run_agent):
    seed_basic()
    blocker = Path(str(make_config())).parent / "not-a-dir"
    blocker.write_text("a file where the env file's directory should be")
    cfg = make_config({"env": {"file": str(blocker / "airflow.env")}})
    proc = run_agent(cfg, "env", "sync")
    assert proc.returncode == 1, proc.stderr
    assert f"kept the last good file: {blocker}: File exists" in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr
    doc = json.loads((Path(json.loads(cfg.read_text())["state_dir"]) / "env.json").read_text())
    assert doc["last_sync_result"] == "failed" and str(blocker) in doc["last_failure_reason"]
