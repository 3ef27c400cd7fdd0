"""Name mapping and the checks a new env file must pass (pure functions)."""

import pytest

from agent.errors import RefusedError
from agent.jobs.env_sync.plan import (
    MappingError,
    Parameter,
    map_parameters,
    plan_env,
    refused_variable,
    variable_name,
)
from agent.platform.envfile import parse_env

PATH = "/airflow/prod/"


def P(name, value="v", type_="String"):
    return Parameter(name, value, type_)


def test_section_key_and_env_mapping():
    mapped = map_parameters(
        [
            P("/airflow/prod/core/parallelism"),
            P("/airflow/prod/celery-broker/transport.options"),
            P("/airflow/prod/env/MyVar_1"),
            P("/airflow/prod/Database/SQL_Alchemy_Conn"),
        ],
        [PATH],
    )
    assert sorted(mapped) == [
        "AIRFLOW__CELERY_BROKER__TRANSPORT_OPTIONS",
        "AIRFLOW__CORE__PARALLELISM",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "MyVar_1",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "/airflow/prod/toplevel",
        "/airflow/prod/a/b/c",
        "/airflow/prod/env/1BAD",
        "/airflow/prod/env/has-dash",
        "/airflow/prod/core/bad key",
        "/elsewhere/core/x",
    ],
)
def test_invalid_names_are_refused_naming_the_parameter(name):
    with pytest.raises(MappingError) as err:
        map_parameters([P("/airflow/prod/core/ok"), P(name)], [PATH])
    assert name in str(err.value)
    assert "/airflow/prod/core/ok" not in str(err.value)


def test_collisions_name_both_parameters_and_all_problems_are_reported_at_once():
    with pytest.raises(MappingError) as err:
        map_parameters(
            [
                P("/airflow/prod/core/dags-folder"),
                P("/airflow/prod/core/dags_folder"),
                P("/airflow/prod/env/AIRFLOW__CORE__DAGS_FOLDER"),
                P("/airflow/prod/nope"),
            ],
            [PATH],
        )
    msg = str(err.value)
    for name in ("core/dags-folder", "core/dags_folder", "env/AIRFLOW__CORE__DAGS_FOLDER", "nope"):
        assert name in msg


def test_collision_across_two_paths():
    with pytest.raises(MappingError, match="/a/core/x and /b/core/x"):
        map_parameters([P("/a/core/x"), P("/b/core/x")], ["/a/", "/b/"])


def test_variable_name_uses_the_matching_path():
    assert variable_name("/a/b/env/X", "/a/b/") == ("X", None)


def test_static_merge_ssm_wins():
    mapped = map_parameters([P("/airflow/prod/env/AIRFLOW_HOME", "/srv/af")], [PATH])
    plan = plan_env(mapped, {"AIRFLOW_HOME": "/airflow", "TZ": "UTC"}, [], 0.2, None)
    assert plan.variables == {"AIRFLOW_HOME": "/srv/af", "TZ": "UTC"}
    assert parse_env(plan.content) == plan.variables


def test_empty_result_is_refused():
    with pytest.raises(RefusedError, match="no parameters"):
        plan_env({}, {"A": "1"}, [], 0.2, None)


def test_required_missing_is_refused_naming_it():
    mapped = map_parameters([P("/airflow/prod/core/x")], [PATH])
    with pytest.raises(RefusedError, match="AIRFLOW__CORE__FERNET_KEY"):
        plan_env(mapped, {}, ["AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__CORE__X"], 0.2, None)


def test_drop_limit_and_allow_drop():
    old = plan_env(
        map_parameters([P(f"/airflow/prod/s/k{i}") for i in range(10)], [PATH]), {}, [], 0.2, None
    ).content
    keep8 = map_parameters([P(f"/airflow/prod/s/k{i}") for i in range(8)], [PATH])
    assert plan_env(keep8, {}, [], 0.2, old).removed == ["AIRFLOW__S__K8", "AIRFLOW__S__K9"]
    keep7 = map_parameters([P(f"/airflow/prod/s/k{i}") for i in range(7)], [PATH])
    with pytest.raises(RefusedError, match="drop 3 of 10"):
        plan_env(keep7, {}, [], 0.2, old)
    assert len(plan_env(keep7, {}, [], 0.2, old, allow_drop=True).removed) == 3


