"""agent.jobs.deploy.content: what a deployment changed, by category, read safely as root; and
how agent.jobs.deploy.units records what it then did to the units."""

from __future__ import annotations

import os

from agent.jobs.deploy.content import (
    RESTART_CATEGORIES,
    categorize,
    changed_categories,
    describe_changes,
    empty_hash,
    tree_hashes,
)
from agent.jobs.deploy.units import describe_action


def test_categories_of_paths():
    assert categorize("dags/a.py") == "dags"
    assert categorize("dags/sub/.airflowignore") == "dags"
    assert categorize("plugins/p.py") == "plugins"
    assert categorize("plugins/__pycache__/p.cpython-311.pyc") is None
    assert categorize("dags/x.pyc") is None
    assert categorize("airflow.cfg") == "config"
    assert categorize("webserver_config.py") == "config"
    assert categorize("config/airflow_local_settings.py") == "config"
    assert categorize("requirements.txt") == "requirements"
    assert categorize("constraints-3.11.txt") == "requirements"
    for ignored in ("appspec.yml", "hooks/after_install.sh", "logs/x.log", ".deployed-revision",
                    "include/q.sql", "dags", "plugins", "notes.txt"):  # fmt: skip
        assert categorize(ignored) is None, ignored


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_dag_change_changes_only_the_dags_hash(tmp_path):
    home = tmp_path / "airflow"
    _write(home, "dags/a.py", "a")
    _write(home, "plugins/p.py", "p")
    _write(home, "airflow.cfg", "[core]\n")
    before = tree_hashes(home)
    _write(home, "dags/a.py", "a2")
    _write(home, "logs/dag_id=a/attempt=1.log", "noise")  # never hashed
    _write(home, "plugins/__pycache__/p.cpython-311.pyc", "bytecode")
    after = tree_hashes(home)
    assert [c for c in after if after[c] != before[c]] == ["dags"]
    assert changed_categories(before, after) == []
    assert describe_changes(before, after).startswith("dags ")


def test_plugins_config_and_requirements_changes_are_restart_categories(tmp_path):
    home = tmp_path / "airflow"
    _write(home, "dags/a.py", "a")
    before = tree_hashes(home)
    _write(home, "plugins/p.py", "p")
    assert changed_categories(before, tree_hashes(home)) == ["plugins"]
    _write(home, "config/airflow_local_settings.py", "x = 1")
    _write(home, "requirements.txt", "pendulum\n")
    assert changed_categories(before, tree_hashes(home)) == list(RESTART_CATEGORIES)
    # a renamed plugin file is a change even with the same content
    os.rename(home / "plugins/p.py", home / "plugins/q.py")
    moved = tree_hashes(home)
    _write(home, "plugins/q.py", "p")
    assert tree_hashes(home) == moved


def test_unknown_loaded_state_restarts_for_every_category_that_holds_files(tmp_path):
    home = tmp_path / "airflow"
    assert tree_hashes(home) == dict.fromkeys(tree_hashes(home), empty_hash())  # no home yet
    _write(home, "dags/a.py", "a")
    assert changed_categories(None, tree_hashes(home)) == []
    _write(home, "plugins/p.py", "p")
    assert changed_categories(None, tree_hashes(home)) == ["plugins"]


def test_a_symlink_counts_by_its_name_and_is_never_followed(tmp_path):
    home = tmp_path / "airflow"
    outside = tmp_path / "outside"
    _write(outside, "secret.py", "one")
    _write(home, "plugins/p.py", "p")
    os.symlink(outside / "secret.py", home / "plugins/link.py")
    os.symlink(outside, home / "plugins/linkdir")
    first = tree_hashes(home)
    _write(outside, "secret.py", "two")  # what the link points to changes: not read
    assert tree_hashes(home) == first
    os.unlink(home / "plugins/link.py")
    assert tree_hashes(home)["plugins"] != first["plugins"]


def test_the_deploy_records_last_action_names_only_what_happened():
    restarted = {"airflow-scheduler": ["plugins"], "airflow-dag-processor": ["plugins", "config"]}
    assert describe_action({}, 2, []) == "kept"
    assert describe_action({}, 0, ["airflow-scheduler"]) == "started airflow-scheduler"
    assert describe_action({}, 1, ["a", "b"]) == "kept; started a, b"
    assert describe_action(restarted, 1, ["c"]) == (
        "restarted airflow-scheduler: plugins; airflow-dag-processor: plugins, config; started c"
    )
    assert describe_action({}, 0, []) == ""
