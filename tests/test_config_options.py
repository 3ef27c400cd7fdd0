"""Airflow options in their three env forms (agent/airflow/config_options.py, option_sources.py).

The precedence core is checked case by case here and against Airflow 3.3 itself in
tests/test_config_options_airflow.py; the `_CMD` runner runs real commands as a real unprivileged
user (never root); the Secrets Manager door is exercised on the embedded AWS in
tests/test_broker_secret_forms.py.
"""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path

import pytest

from agent.airflow.config_options import (
    COMMAND,
    PLAIN,
    SECRET,
    SECRETS_MANAGER_BACKEND,
    AirflowOptions,
    OptionError,
    SecretsManagerConfig,
    expand_vars,
    option_form,
    secret_parts,
    secrets_manager_config,
)
from agent.airflow.option_sources import command_runner
from agent.config import config_from_dict
from agent.errors import ConfigError
from agent.logs import scrub
from agent.worker.celery_control import ControlError, broker_settings

URL = "AIRFLOW__CELERY__BROKER_URL"
BACKEND = {
    "AIRFLOW__SECRETS__BACKEND": SECRETS_MANAGER_BACKEND,
    "AIRFLOW__SECRETS__BACKEND_KWARGS": '{"config_prefix": "airflow/prod/config"}',
}


# -- precedence (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "present, kind",
    [
        ({URL: "p", URL + "_CMD": "c", URL + "_SECRET": "s"}, PLAIN),
        ({URL + "_CMD": "c", URL + "_SECRET": "s"}, COMMAND),
        ({URL + "_SECRET": "s"}, SECRET),
        ({URL: "", URL + "_SECRET": "s"}, PLAIN),  # present but empty still wins, as in Airflow
        ({URL + "_CMD": "", URL + "_SECRET": "s"}, COMMAND),
        ({}, None),
        ({"AIRFLOW__CELERY__BROKER_URL_X": "s"}, None),
    ],
)
def test_plain_then_command_then_secret(present, kind):
    form = option_form(present, "celery", "broker_url")
    assert (form.kind if form else None) == kind
    if form:
        assert form.text == present[form.variable]


def test_indirect_forms_count_only_for_sensitive_options():
    env = {"AIRFLOW__CORE__EXECUTOR_CMD": "echo x", "AIRFLOW__CORE__EXECUTOR_SECRET": "k"}
    assert option_form(env, "core", "executor") is None
    env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_SECRET": "sql_alchemy_conn"}
    assert option_form(env, "database", "sql_alchemy_conn").kind == SECRET
    # a dotted section name becomes `_` in the variable
    env = {"AIRFLOW__A_B__C": "v"}
    assert option_form(env, "a.b", "c").variable == "AIRFLOW__A_B__C"


def test_plain_values_expand_variables_from_the_env_file_like_airflow():
    env = {"HOST": "redis.internal", "PORT": "${P2}", "P2": "6380"}
    assert expand_vars("redis://$HOST:${PORT}/0", env) == "redis://redis.internal:6380/0"
    assert expand_vars("a$UNKNOWN${ALSO}", env) == "a$UNKNOWN${ALSO}"
    assert expand_vars("$LOOP", {"LOOP": "$LOOP"}) == "$LOOP"


