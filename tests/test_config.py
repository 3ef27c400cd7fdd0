"""agent.yaml loading: defaults, and errors that name the key and the file."""

import re
from pathlib import Path

import pytest

from agent.config import DEFAULT_UNITS, config_from_dict, load_config
from agent.errors import ConfigError


def test_defaults_match_the_contract():
    cfg = config_from_dict({})
    assert cfg.state_dir == "/var/lib/airflow-agent"
    assert cfg.env.file == "/etc/sysconfig/airflow.env"
    assert cfg.env.mode_bits == 0o640 and cfg.env.group == "airflow"
    assert cfg.env.static == {"AIRFLOW_HOME": "/airflow"}
    assert cfg.units_for("worker") == DEFAULT_UNITS["worker"] == ["airflow-worker"]
    assert cfg.drain.timeout == 3000


def test_units_override():
    cfg = config_from_dict({"units": {"scheduler": ["a", "b"]}})
    assert cfg.units_for("scheduler") == ["a", "b"]
    assert cfg.units_for("webserver") == ["airflow-api-server"]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"bogus": 1}, "bogus"),
        ({"env": {"fiel": "/x"}}, "env.fiel"),
        ({"env": {"ssm_paths": "/airflow/"}}, "env.ssm_paths"),
        ({"env": {"ssm_paths": ["airflow/"]}}, "env.ssm_paths[0]"),
        ({"env": {"mode": 416}}, "env.mode"),
        ({"env": {"mode": "0644"}}, "env.mode"),
        ({"env": {"max_drop_fraction": 2}}, "env.max_drop_fraction"),
        ({"role": {"override": "dbserver"}}, "role.override"),
        ({"role": {"groups": {"*-workers-*": "cook"}}}, "role.groups"),
        ({"units": {"chef": ["x"]}}, "units.chef"),
        ({"drain": {"timeout": "long"}}, "drain.timeout"),
        ({"drain": {"on_deadline": "panic"}}, "drain.on_deadline"),
    ],
)
def test_bad_keys_name_the_key_and_the_file(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, source="/etc/airflow-agent/agent.yaml")
    assert f"'{key}" in str(err.value)
    assert "/etc/airflow-agent/agent.yaml" in str(err.value)


def test_load_config_errors(tmp_path):
    bad = tmp_path / "agent.yaml"
    bad.write_text("env: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_config_repr_never_shows_static_values():
    cfg = config_from_dict({"env": {"static": {"TOKEN": "s3cr3t-value"}}})
    assert cfg.env.static["TOKEN"] == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(cfg) and "s3cr3t-value" not in str(cfg)


def test_cli_exit_code_2_names_key_and_file(tmp_path, run_agent):
    path = tmp_path / "agent.yaml"
    path.write_text("env:\n  file: /x\n  colour: blue\n")
    proc = run_agent(path, "env", "sync")
    assert proc.returncode == 2
    assert "env.colour" in proc.stderr and str(path) in proc.stderr


# -- what root must not trust: writable env files, refused variables, busy loops --------------


@pytest.mark.parametrize("mode", ["0660", "0620", "0670", "0604", "0602", "0601", "0666"])
def test_env_mode_group_or_other_writable_or_other_readable_is_refused(mode):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"env": {"mode": mode}}, source="agent.yaml")
    assert "key 'env.mode'" in str(err.value) and mode in str(err.value)


@pytest.mark.parametrize("mode", ["0640", "0600", "0400", "0440", "640", "0750"])
def test_env_modes_that_keep_the_file_safe(mode):
    assert config_from_dict({"env": {"mode": mode}}).env.mode == mode


@pytest.mark.parametrize(
    "name", ["LD_PRELOAD", "PYTHONPATH", "AWS_ACCESS_KEY_ID", "AIRFLOW_AGENT_CONFIG", "PATH"]
)
def test_env_static_refuses_variables_that_load_code_or_reach_aws(name):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"env": {"static": {"TZ": "UTC", name: "s3cr3t-v"}}}, source="agent.yaml")
    msg = str(err.value)
    assert f"key 'env.static.{name}' sets {name}" in msg and "agent.yaml" in msg
    assert "never carries it" in msg and "s3cr3t-v" not in msg


def test_env_required_refuses_a_name_the_file_can_never_carry():
    with pytest.raises(ConfigError, match=r"key 'env.required\[1\]' names LD_PRELOAD"):
        config_from_dict({"env": {"required": ["TZ", "LD_PRELOAD"]}})