def test_unencodable_value_names_the_parameter():
    mapped = map_parameters([P("/airflow/prod/core/bad", "a\ufffeb")], [PATH])
    with pytest.raises(RefusedError, match="/airflow/prod/core/bad"):
        plan_env(mapped, {}, [], 0.2, None)


def test_diff_names_changes_without_values():
    old = plan_env(
        map_parameters([P("/airflow/prod/s/a", "1"), P("/airflow/prod/s/b", "2")], [PATH]),
        {},
        [],
        1,
        None,
    )
    new = plan_env(
        map_parameters([P("/airflow/prod/s/a", "9"), P("/airflow/prod/s/c", "3")], [PATH]),
        {},
        [],
        1,
        old.content,
    )
    assert (new.added, new.removed, new.changed) == (
        ["AIRFLOW__S__C"],
        ["AIRFLOW__S__B"],
        ["AIRFLOW__S__A"],
    )


# -- exact messages and edges (each kills a mutant `make mutate` found surviving) -------------


def test_variable_name_messages_and_dots_in_sections():
    assert variable_name("/p/celery.broker/visibility.timeout", "/p/") == (
        "AIRFLOW__CELERY_BROKER__VISIBILITY_TIMEOUT",
        None,
    )
    assert variable_name("/p/a/b/c", "/p/") == (
        None,
        "is not <path>/<section>/<key> or <path>/env/<NAME>",
    )
    assert variable_name("/p/env/1X", "/p/") == (
        None,
        "is not a valid environment variable name after env/",
    )
    assert variable_name("/p/core/a b", "/p/") == (
        None,
        "has characters other than letters, digits, '_', '-', '.'",
    )


def test_every_bad_parameter_is_named_in_one_message_in_name_order():
    params = [
        P("/airflow/prod/core/x"),
        P("/airflow/prod/a"),  # sorts first: not <section>/<key>
        P("/aaa/core/y"),  # under no path, sorts before everything
        P("/airflow/prod/core/y-1"),
        P("/airflow/prod/core/y_1"),
        P("/airflow/prod/env/9"),
    ]
    with pytest.raises(MappingError) as err:
        map_parameters(params, [PATH])
    assert str(err.value) == (
        "parameters refused: /aaa/core/y is under none of the configured paths; "
        "/airflow/prod/a is not <path>/<section>/<key> or <path>/env/<NAME>; "
        "/airflow/prod/env/9 is not a valid environment variable name after env/; "
        "/airflow/prod/core/y-1 and /airflow/prod/core/y_1 all map to AIRFLOW__CORE__Y_1"
    )


def test_refusal_messages_are_exact():
    with pytest.raises(RefusedError) as err:
        plan_env({}, {}, [], 0.2, None)
    assert str(err.value) == "SSM returned no parameters under the configured paths"
    mapped = map_parameters([P("/airflow/prod/core/x")], [PATH])
    with pytest.raises(RefusedError) as err:
        plan_env(mapped, {}, ["Z_VAR", "A_VAR", "AIRFLOW__CORE__X"], 0.2, None)
    assert str(err.value) == "required variables missing: A_VAR, Z_VAR"


def test_unencodable_values_name_their_origin_ssm_or_static():
    mapped = map_parameters(
        [P("/airflow/prod/core/bad", "a\x00"), P("/airflow/prod/env/OK", "fine")], [PATH]
    )
    with pytest.raises(RefusedError) as err:
        plan_env(mapped, {"TZ": "x\ufffe"}, [], 0.2, None)
    assert str(err.value) == (
        "values systemd cannot carry: "
        "/airflow/prod/core/bad (AIRFLOW__CORE__BAD) contains a NUL character; "
        "env.static TZ (TZ) contains the Unicode noncharacter U+FFFE, which systemd rejects"
    )


def test_written_file_carries_the_header():
    mapped = map_parameters([P("/airflow/prod/core/x", "1")], [PATH])
    content = plan_env(mapped, {}, [], 0.2, None).content
    assert content == (
        b"# Written by airflow-agent env sync from SSM Parameter Store. Do not edit:\n"
        b"# the next sync replaces this file.\n"
        b'AIRFLOW__CORE__X="1"\n'
    )


def _params(n):
    return map_parameters([P(f"/airflow/prod/s/k{i:02}") for i in range(n)], [PATH])


