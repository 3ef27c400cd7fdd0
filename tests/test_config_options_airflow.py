"""The agent resolves an option's env forms exactly as Airflow 3.3.2 does (the real Airflow).

The second test: with the Amazon provider's real SecretsManagerBackend (Airflow venv) and the
agent's own implementation both reading the embedded AWS, Airflow's `conf.get` and the agent
return the same secret for every shape of backend kwargs (the template's included).

Every combination of the plain, `_CMD` and `_SECRET` variables (present, absent, empty) for a
sensitive option and a non-sensitive one is given to Airflow's own `conf.get` in the Airflow
venv, with a real command and its secrets-backend read answering `secret:<key>`; the agent's
`AirflowOptions` gets the same environment, a runner that runs the command the same way and a
lookup that answers the same. The two must agree on every case, and on which options are
sensitive at all.
"""

from __future__ import annotations

import itertools
import json
import shlex
import subprocess

import pytest

from agent.airflow.config_options import (
    SECRETS_MANAGER_BACKEND,
    SENSITIVE_OPTIONS,
    AirflowOptions,
    OptionError,
    env_var_name,
)
from agent.airflow.option_sources import secrets_manager_lookup
from agent.config import config_from_dict
from sandbox.airflow_cluster import AIRFLOW_VENV

OPTIONS = [("celery", "broker_url"), ("database", "sql_alchemy_conn"), ("core", "executor")]
# the backend as the template configures it; "" prefix: the secret id is the key itself
BACKEND = {
    "AIRFLOW__SECRETS__BACKEND": SECRETS_MANAGER_BACKEND,
    "AIRFLOW__SECRETS__BACKEND_KWARGS": '{"config_prefix": ""}',
}

AIRFLOW_SIDE = r"""
import json, os, sys
from airflow.configuration import conf  # imported before any AIRFLOW__ variable is set
cases = json.load(sys.stdin)
conf._get_config_value_from_secret_backend = lambda key: "secret:" + key
out = {"sensitive": sorted(map(list, conf.sensitive_config_values)), "cases": []}
defaults = {}
for section, key, _ in cases:
    defaults.setdefault((section, key), conf.get(section, key, fallback=None))
for section, key, env in cases:
    for name in [n for n in os.environ if n.startswith("AIRFLOW__")]:
        del os.environ[name]
    os.environ.update(env)
    value = conf.get(section, key, fallback=None)
    out["cases"].append(None if value == defaults[(section, key)] and not env.get(
        "AIRFLOW__" + section.upper() + "__" + key.upper()) else value)
print(json.dumps(out))
"""


def cases():
    values = {"": ["plain-value", "", "$HOME_OF_X/x"], "_CMD": ["echo from-a-command"]}
    values["_SECRET"] = ["the_key"]
    out = []
    for section, key in OPTIONS:
        var = env_var_name(section, key)
        for present in itertools.product([False, True], repeat=3):
            choices = [
                values[suffix] if on else [None]
                for on, suffix in zip(present, ("", "_CMD", "_SECRET"))
            ]
            for plain, cmd, secret in itertools.product(*choices):
                env = {"HOME_OF_X": "/home/x"}
                for suffix, value in (("", plain), ("_CMD", cmd), ("_SECRET", secret)):
                    if value is not None:
                        env[var + suffix] = value
                out.append((section, key, env))
    return out


def agent_side(section, key, env):
    def run(variable, command):
        return subprocess.run(shlex.split(command), capture_output=True, text=True).stdout

    full = dict(env, **BACKEND)
    options = AirflowOptions(full, "t", run_command=run, lookup_secret=lambda b, i: "secret:" + i)
    got = options.get(section, key)
    return None if got is None else got.value


def test_precedence_and_sensitivity_match_airflow():
    all_cases = cases()
    assert len(all_cases) > 40
    proc = subprocess.run(
        [str(AIRFLOW_VENV / "bin" / "python"), "-c", AIRFLOW_SIDE],
        input=json.dumps(all_cases),
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": "/nonexistent-airflow-home"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    airflow = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {tuple(x) for x in airflow["sensitive"]} == SENSITIVE_OPTIONS
    ours = [agent_side(*c) for c in all_cases]
    mismatches = [(c, a, o) for c, a, o in zip(all_cases, airflow["cases"], ours) if a != o]
    assert mismatches == []
    # the cases cover every form winning
    assert {"plain-value", "", "/home/x/x", "from-a-command\n", "secret:the_key"} <= set(ours)


# -- the Secrets Manager backend: the agent reads the secret Airflow's provider reads ----------

PROVIDER_SIDE = r"""
import json, os, sys
from airflow.configuration import conf
print(json.dumps(conf.get("celery", "broker_url", fallback=None)))
"""


@pytest.mark.parametrize(
    "kwargs, secret_id",
    [
        # the template's (cloudformation/airflow-cluster.yaml ParamSecretsBackendKwargs)
        (
            {
                "config_prefix": "airflow/st/config",
                "connections_prefix": None,
                "variables_prefix": None,
                "region_name": "us-east-1",
            },
            "airflow/st/config/broker_url",
        ),
        ({"config_prefix": "airflow/st/config//"}, "airflow/st/config/broker_url"),
        ({"config_prefix": "p", "sep": ":"}, "p:broker_url"),
        ({"config_prefix": ""}, "broker_url"),
        ({}, "airflow/config/broker_url"),
        (
            {"config_prefix": "airflow/st/config", "config_lookup_pattern": "^BROKER"},
            "airflow/st/config/broker_url",
        ),
        ({"config_prefix": "airflow/st/config", "config_lookup_pattern": "^fernet"}, None),
    ],
)
def test_the_agent_reads_the_secret_the_amazon_provider_reads(aws, kwargs, secret_id):
    sm = aws.client("secretsmanager")
    candidates = {
        "airflow/st/config/broker_url",
        "p:broker_url",
        "broker_url",
        "airflow/config/broker_url",
    }
    for n, name in enumerate(sorted(candidates)):
        sm.create_secret(Name=name, SecretString=f"redis://:pw{n}@h{n}:6379/0")
    env = {
        "AIRFLOW__CELERY__BROKER_URL_SECRET": "broker_url",
        "AIRFLOW__SECRETS__BACKEND": SECRETS_MANAGER_BACKEND,
        "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps(kwargs),
    }
    proc = subprocess.run(
        [str(AIRFLOW_VENV / "bin" / "python"), "-c", PROVIDER_SIDE],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(
            env,
            PATH="/usr/bin:/bin",
            AIRFLOW_HOME="/nonexistent-airflow-home",
            AWS_CONFIG_FILE="/dev/null",
            AWS_SHARED_CREDENTIALS_FILE="/dev/null",
            **aws.client_env(),
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    airflow_value = json.loads(proc.stdout.strip().splitlines()[-1])

    cfg = config_from_dict({"aws": {"max_attempts": 2}})
    options = AirflowOptions(env, "t", lookup_secret=secrets_manager_lookup(cfg))
    if secret_id is None:
        # the provider does not look it up: Airflow falls back to its default broker URL, the
        # agent refuses to guess
        assert airflow_value == "redis://redis:6379/0"
        with pytest.raises(OptionError, match="does not look it up"):
            options.get("celery", "broker_url")
        return
    expected = sm.get_secret_value(SecretId=secret_id)["SecretString"]
    assert airflow_value == expected
    assert options.get("celery", "broker_url").value == expected
