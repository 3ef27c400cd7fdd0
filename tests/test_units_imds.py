"""Static check of systemd/*.service: the units that run Airflow (User=airflow) cannot reach
IMDS and act as the task role; the agent's units that talk to AWS can reach it.

A task runs in its Airflow unit's cgroup, so `IPAddressDeny=` on the unit covers it (issue 12
item 5). The Airflow units take AWS credentials only from the agent-written AWS config file.
The real-systemd side: tests/test_units.py (properties as systemd parses them),
tests/test_task_role_systemd.py and tests/test_task_role_airflow.py (a task's connection).
"""

from __future__ import annotations

from typing import Dict, List

import pytest

from agent.jobs.task_credentials.config import TaskCredentialsConfig
from agent.jobs.task_credentials.plan import CONFIG_NAME
from tests.test_units_root_env import UNITS_DIR, directives, runs_as_root

IMDS = {"169.254.169.254", "fd00:ec2::254"}
CONFIG_FILE = f"{TaskCredentialsConfig().directory}/{CONFIG_NAME}"


def _texts() -> Dict[str, str]:
    return {p.name: p.read_text() for p in sorted(UNITS_DIR.glob("*.service"))}


def _values(text: str, key: str) -> List[str]:
    out: List[str] = []
    for section, k, v in directives(text):
        if section == "Service" and k == key:
            out = [] if v == "" else out + v.split()
    return out


def denies_imds(text: str) -> bool:
    denied = {v.split("/")[0] for v in _values(text, "IPAddressDeny")}
    return "any" in denied or denied >= IMDS


AIRFLOW_UNITS = sorted(n for n, t in _texts().items() if not runs_as_root(t))


def test_the_airflow_units_are_found():
    assert AIRFLOW_UNITS == [
        "airflow-api-server.service",
        "airflow-dag-processor.service",
        "airflow-scheduler.service",
        "airflow-triggerer.service",
        "airflow-worker.service",
    ]


@pytest.mark.parametrize("unit", AIRFLOW_UNITS)
def test_airflow_units_deny_imds_and_use_the_task_role(unit):
    text = _texts()[unit]
    assert denies_imds(text), unit
    env = _values(text, "Environment")
    assert f"AWS_CONFIG_FILE={CONFIG_FILE}" in env
    assert "AWS_SHARED_CREDENTIALS_FILE=/dev/null" in env
    assert "AWS_EC2_METADATA_DISABLED=true" in env
    assert "airflow-agent-task-credentials.service" in _values_unit(text, "Wants")
    assert "airflow-agent-task-credentials.service" in _values_unit(text, "After")


@pytest.mark.parametrize(
    "unit", ["airflow-agent-variables.service", "airflow-agent-variables-watch.service"]
)
def test_units_that_run_airflow_for_the_agent_have_the_task_credentials_first(unit):
    # their Airflow interpreter reads config secrets with the task role's credentials: a
    # scheduler whose variables sync came before any Airflow unit had none
    text = _texts()[unit]
    assert "airflow-agent-task-credentials.service" in _values_unit(text, "Wants")
    assert "airflow-agent-task-credentials.service" in _values_unit(text, "After")


def _values_unit(text: str, key: str) -> List[str]:
    out: List[str] = []
    for section, k, v in directives(text):
        if section == "Unit" and k == key:
            out += v.split()
    return out


@pytest.mark.parametrize(
    "unit",
    [
        "airflow-agent-env.service",
        "airflow-agent-lifecycle.service",
        "airflow-agent-task-credentials.service",
        "airflow-agent-variables.service",
        "airflow-agent-variables-watch.service",
    ],
)
def test_agent_units_that_call_aws_can_reach_imds(unit):
    assert not denies_imds(_texts()[unit])


@pytest.mark.parametrize(
    "text, denied",
    [
        ("[Service]\nIPAddressDeny=169.254.169.254 fd00:ec2::254\n", True),
        ("[Service]\nIPAddressDeny=169.254.169.254/32\nIPAddressDeny=fd00:ec2::254/128\n", True),
        ("[Service]\nIPAddressDeny=any\n", True),
        ("[Service]\nIPAddressDeny=169.254.169.254\n", False),  # IPv6 IMDS left open
        ("[Service]\nIPAddressDeny=169.254.169.254 fd00:ec2::254\nIPAddressDeny=\n", False),
        ("[Service]\n# IPAddressDeny=any\n", False),
    ],
)
def test_the_check_flags_what_it_must(text, denied):
    assert denies_imds(text) is denied
