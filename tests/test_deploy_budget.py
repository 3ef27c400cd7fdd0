"""The ApplicationStop budget: a worker's drain fits the time CodeDeploy gives the hook.

Two places hold the numbers: the shipped appspec + the template's DrainTimeout bounds + the
config defaults (checked here, at build time), and a running instance's agent.yaml against the
appspec of the revision whose ApplicationStop runs (checked by the hook before it drains).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import DrainConfig, config_from_dict
from agent.errors import ConfigError
from agent.jobs.deploy import budget as deploy_budget
from agent.jobs.deploy.hook import DeployHook
from sandbox.cfn_template import load_template

REPO = Path(__file__).resolve().parents[1]
APPSPEC = REPO / "codedeploy" / "appspec.yml"
HOOKS = REPO / "codedeploy" / "hooks"


def appspec_with_stop_timeout(path: Path, timeout) -> Path:
    doc = yaml.safe_load(APPSPEC.read_text())
    doc["hooks"]["ApplicationStop"][0]["timeout"] = timeout
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_templates_largest_drain_fits_the_shipped_appspec():
    template = load_template(REPO / "cloudformation" / "airflow-cluster.yaml")
    param = template["Parameters"]["DrainTimeout"]
    limit = deploy_budget.hook_timeout(APPSPEC.read_text(), "ApplicationStop")
    defaults = DrainConfig()
    assert limit <= deploy_budget.CODEDEPLOY_MAX_TIMEOUT
    for drain_timeout in (param["MaxValue"], param["Default"], defaults.timeout):
        assert deploy_budget.over_budget(drain_timeout, defaults.stop_timeout, limit) is None, (
            drain_timeout
        )
    assert float(param["Default"]) == defaults.timeout
    # and the bound is tight enough to mean something: one more second would not fit
    spare = limit - deploy_budget.stop_budget(param["MaxValue"], defaults.stop_timeout)
    assert 0 <= spare < 200


def test_the_numbers_before_this_check_did_not_fit():
    # DrainTimeout up to 3200, stop_timeout 120, ApplicationStop 3300: the check says why
    why = deploy_budget.over_budget(3200, 120, 3300)
    assert why == (
        "drain.timeout 3200s + drain.stop_timeout 120s + 60s to start = 3380s exceeds "
        "ApplicationStop's 3300s: lower drain.timeout to at most 3120s"
    )
    assert deploy_budget.over_budget(3120, 120, 3300) is None


def test_hook_timeout_sums_scripts_caps_each_and_names_bad_input():
    two = "hooks:\n  ApplicationStop:\n    - {location: a, timeout: 100}\n    - {location: b}\n"
    assert deploy_budget.hook_timeout(two, "ApplicationStop") == 100 + 3600
    big = "hooks:\n  ApplicationStop:\n    - {location: a, timeout: 9000}\n"
    assert deploy_budget.hook_timeout(big, "ApplicationStop") == 3600
    for text, message in [
        ("hooks: {}\n", "x.yml: no hooks.ApplicationStop scripts"),
        ("[", "x.yml: not YAML"),
        ("hooks:\n  ApplicationStop:\n    - {timeout: soon}\n", "timeout is not a number"),
        ("hooks:\n  ApplicationStop:\n    - {timeout: 0}\n", "timeout must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            deploy_budget.hook_timeout(text, "ApplicationStop", "x.yml")


def worker_config(tmp_path, drain_timeout: float):
    return config_from_dict(
        {
            "cluster": "test",
            "state_dir": str(tmp_path / "state"),
            "airflow_home": str(tmp_path / "airflow"),
            "role": {"override": "worker"},
            "drain": {"timeout": drain_timeout},
        }
    )


def test_application_stop_refuses_a_drain_longer_than_the_appspec_allows(tmp_path):
    appspec = appspec_with_stop_timeout(tmp_path / "appspec.yml", 3300)
    cfg = worker_config(tmp_path, 3200)
    hook = DeployHook(cfg, "worker", "ApplicationStop", appspec=str(appspec))
    with pytest.raises(ConfigError) as err:
        hook.run()  # refused before the drain touches anything: no state written
    assert str(err.value).startswith("drain not started: drain.timeout 3200s + ")
    assert str(appspec) in str(err.value)
    assert not (tmp_path / "state").exists()
    # a drain that fits passes the check (the drain itself is tests/test_drain*.py)
    fits = DeployHook(
        worker_config(tmp_path, 3100), "worker", "ApplicationStop", appspec=str(appspec)
    )
    fits.check_stop_budget()
    missing = DeployHook(cfg, "worker", "ApplicationStop", appspec=str(tmp_path / "nope.yml"))
    with pytest.raises(ConfigError, match="--appspec .*nope.yml: No such file"):
        missing.check_stop_budget()


def test_the_cli_refuses_with_exit_2_and_one_line(tmp_path):
    appspec = appspec_with_stop_timeout(tmp_path / "appspec.yml", 600)
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cluster": "test",
                "state_dir": str(tmp_path / "state"),
                "airflow_home": str(tmp_path / "airflow"),
                "role": {"override": "worker"},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), "deploy-hook"]
        + ["ApplicationStop", "--appspec", str(appspec)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR agent: drain not started: drain.timeout 3000s + ")
    assert "exceeds ApplicationStop's 600s: lower drain.timeout to at most 420s" in last


def test_every_hook_script_passes_its_own_revisions_appspec():
    # CodeDeploy runs <archive>/hooks/<script>; the appspec whose timeouts apply is beside it
    scripts = sorted(HOOKS.glob("*.sh"))
    assert len(scripts) == 5
    for script in scripts:
        text = script.read_text()
        assert '--appspec "$(dirname "$0")/../appspec.yml" </dev/null 2>&1' in text, script


def test_without_appspec_the_last_successful_revisions_appspec_is_used(tmp_path):
    # CodeDeploy's own record of the revision whose ApplicationStop runs (older hook scripts)
    root = tmp_path / "deployment-root"
    archive = root / "dg-1" / "d-OLD" / "deployment-archive"
    archive.mkdir(parents=True)
    appspec_with_stop_timeout(archive / "appspec.yml", 900)
    (root / "deployment-instructions").mkdir()
    record = root / "deployment-instructions" / "dg-1_last_successful_install"
    record.write_text(str(root / "dg-1" / "d-OLD") + "\n")
    env = {"DEPLOYMENT_GROUP_ID": "dg-1", "DEPLOYMENT_ID": "d-NEW"}
    found = deploy_budget.find_stop_appspec(env, str(root))
    assert found == str(archive / "appspec.yml")
    with pytest.raises(ConfigError, match="exceeds ApplicationStop's 900s"):
        deploy_budget.check_appspec(worker_config(tmp_path, 3000), found)
    # unknown: no group id, an odd one, no record, a record pointing nowhere
    assert deploy_budget.find_stop_appspec({}, str(root)) is None
    assert deploy_budget.find_stop_appspec({"DEPLOYMENT_GROUP_ID": "../x"}, str(root)) is None
    assert deploy_budget.find_stop_appspec({"DEPLOYMENT_GROUP_ID": "dg-2"}, str(root)) is None
    record.write_text(str(tmp_path / "gone"))
    assert deploy_budget.find_stop_appspec(env, str(root)) is None


def test_a_manual_application_stop_without_any_appspec_says_the_budget_is_unchecked(
    tmp_path, caplog
):
    hook = DeployHook(worker_config(tmp_path, 3500), "worker", "ApplicationStop", environ={})
    with caplog.at_level("WARNING"):
        hook.check_stop_budget()
    assert "ApplicationStop budget not checked: no --appspec" in caplog.text
