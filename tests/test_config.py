"""agent.yaml loading: defaults, and errors that name the key and the file."""

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
