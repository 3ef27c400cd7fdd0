"""Shared fixtures: the embedded AWS, the strict IMDSv2 server, agent.yaml files, CLI runs.

Safety first: before any test runs, every AWS and IMDS endpoint in this process's environment
points at a closed loopback port, so a test that forgets a fixture fails fast instead of
reaching 169.254.169.254 or a real AWS endpoint.

Tiers: every test is marked from what it uses (see `pytest_collection_modifyitems`). A test
whose fixtures (or its own body) name a heavy sandbox part (sandbox/tiers.py: the systemd test
host, the Airflow cluster and venv, the embedded AWS and IMDS servers, redis-server and Celery
workers) gets that part's tiers (`systemd`, `airflow`, `aws`, `redis`). Everything else is
`fast` unless marked `slow` by hand, and a fast test that starts a heavy part anyway fails,
naming it. `make check` runs `-m fast`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Set

import pytest

# every module that defines a heavy part, so sandbox.tiers.HEAVY knows them all at collection
import sandbox.airflow_cluster
import sandbox.celery_worker_host
import sandbox.lifecycle
import sandbox.redis_server
import sandbox.systemd_host  # noqa: F401
from sandbox import tiers
from sandbox.aws_server import AwsServer
from sandbox.imds_server import ImdsServer

REPO_ROOT = Path(__file__).resolve().parents[1]
_DEAD_ENDPOINT = "http://127.0.0.1:9"

os.environ.update(
    {
        "AWS_ENDPOINT_URL": _DEAD_ENDPOINT,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": _DEAD_ENDPOINT + "/",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
)
for _name in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AIRFLOW_AGENT_CONFIG"):
    os.environ.pop(_name, None)


# -- tiers -----------------------------------------------------------------------------------

HAND_MARKED = ("slow",)  # a test that is slow without any heavy part is marked by hand


def _tiers_of(item: pytest.Item) -> Set[str]:
    found: Set[str] = set()
    seen: Set[int] = set()
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in defs.get(name, ()):
            found |= tiers.tiers_named_by(fixturedef.func, seen)
    test = getattr(item, "function", None)
    if test is not None:
        found |= tiers.tiers_named_by(test, seen)
    return found


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the markers added here
def pytest_collection_modifyitems(config, items):
    for item in items:
        for tier in sorted(_tiers_of(item)):
            item.add_marker(tier)
        if not any(item.get_closest_marker(m) for m in (*tiers.TIERS, *HAND_MARKED)):
            item.add_marker("fast")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # a fast test must not start a heavy part: if the marking missed one, fail loudly
    tiers.forbid(item.nodeid if item.get_closest_marker("fast") else None)
    try:
        yield
    finally:
        tiers.forbid(None)


# -- the embedded AWS and IMDS ------------------------------------------------------------------


@pytest.fixture(scope="session")
def aws_server():
    server = AwsServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def imds_server():
    server = ImdsServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ssm(aws_server):
    """An SSM client on the embedded AWS, for fixtures of any scope that seed parameters."""
    return aws_server.client("ssm")


@pytest.fixture
def aws(aws_server, monkeypatch):
    """The embedded AWS, reset, with this process's boto3 pointed at it."""
    aws_server.reset()
    for k, v in aws_server.client_env().items():
        monkeypatch.setenv(k, v)
    yield aws_server
    aws_server.clear_faults()


@pytest.fixture
def imds(imds_server, monkeypatch):
    """The strict IMDSv2 server, reset, with this process's IMDS endpoint pointed at it."""
    imds_server.reset()
    for k, v in imds_server.client_env().items():
        monkeypatch.setenv(k, v)
    return imds_server


@pytest.fixture
def agent_env(aws, imds) -> Dict[str, str]:
    """Environment for an agent subprocess talking to the rig (region comes from IMDS)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(aws.client_env())
    env.update(imds.client_env())
    env.pop("AWS_REGION", None)
    env.pop("AWS_DEFAULT_REGION", None)
    env["AWS_CONFIG_FILE"] = "/dev/null"
    env["AWS_SHARED_CREDENTIALS_FILE"] = "/dev/null"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


@pytest.fixture
def make_config(tmp_path):
    """make_config(**overrides) -> Path of an agent.yaml whose paths all live under tmp_path."""

    def make(overrides: Optional[Dict[str, Any]] = None, name: str = "agent.yaml") -> Path:
        base = {
            "cluster": "test",
            "state_dir": str(tmp_path / "state"),
            "airflow_home": str(tmp_path / "airflow"),
            "env": {
                "file": str(tmp_path / "sysconfig" / "airflow.env"),
                "ssm_paths": ["/airflow/test/"],
                "owner": "root",
                "group": "root",
            },
        }
        data = deep_merge(base, overrides or {})
        path = tmp_path / name
        path.write_text(json.dumps(data, indent=1))
        return path

    return make


@pytest.fixture
def run_agent(agent_env):
    """run_agent(config_path, *args, env=None) -> CompletedProcess of `python -m agent ...`."""

    def run(
        config: Optional[Path],
        *args: str,
        env: Optional[Dict[str, str]] = None,
        timeout: float = 120,
        check: bool = False,
    ) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "agent"]
        if config is not None:
            argv += ["--config", str(config)]
        argv += list(args)
        full_env = dict(agent_env)
        full_env.update(env or {})
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            check=check,
            cwd=str(REPO_ROOT),
        )

    return run


# -- the template's tests: tests/test_cloudformation.py and the modules beside it ---------------


@pytest.fixture(scope="module")
def template() -> Dict[str, Any]:
    """cloudformation/airflow-cluster.yaml, loaded as the sandbox loads it."""
    from sandbox.cfn_template import load_template
    from tests.test_cloudformation import TEMPLATE_PATH

    return load_template(TEMPLATE_PATH)


@pytest.fixture(scope="module")
def resolver(template):
    """The template resolved with the tests' parameters (tests/test_cloudformation.TEST_PARAMS)."""
    from sandbox.cfn_template import Resolver
    from tests.test_cloudformation import STACK, TEST_PARAMS

    return Resolver(template, TEST_PARAMS, pseudo={"AWS::StackName": STACK})
