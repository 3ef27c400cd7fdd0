"""Static check of systemd/*.service: no unit that runs as root loads the Airflow env file.

The env file (`env.file`, default /etc/sysconfig/airflow.env) is rendered from SSM parameters:
whoever writes a parameter under `<path>/env/` chooses names such as PYTHONPATH, LD_PRELOAD,
AIRFLOW_AGENT_CONFIG or AWS_EC2_METADATA_SERVICE_ENDPOINT. `EnvironmentFile=` in a root unit
would hand them to a root process (issue 12), so only the Airflow units (User=airflow) may load
it; the agent reads it as data (agent/platform/envfile.parse_env). The real-systemd side of
this is tests/test_root_units_env_systemd.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from agent.config import EnvConfig

UNITS_DIR = Path(__file__).resolve().parents[1] / "systemd"
ENV_FILE = EnvConfig().file  # the default path the units would name


def directives(text: str) -> List[Tuple[str, str, str]]:
    """(section, key, value) of every assignment, comments and blank lines skipped; a
    backslash-continued line is joined as systemd joins it."""
    out = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep:
            out.append((section, key.strip(), value.strip()))
    return out


def runs_as_root(text: str) -> bool:
    """No User= in [Service] (systemd's default), or User=root / User=0; the last one wins."""
    user = ""
    for section, key, value in directives(text):
        if section == "Service" and key == "User":
            user = value
    return user in ("", "root", "0")


def airflow_env_files(text: str) -> List[str]:
    """The EnvironmentFile= entries of [Service] that name the Airflow env file."""
    found = []
    for section, key, value in directives(text):
        if section != "Service" or key != "EnvironmentFile":
            continue
        for item in value.split():
            path = item.lstrip("-")
            if path == ENV_FILE or Path(path).name == Path(ENV_FILE).name:
                found.append(item)
    return found


def offenders(units: Dict[str, str]) -> Dict[str, List[str]]:
    return {
        name: airflow_env_files(text)
        for name, text in units.items()
        if runs_as_root(text) and airflow_env_files(text)
    }


def _unit_texts() -> Dict[str, str]:
    return {p.name: p.read_text() for p in sorted(UNITS_DIR.glob("*.service"))}


def test_no_root_unit_loads_the_airflow_env_file() -> None:
    units = _unit_texts()
    root_units = sorted(n for n, t in units.items() if runs_as_root(t))
    # the agent's units are root; the check would pass vacuously if none were seen as root
    assert "airflow-agent-lifecycle.service" in root_units, root_units
    assert "airflow-agent-variables.service" in root_units, root_units
    assert offenders(units) == {}


def test_the_airflow_units_still_load_it() -> None:
    units = _unit_texts()
    airflow = {n: t for n, t in units.items() if not runs_as_root(t)}
    assert sorted(airflow) == [
        "airflow-api-server.service",
        "airflow-dag-processor.service",
        "airflow-scheduler.service",
        "airflow-triggerer.service",
        "airflow-worker.service",
    ]
    for name, text in airflow.items():
        assert airflow_env_files(text) == [ENV_FILE], name


@pytest.mark.parametrize(
    "service, bad",
    [
        ("ExecStart=/x\nEnvironmentFile=-/etc/sysconfig/airflow.env\n", True),
        ("ExecStart=/x\nEnvironmentFile=/etc/sysconfig/airflow.env\n", True),
        ("User=root\nEnvironmentFile=/etc/sysconfig/airflow.env\n", True),
        ("User=airflow\nUser=\nEnvironmentFile=/etc/sysconfig/airflow.env\n", True),
        ("EnvironmentFile=/etc/a.env \\\n  -/etc/sysconfig/airflow.env\n", True),
        ("EnvironmentFile=/srv/other/airflow.env\n", True),
        ("User=airflow\nEnvironmentFile=/etc/sysconfig/airflow.env\n", False),
        ("# EnvironmentFile=/etc/sysconfig/airflow.env\nExecStart=/x\n", False),
        ("EnvironmentFile=/etc/sysconfig/other.env\n", False),
    ],
)
def test_the_check_flags_what_it_must(service: str, bad: bool) -> None:
    text = "[Unit]\nDescription=t\n\n[Service]\n" + service
    assert bool(offenders({"u.service": text})) is bad