# -- the Secrets Manager backend's config read (pure) -------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key, secret_id",
    [
        ({}, "broker_url", "airflow/config/broker_url"),  # the provider's default prefix
        ({"config_prefix": "airflow/prod/config"}, "broker_url", "airflow/prod/config/broker_url"),
        ({"config_prefix": "airflow/prod/config///"}, "k", "airflow/prod/config/k"),
        ({"config_prefix": ""}, "broker_url", "broker_url"),
        ({"config_prefix": None}, "broker_url", None),
        ({"config_prefix": "p", "sep": "-"}, "k", "p-k"),
        ({"config_prefix": "p--", "sep": "-"}, "k", "p-k"),
        ({"config_lookup_pattern": "^broker"}, "broker_url", "airflow/config/broker_url"),
        ({"config_lookup_pattern": "^BROKER"}, "broker_url", "airflow/config/broker_url"),
        ({"config_lookup_pattern": "^fernet"}, "broker_url", None),
        (
            {"sep": None, "connections_prefix": None, "variables_prefix": None},
            "k",
            "airflow/config/k",
        ),
    ],
)
def test_secret_id_as_the_provider_builds_it(kwargs, key, secret_id):
    assert secrets_manager_config(kwargs, "f").secret_id(key) == secret_id


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"endpoint_url": "http://evil"}, "endpoint_url"),
        ({"role_arn": "arn:aws:iam::1:role/x", "profile_name": "p"}, "profile_name, role_arn"),
        ({"aws_access_key_id": "AKIA"}, "aws_access_key_id"),
        ({"verify": False}, "verify"),
        ({"config_prefix": 3}, "config_prefix must be a string"),
        ({"config_lookup_pattern": "("}, "not a regular expression"),
    ],
)
def test_backend_kwargs_that_choose_where_or_as_whom_are_refused(kwargs, named):
    with pytest.raises(OptionError, match="backend_kwargs") as err:
        secrets_manager_config(kwargs, "the env file")
    assert named in str(err.value)


def lookups(values):
    seen = []

    def lookup(backend: SecretsManagerConfig, secret_id: str):
        seen.append((backend, secret_id))
        return values.get(secret_id)

    return lookup, seen


def test_secret_form_reads_the_prefixed_secret_in_the_backends_region():
    env = dict(BACKEND, **{URL + "_SECRET": "broker_url"})
    env["AIRFLOW__SECRETS__BACKEND_KWARGS"] = (
        '{"config_prefix": "airflow/prod/config", "connections_prefix": null, '
        '"variables_prefix": null, "region_name": "eu-west-1"}'
    )
    lookup, seen = lookups({"airflow/prod/config/broker_url": "redis://:s3cr3t-pw@r:6379/0"})
    got = AirflowOptions(env, "f", lookup_secret=lookup).get("celery", "broker_url")
    assert got.value == "redis://:s3cr3t-pw@r:6379/0"
    assert "airflow/prod/config/broker_url" in got.via and "s3cr3t" not in got.via
    assert [(b.region_name, i) for b, i in seen] == [
        ("eu-west-1", "airflow/prod/config/broker_url")
    ]
    # the value is a secret: the log scrubber hides it from now on
    assert "s3cr3t-pw" not in scrub("connected to redis://:s3cr3t-pw@r:6379/0")


def test_per_key_backend_kwargs_win_over_the_json_as_in_airflow():
    env = dict(BACKEND, **{URL + "_SECRET": "broker_url"})
    env["AIRFLOW__SECRETS__BACKEND_KWARG__CONFIG_PREFIX"] = "other/config"
    lookup, seen = lookups({"other/config/broker_url": "redis://h/0"})
    assert AirflowOptions(env, "f", lookup_secret=lookup).get("celery", "broker_url")
    assert seen[0][1] == "other/config/broker_url"


def test_backend_kwargs_that_are_not_json_mean_the_defaults_as_in_airflow(caplog):
    env = dict(BACKEND, **{URL + "_SECRET": "broker_url"})
    env["AIRFLOW__SECRETS__BACKEND_KWARGS"] = "{not json"
    lookup, seen = lookups({"airflow/config/broker_url": "redis://h/0"})
    with caplog.at_level(logging.WARNING):
        assert AirflowOptions(env, "f", lookup_secret=lookup).get("celery", "broker_url")
    assert seen[0][1] == "airflow/config/broker_url"
    assert "not a JSON object" in caplog.text