def test_env_static_allows_the_region():
    cfg = config_from_dict({"env": {"static": {"AWS_DEFAULT_REGION": "eu-west-1"}}})
    assert cfg.env.static["AWS_DEFAULT_REGION"] == "eu-west-1"


POSITIVE = [
    "confapply.debounce",
    "confapply.max_wait",
    "confapply.unit_timeout",
    "confapply.watchdog_interval",
    "confapply.recheck_interval",
    "variables.timeout",
    "variables.watch_interval",
    "drain.timeout",
    "drain.poll_interval",
    "drain.reply_timeout",
    "drain.stop_timeout",
    "lifecycle.poll_interval",
    "lifecycle.heartbeat_interval",
    "deploy.validate_timeout",
    "deploy.check_timeout",
    "aws.max_attempts",
    "aws.connect_timeout",
    "aws.read_timeout",
    "imds.timeout",
    "imds.attempts",
]
NON_NEGATIVE = [
    "env.lock_timeout",
    "lifecycle.spot_margin",
    "lifecycle.idle_before_unprotect",
    "lifecycle.complete_margin",
    "lifecycle.max_wait",
]


def nested(key, value):
    section, name = key.split(".")
    return {section: {name: value}}


@pytest.mark.parametrize("key", POSITIVE)
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_intervals_and_timeouts_are_refused(key, value):
    with pytest.raises(ConfigError) as err:
        config_from_dict(nested(key, value), source="agent.yaml")
    assert f"key '{key}' must be positive" in str(err.value)


@pytest.mark.parametrize("key", NON_NEGATIVE)
def test_negative_margins_are_refused_and_zero_is_allowed(key):
    with pytest.raises(ConfigError, match=f"key '{key}' must be zero or more"):
        config_from_dict(nested(key, -0.5))
    assert config_from_dict(nested(key, 0)) is not None


@pytest.mark.parametrize("key", POSITIVE + NON_NEGATIVE)
def test_a_small_positive_value_is_accepted(key):
    value = 1 if key.endswith("attempts") else 0.5
    data = nested(key, value)
    if key in ("confapply.debounce", "confapply.max_wait"):
        data = {"confapply": {"debounce": value, "max_wait": value}}
    cfg = config_from_dict(data)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize(
    "key", ["drain.poll_interval", "env.max_drop_fraction", "aws.read_timeout"]
)
def test_nan_and_infinity_are_refused(tmp_path, key, value):
    section, name = key.split(".")
    path = tmp_path / "agent.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(str(path))


def test_debounce_above_max_wait_is_refused():
    with pytest.raises(ConfigError, match="key 'confapply.max_wait' must be >= confapply.debounce"):
        config_from_dict({"confapply": {"debounce": 20, "max_wait": 15}})


def test_the_lock_timeout_default_fits_the_boot_units_start_timeout():
    # the boot unit's TimeoutStartSec covers the wait for another run and this run itself: a
    # wait as long as the unit's budget would be killed by systemd before its clear message
    unit = Path(__file__).resolve().parents[1] / "systemd" / "airflow-agent-env.service"
    (start_timeout,) = re.findall(r"^TimeoutStartSec=(\d+)$", unit.read_text(), re.M)
    assert config_from_dict({}).env.lock_timeout <= int(start_timeout) / 2


def test_load_config_records_the_file_and_the_hash_of_what_it_read(tmp_path, monkeypatch):
    import hashlib

    path = tmp_path / "agent.yaml"
    path.write_bytes(b"cluster: x\n")
    cfg = load_config(str(path))
    assert cfg.loaded_from.path == str(path) and cfg.loaded_from.named
    assert cfg.loaded_from.sha256 == hashlib.sha256(b"cluster: x\n").hexdigest()
    # the default path, absent: defaults, and "absent" is what a later change is compared with
    monkeypatch.setattr("agent.config.DEFAULT_CONFIG_PATH", str(tmp_path / "none.yaml"))
    monkeypatch.delenv("AIRFLOW_AGENT_CONFIG", raising=False)
    cfg = load_config()
    assert (cfg.loaded_from.sha256, cfg.loaded_from.named) == (None, False)
    # built from a dict (tests): no file
    assert config_from_dict({}).loaded_from is None
    path.write_bytes(b"cluster: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(path))


def test_airflow_config_defaults_and_checks():
    cfg = config_from_dict({})
    assert (cfg.airflow_config.command_user, cfg.airflow_config.command_timeout) == ("airflow", 60)
    assert (
        config_from_dict({"airflow_config": {"command_user": None}}).airflow_config.command_user
        is None
    )
    with pytest.raises(ConfigError, match="airflow_config.command_user"):
        config_from_dict({"airflow_config": {"command_user": "root"}})
