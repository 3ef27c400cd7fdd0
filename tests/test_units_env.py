"""The AWS settings the agent gives Airflow-side children are the Airflow units' own."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from agent.airflow.option_sources import command_runner
from agent.airflow.units_env import airflow_aws_env
from agent.config import config_from_dict

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
AIRFLOW_UNITS = [
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-api-server",
    "airflow-worker",
]


def unit_environment(unit: str) -> dict:
    out = {}
    for line in (SYSTEMD / f"{unit}.service").read_text().splitlines():
        if line.startswith("Environment="):
            name, _, value = line[len("Environment=") :].partition("=")
            out[name] = value
    return out


@pytest.mark.parametrize("unit", AIRFLOW_UNITS)
def test_the_agents_airflow_children_get_the_units_aws_settings(unit):
    ours = airflow_aws_env(config_from_dict({}), environ={})
    theirs = {k: v for k, v in unit_environment(unit).items() if k.startswith("AWS_")}
    assert ours == theirs


def test_the_directory_follows_task_credentials():
    cfg = config_from_dict({"task_credentials": {"directory": "/run/other-aws"}})
    assert airflow_aws_env(cfg)["AWS_CONFIG_FILE"] == "/run/other-aws/config"


def test_the_managers_endpoints_reach_the_children_as_they_reach_the_units():
    environ = {
        "AWS_ENDPOINT_URL": "http://10.77.0.1:5000",
        "AWS_ENDPOINT_URL_STS": "https://sts-fips.example",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_CONFIG_FILE": "/root/.aws/config",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:1/",
    }
    env = airflow_aws_env(config_from_dict({}), environ=environ)
    assert env["AWS_ENDPOINT_URL"] == "http://10.77.0.1:5000"
    assert env["AWS_ENDPOINT_URL_STS"] == "https://sts-fips.example"
    # only endpoints pass: never the agent's own credentials, config file or IMDS
    assert "AWS_ACCESS_KEY_ID" not in env
    assert "AWS_EC2_METADATA_SERVICE_ENDPOINT" not in env
    assert env["AWS_CONFIG_FILE"] == "/run/airflow-aws/config"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_cmd_command_acts_as_the_units_do_not_as_the_instance():
    user = next(n for n in ("nobody", "daemon") if pwd.getpwnam(n).pw_uid != 0)
    run = command_runner(config_from_dict({"airflow_config": {"command_user": user}}), {})
    out = run(
        "X_CMD",
        "sh -c 'echo $AWS_CONFIG_FILE $AWS_SHARED_CREDENTIALS_FILE $AWS_EC2_METADATA_DISABLED'",
    )
    assert out.split() == ["/run/airflow-aws/config", "/dev/null", "true"]