def test_backend_kwargs_may_come_from_a_command_but_not_from_the_backend():
    env = dict(BACKEND, **{URL + "_SECRET": "broker_url"})
    del env["AIRFLOW__SECRETS__BACKEND_KWARGS"]
    env["AIRFLOW__SECRETS__BACKEND_KWARGS_CMD"] = "print-kwargs"
    lookup, seen = lookups({"cmd/broker_url": "redis://h/0"})

    def run(variable, command):
        assert (variable, command) == ("AIRFLOW__SECRETS__BACKEND_KWARGS_CMD", "print-kwargs")
        return '{"config_prefix": "cmd"}\n'

    opts = AirflowOptions(env, "f", run_command=run, lookup_secret=lookup)
    assert opts.get("celery", "broker_url").value == "redis://h/0"
    env["AIRFLOW__SECRETS__BACKEND_KWARGS_SECRET"] = "kw"
    del env["AIRFLOW__SECRETS__BACKEND_KWARGS_CMD"]
    with pytest.raises(OptionError, match="through the backend itself"):
        AirflowOptions(env, "f", lookup_secret=lookup).get("celery", "broker_url")


@pytest.mark.parametrize(
    "backend, why",
    [
        ("airflow.providers.hashicorp.secrets.vault.VaultBackend", "'airflow.providers.hashicorp"),
        ("os.system('x')", "<not a class path>"),
        ("", "no secrets backend"),
    ],
)
def test_other_or_no_backend_is_a_clear_error(backend, why):
    env = {URL + "_SECRET": "broker_url", "AIRFLOW__SECRETS__BACKEND": backend}
    lookup, seen = lookups({})
    with pytest.raises(OptionError) as err:
        AirflowOptions(env, "/etc/sysconfig/airflow.env", lookup_secret=lookup).get(
            "celery", "broker_url"
        )
    assert why in str(err.value) and seen == []


def test_a_missing_secret_names_the_secret_id():
    env = dict(BACKEND, **{URL + "_SECRET": "broker_url"})
    lookup, _ = lookups({})
    with pytest.raises(OptionError, match="no secret string 'airflow/prod/config/broker_url'"):
        AirflowOptions(env, "f", lookup_secret=lookup).get("celery", "broker_url")


# -- the broker settings through the forms -----------------------------------------------------


def test_broker_settings_take_the_secret_form_and_transport_options():
    env = dict(BACKEND, **{URL + "_SECRET": "broker_url"})
    env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"] = "21600"
    env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__SENTINEL_KWARGS_CMD"] = "kw"
    lookup, _ = lookups({"airflow/prod/config/broker_url": "rediss://:pw@h:6379/0\n"})
    opts = AirflowOptions(
        env, "f", run_command=lambda v, c: '{"password": "x"}', lookup_secret=lookup
    )
    s = broker_settings(env, "f", options=opts)
    assert s.url == "rediss://:pw@h:6379/0"
    assert s.transport_options == {
        "visibility_timeout": 21600,
        "sentinel_kwargs": '{"password": "x"}',
    }


def test_broker_settings_refuse_a_command_for_an_option_that_takes_none():
    env = {URL: "redis://h/0", "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__SOCKET_TIMEOUT_CMD": "x"}
    with pytest.raises(ControlError, match="takes no command"):
        broker_settings(env, "f", options=AirflowOptions(env, "f", run_command=lambda v, c: "1"))


def test_broker_settings_name_an_empty_or_missing_url():
    with pytest.raises(ControlError, match="gives an empty URL"):
        broker_settings({URL: "  "})
    with pytest.raises(ControlError, match="has no AIRFLOW__CELERY__BROKER_URL"):
        broker_settings({URL + "_CMD_X": "x"})


def test_without_a_runner_the_command_form_is_refused_by_name():
    with pytest.raises(ControlError, match="sets AIRFLOW__CELERY__BROKER_URL_CMD"):
        broker_settings({URL + "_CMD": "cat /root/broker"})


# -- the _CMD runner: a real process, never root ------------------------------------------------


def unprivileged() -> str:
    for name in ("nobody", "daemon"):
        try:
            if pwd.getpwnam(name).pw_uid != 0:
                return name
        except KeyError:
            continue
    pytest.skip("no unprivileged user on this machine")