def test_drop_refusal_message_is_exact_and_lists_at_most_ten():
    old = plan_env(_params(12), {}, [], 1.0, None).content
    with pytest.raises(RefusedError) as err:
        plan_env(_params(1), {}, [], 0.5, old)
    names = ", ".join(f"AIRFLOW__S__K{i:02}" for i in range(1, 11))
    assert str(err.value) == (
        f"sync would drop 11 of 12 variables (92% > env.max_drop_fraction 50%): {names} ..."
        "; rerun with --allow-drop if this is intended"
    )
    # exactly ten dropped: all named, no ellipsis
    old = plan_env(_params(11), {}, [], 1.0, None).content
    with pytest.raises(RefusedError) as err:
        plan_env(_params(1), {}, [], 0.5, old)
    assert str(err.value).endswith(f"50%): {names}; rerun with --allow-drop if this is intended")


# -- variables the env file never sets (docs/design.md: "Variables the env file never sets") --

LOADS_CODE = "changes how processes load code"
REACHES_AWS = "changes how processes reach AWS (credentials, endpoints, config)"
REACHES_NETWORK = "changes how processes reach the network (proxy, TLS trust)"

# the contract, spelled out (not read back from the module, so a changed list fails here)
REFUSED_EXACT = {
    **dict.fromkeys(
        [
            "PATH",
            "HOME",
            "XDG_CONFIG_HOME",
            "BASH_ENV",
            "ENV",
            "SHELLOPTS",
            "BASHOPTS",
            "PS4",
            "IFS",
            "PERL5LIB",
            "PERLLIB",
            "PERL5OPT",
            "RUBYLIB",
            "RUBYOPT",
            "NODE_OPTIONS",
            "NODE_PATH",
            "JAVA_TOOL_OPTIONS",
            "_JAVA_OPTIONS",
            "JDK_JAVA_OPTIONS",
            "CLASSPATH",
            "GCONV_PATH",
            "GLIBC_TUNABLES",
            "OPENSSL_CONF",
            "OPENSSL_ENGINES",
            "OPENSSL_MODULES",
        ],
        LOADS_CODE,
    ),
    **dict.fromkeys(
        [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
            "FTP_PROXY",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "SSLKEYLOGFILE",
        ],
        REACHES_NETWORK,
    ),
}
REFUSED_PREFIXED = {
    "LD_PRELOAD": ("LD_", LOADS_CODE),
    "LD_LIBRARY_PATH": ("LD_", LOADS_CODE),
    "PYTHONPATH": ("PYTHON", LOADS_CODE),
    "PYTHONSTARTUP": ("PYTHON", LOADS_CODE),
    "PYTHONHOME": ("PYTHON", LOADS_CODE),
    "PYTHONWARNINGS": ("PYTHON", LOADS_CODE),
    "BASH_FUNC_x": ("BASH_FUNC_", LOADS_CODE),
    "GIT_SSH_COMMAND": ("GIT_", LOADS_CODE),
    "GIT_CONFIG_COUNT": ("GIT_", LOADS_CODE),
    "PIP_INDEX_URL": ("PIP_", LOADS_CODE),
    "UV_INDEX_URL": ("UV_", LOADS_CODE),
    "AWS_ACCESS_KEY_ID": ("AWS_", REACHES_AWS),
    "AWS_SECRET_ACCESS_KEY": ("AWS_", REACHES_AWS),
    "AWS_SESSION_TOKEN": ("AWS_", REACHES_AWS),
    "AWS_ENDPOINT_URL": ("AWS_", REACHES_AWS),
    "AWS_ENDPOINT_URL_SSM": ("AWS_", REACHES_AWS),
    "AWS_EC2_METADATA_SERVICE_ENDPOINT": ("AWS_", REACHES_AWS),
    "AWS_EC2_METADATA_DISABLED": ("AWS_", REACHES_AWS),
    "AWS_CONFIG_FILE": ("AWS_", REACHES_AWS),
    "AWS_SHARED_CREDENTIALS_FILE": ("AWS_", REACHES_AWS),
    "AWS_PROFILE": ("AWS_", REACHES_AWS),
    "AWS_CA_BUNDLE": ("AWS_", REACHES_AWS),
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": ("AWS_", REACHES_AWS),
    "AIRFLOW_AGENT_CONFIG": ("AIRFLOW_AGENT_", "configures the root agent itself"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_EXACT))
def test_refused_names_say_why(name):
    assert refused_variable(name) == f"{name}, which {REFUSED_EXACT[name]}"
    # any case: several consumers read the lower-case forms (http_proxy)
    assert refused_variable(name.lower()) == f"{name.lower()}, which {REFUSED_EXACT[name]}"


