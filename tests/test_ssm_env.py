"""Name mapping and the checks a new env file must pass (pure functions)."""

import pytest

from agent.errors import RefusedError
from agent.jobs.env_sync.plan import (
    MappingError,
    Parameter,
    map_parameters,
    plan_env,
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