def _cfg(**airflow_config):
    return config_from_dict({"airflow_config": airflow_config})


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_command_runs_as_the_configured_user_with_the_env_file(tmp_path):
    user = unprivileged()
    run = command_runner(_cfg(command_user=user), {"GREETING": "hi", URL + "_CMD": "x"})
    out = run(URL + "_CMD", "sh -c 'echo $(id -u) $GREETING $USER; umask'")
    uid, greeting, name, umask = out.split()
    assert (int(uid), greeting, name) == (pwd.getpwnam(user).pw_uid, "hi", user)
    assert umask == "0077"
    # Airflow keeps the output verbatim (newline included); the broker layer strips it
    assert out.endswith("\n")
    # root's private file stays private
    private = tmp_path / "root-only"
    private.write_text("root secret")
    private.chmod(0o600)
    with pytest.raises(OptionError, match="failed"):
        run(URL + "_CMD", f"cat {private}")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_failing_command_never_quotes_its_output():
    run = command_runner(_cfg(command_user=unprivileged()), {})
    with pytest.raises(OptionError) as err:
        run(URL + "_CMD", "sh -c 'echo redis://:leaked@h/0; exit 3'")
    assert "exit status 3" in str(err.value) and "leaked" not in str(err.value)
    with pytest.raises(OptionError, match="cannot be split"):
        run(URL + "_CMD", "echo 'unbalanced")


def test_no_command_user_means_no_runner_and_root_is_refused():
    assert command_runner(_cfg(command_user=None), {}) is None
    for user in ("root", "0"):
        with pytest.raises(ConfigError, match="airflow_config.command_user"):
            _cfg(command_user=user)
    with pytest.raises(ConfigError, match="airflow_config.command_timeout"):
        _cfg(command_timeout=0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs an alias of uid 0 in a private passwd")
def test_another_name_for_uid_0_is_refused_at_run_time(tmp_path, monkeypatch):
    alias = pwd.struct_passwd(("toor", "x", 0, 0, "", "/root", "/bin/sh"))
    real = pwd.getpwnam
    monkeypatch.setattr(pwd, "getpwnam", lambda n: alias if n == "toor" else real(n))
    marker = tmp_path / "ran"
    run = command_runner(_cfg(command_user="toor"), {})
    with pytest.raises(OptionError, match="never runs as root"):
        run(URL + "_CMD", f"touch {marker}")
    assert not Path(marker).exists()


def test_the_scrubber_gets_a_urls_password_not_a_url_without_one():
    assert secret_parts("sqs://") == []
    assert secret_parts("redis://redis.internal:6379/0") == []
    assert secret_parts("redis://:p%40ss@h:6379/0;redis://u:two@h2/0") == [
        "redis://:p%40ss@h:6379/0",
        "p%40ss",
        "p@ss",
        "redis://u:two@h2/0",
        "two",
        "two",
    ]
    assert secret_parts("a-fernet-key=") == ["a-fernet-key="]
    # resolving a sensitive option without credentials leaves log lines that name it readable
    AirflowOptions({URL: "sqs://"}).get("celery", "broker_url")
    assert scrub("broker sqs:// has no Celery remote control") == (
        "broker sqs:// has no Celery remote control"
    )


def test_without_region_name_the_backend_uses_the_env_files_default_region():
    env = dict(BACKEND, **{URL + "_SECRET": "broker_url", "AWS_DEFAULT_REGION": "eu-north-1"})
    lookup, seen = lookups({"airflow/prod/config/broker_url": "redis://h/0"})
    AirflowOptions(env, "f", lookup_secret=lookup).get("celery", "broker_url")
    assert seen[0][0].region_name == "eu-north-1"
    env["AIRFLOW__SECRETS__BACKEND_KWARG__REGION_NAME"] = "ap-south-1"  # region_name wins
    lookup, seen = lookups({"airflow/prod/config/broker_url": "redis://h/0"})
    AirflowOptions(env, "f", lookup_secret=lookup).get("celery", "broker_url")
    assert seen[0][0].region_name == "ap-south-1"