@pytest.mark.parametrize("name", sorted(REFUSED_PREFIXED))
def test_refused_prefixes_name_the_rule(name):
    prefix, why = REFUSED_PREFIXED[name]
    assert refused_variable(name) == f"{name} ({prefix}*), which {why}"
    assert refused_variable(name.lower()) == f"{name.lower()} ({prefix}*), which {why}"


@pytest.mark.parametrize(
    "name",
    [
        "AWS_REGION",  # Airflow's AWS clients need a region and cannot ask IMDS
        "AWS_DEFAULT_REGION",
        "aws_default_region",
        "TZ",
        "AIRFLOW_HOME",
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW_CONN_AWS_DEFAULT",
        "MY_PYTHONPATH",  # prefixes match at the start only
        "XLD_PRELOAD",
        "LD",
        "AWS",
        "PYTHO",
        "PATHS",  # exact names match exactly
        "ENVIRONMENT",
        "HOMEDIR",
        "NODE_ENV",
    ],
)
def test_allowed_names(name):
    assert refused_variable(name) is None


def test_refused_parameters_are_all_named_at_once_with_other_problems():
    params = [
        P("/airflow/prod/core/x"),
        P("/airflow/prod/env/TZ"),
        P("/airflow/prod/env/AWS_DEFAULT_REGION"),
        P("/airflow/prod/env/LD_PRELOAD"),
        P("/airflow/prod/env/PYTHONPATH"),
        P("/airflow/prod/env/AWS_ACCESS_KEY_ID"),
        P("/airflow/prod/env/AIRFLOW_AGENT_CONFIG"),
        P("/airflow/prod/env/https_proxy"),
        P("/airflow/prod/env/bad-name"),
    ]
    with pytest.raises(MappingError) as err:
        map_parameters(params, [PATH])
    assert str(err.value) == (
        "parameters refused: "
        "/airflow/prod/env/AIRFLOW_AGENT_CONFIG sets AIRFLOW_AGENT_CONFIG (AIRFLOW_AGENT_*), "
        "which configures the root agent itself; "
        "/airflow/prod/env/AWS_ACCESS_KEY_ID sets AWS_ACCESS_KEY_ID (AWS_*), which "
        + REACHES_AWS
        + "; /airflow/prod/env/LD_PRELOAD sets LD_PRELOAD (LD_*), which "
        + LOADS_CODE
        + "; /airflow/prod/env/PYTHONPATH sets PYTHONPATH (PYTHON*), which "
        + LOADS_CODE
        + "; /airflow/prod/env/bad-name is not a valid environment variable name after env/"
        "; /airflow/prod/env/https_proxy sets https_proxy, which " + REACHES_NETWORK
    )


def test_a_refused_parameter_takes_no_part_in_collisions():
    # env/LD_PRELOAD is refused; it must not also be reported as colliding with ld_preload
    with pytest.raises(MappingError) as err:
        map_parameters([P("/a/env/LD_PRELOAD"), P("/b/env/LD_PRELOAD")], ["/a/", "/b/"])
    assert "map to" not in str(err.value) and str(err.value).count("sets LD_PRELOAD") == 2


def test_allowed_env_parameters_map():
    mapped = map_parameters(
        [P("/airflow/prod/env/AWS_DEFAULT_REGION", "eu-west-1"), P("/airflow/prod/env/TZ")],
        [PATH],
    )
    assert sorted(mapped) == ["AWS_DEFAULT_REGION", "TZ"]


def test_a_fernet_key_list_and_the_secrets_revision_pass_through_unchanged():
    """Airflow's rotation list `new,old` (given directly as [core] fernet_key; the template
    names a secret instead) and the template's static AIRFLOW_SECRETS_REVISION: a comma needs
    no escaping in the env file, and systemd's parser (modelled) gives the value back as is."""
    keys = (
        "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg=,q6Jt1bS0m8pYQ0ufm3oO9E2mQk4q3d8Xv7c2Zr1yW5A="
    )
    mapped = map_parameters([P(PATH + "core/fernet_key", keys, "SecureString")], [PATH])
    plan = plan_env(mapped, {"AIRFLOW_SECRETS_REVISION": "2"}, [], 0.2, None)
    env = parse_env(plan.content)
    assert env["AIRFLOW__CORE__FERNET_KEY"] == keys
    assert env["AIRFLOW_SECRETS_REVISION"] == "2"
    assert refused_variable("AIRFLOW_SECRETS_REVISION") is None
