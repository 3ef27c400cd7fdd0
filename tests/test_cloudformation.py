"""cloudformation/airflow-cluster.yaml: lint, the contract with the agent, IAM, and moto.

- Linters: cfn-lint clean (no errors, no warnings); every checkov failure is listed with a
  reason in cloudformation/README.md, and every listed one still fails (no stale excuses).
- Contract: one resource (InstanceConfig) carries the cfn-init metadata of all three roles; the
  agent.yaml each role's configSet leaves at /etc/airflow-agent/agent.yaml (a link to that
  role's file, which the `update` configSet rewrites) loads with the agent's own config loader
  and names that role's units (whose unit files exist in systemd/); its SSM path, secret id,
  group and lifecycle hook are the template's resources; the cfn-hup hook watches
  InstanceConfig's metadata and its script runs cfn-init's `update`, then env sync.
- Airflow: every `<option>_secret` parameter names an option Airflow resolves through the
  secrets backend (checked with the real Airflow config code), under the prefix whose secrets
  the template creates.
- IAM: every statement of the instance roles is in the allow-list of
  agent/platform/iam_actions.py and
  scoped to this stack's resources; that allow-list matches the AWS calls in agent/ code.
- moto: create_stack of the template, reduced to the resource types moto implements (listed
  below), reaches CREATE_COMPLETE; then the real `airflow-agent env sync` with the template's
  agent.yaml renders the stack's SSM parameters.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import boto3
import botocore.session
import pytest
import yaml

from agent.config import DEFAULT_UNITS, ROLES, config_from_dict, load_config
from agent.jobs.env_sync.plan import Parameter, map_parameters, plan_env
from agent.jobs.role import match_group
from agent.platform import iam_actions
from agent.platform.envfile import parse_env
from sandbox.cfn_init import (
    configset_commands,
    configset_configs,
    configset_files,
    is_symlink,
    write_files,
)
from sandbox.cfn_template import (
    Resolver,
    as_list,
    reduce_for_moto,
    statements,
)
from sandbox.proc import wait_for

REPO = Path(__file__).resolve().parents[1]
CFN_DIR = REPO / "cloudformation"
TEMPLATE_PATH = CFN_DIR / "airflow-cluster.yaml"
README_PATH = CFN_DIR / "README.md"
PARAMS_EXAMPLE_PATH = CFN_DIR / "parameters.example.json"
SYSTEMD_DIR = REPO / "systemd"
AIRFLOW_PYTHON = REPO / ".cache" / "airflow-venv" / "bin" / "python"

STACK = "airflow-test"
LOGICAL = {"scheduler": "Scheduler", "webserver": "Webserver", "worker": "Worker"}
# the one resource whose metadata holds AWS::CloudFormation::Init, for every role
INIT_RESOURCE = "InstanceConfig"
AGENT_YAML = "/etc/airflow-agent/agent.yaml"
TEST_PARAMS: Dict[str, Any] = {
    "VpcId": "vpc-0123456789abcdef0",
    "SubnetIds": ["subnet-0a", "subnet-0b"],
    "UiAllowedCidr": "10.20.0.0/16",
    "ArtifactBucket": "example-artifacts",
    "ImageId": "ami-0123456789abcdef0",
    "FernetKey": "x" * 43 + "=",
}

# Resource types moto 5.2's CloudFormation cannot create (it has no model for them, and would
# silently skip some): the moto test drops these from the template and says so.
EXPECTED_MOTO_SKIPPED_TYPES = {
    "AWS::AutoScaling::LifecycleHook",
    "AWS::AutoScaling::ScalingPolicy",
    # InstanceConfig: moto accepts it as a no-op and records neither it nor its metadata
    "AWS::CloudFormation::WaitConditionHandle",
    # moto's CloudFormation has no alarms; the sandbox creates them (sandbox/stack/aws_alarms.py)
    "AWS::CloudWatch::Alarm",
    "AWS::CodeDeploy::Application",
    "AWS::CodeDeploy::DeploymentGroup",
    "AWS::EC2::SecurityGroupEgress",
    "AWS::ElastiCache::ParameterGroup",
    "AWS::ElastiCache::ReplicationGroup",
    "AWS::ElastiCache::SubnetGroup",
    "AWS::S3::BucketPolicy",
    "AWS::SecretsManager::Secret",
    "AWS::SecretsManager::SecretTargetAttachment",
}


def resources_of_type(template, rtype: str) -> Dict[str, Any]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == rtype}


def init_of(template) -> Dict[str, Any]:
    return template["Resources"][INIT_RESOURCE]["Metadata"]["AWS::CloudFormation::Init"]


def init_file(template, resolver, configset: str, path: str) -> str:
    """Content of a regular file the configSet writes, resolved (exactly one config writes it)."""
    init = init_of(template)
    writers = [c for c in configset_configs(init, configset) if path in init[c].get("files", {})]
    assert len(writers) == 1, f"{configset}: {path} is written by configs {writers}"
    attribs = init[writers[0]]["files"][path]
    assert not is_symlink(attribs), f"{configset}: {path} is a link"
    return resolver.resolve(attribs["content"])


def agent_yaml_target(template, role: str) -> str:
    """The file the role's /etc/airflow-agent/agent.yaml links to."""
    _config, link = configset_files(init_of(template), role)[AGENT_YAML]
    assert is_symlink(link), f"{role}: {AGENT_YAML} is not a link to the role's file"
    return link["content"]


def agent_yaml(template, resolver, role: str) -> Dict[str, Any]:
    text = init_file(template, resolver, role, agent_yaml_target(template, role))
    return yaml.safe_load(text)


def ssm_parameter_names(template, resolver) -> List[str]:
    params = resources_of_type(template, "AWS::SSM::Parameter")
    return sorted(resolver.resolve(p["Properties"]["Name"]) for p in params.values())


# the second SSM path of each role: the database URL differs (workers have their own user)
ROLE_PATH_GROUP = {"scheduler": "services", "webserver": "services", "worker": "worker"}


def role_ssm_paths(role: str) -> List[str]:
    return [f"/airflow/{STACK}/", f"/airflow/{STACK}-{ROLE_PATH_GROUP[role]}/"]


def unit_file(name: str) -> Path:
    return SYSTEMD_DIR / (name if "." in name else name + ".service")


# -- linters --------------------------------------------------------------------------------------


def test_cfn_lint_reports_nothing():
    # cfn-lint of the venv running the tests (cfnlint has no __main__)
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    assert cfn_lint.exists(), f"cfn-lint is not installed beside {sys.executable}"
    proc = subprocess.run(
        [str(cfn_lint), str(TEMPLATE_PATH)], capture_output=True, text=True, timeout=300
    )
    # the exit code is a bitmask: 2 errors, 4 warnings, 8 informational
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _checkov() -> str:
    for candidate in (
        os.environ.get("CHECKOV"),
        str(REPO / ".cache/checkov-venv/bin/checkov"),
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(
        "checkov not found: `make` installs it into .cache/checkov-venv "
        "(or set CHECKOV=/path/to/checkov)"
    )


def accepted_checkov_findings() -> Set[Tuple[str, str]]:
    """(check id, logical id) rows of the README's table of accepted checkov findings."""
    text = README_PATH.read_text(encoding="utf-8")
    rows = re.findall(r"^\|\s*`?(CKV2?_AWS_\d+)`?\s*\|\s*`?(\w+)`?\s*\|", text, re.M)
    assert rows, "cloudformation/README.md has no table of accepted checkov findings"
    return set(rows)


@pytest.mark.slow  # runs checkov (~9 s): out of the fast tier, in `make test`
def test_checkov_failures_are_exactly_the_accepted_ones():
    proc = subprocess.run(
        [
            _checkov(),
            "-f",
            str(TEMPLATE_PATH),
            "--framework",
            "cloudformation",
            "--compact",
            "--quiet",
            "--skip-download",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(REPO),
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = {
        (f["check_id"], f["resource"].rsplit(".", 1)[-1])
        for r in reports
        for f in r.get("results", {}).get("failed_checks", [])
    }
    accepted = accepted_checkov_findings()
    assert failed - accepted == set(), "checkov failures not accepted in README (fix or explain)"
    assert accepted - failed == set(), "README accepts checkov findings that no longer fail"


# -- parameters -----------------------------------------------------------------------------------


def test_every_parameter_is_described_and_constrained(template):
    for name, spec in template["Parameters"].items():
        assert len(spec.get("Description", "")) > 20, f"{name}: no description"
        if spec["Type"] == "String":
            assert "AllowedPattern" in spec or "AllowedValues" in spec, f"{name}: unconstrained"
            if "AllowedPattern" in spec:
                assert spec.get("ConstraintDescription"), f"{name}: no ConstraintDescription"
        if spec["Type"] == "Number":
            assert "MinValue" in spec and "MaxValue" in spec, f"{name}: unbounded"


def _check_value(name: str, spec: Dict[str, Any], value: str) -> None:
    if "AllowedPattern" in spec:
        assert re.fullmatch(spec["AllowedPattern"], value), f"{name}={value!r} fails its pattern"
    if "AllowedValues" in spec:
        assert value in spec["AllowedValues"], f"{name}={value!r} not allowed"
    if spec["Type"] == "Number":
        assert spec["MinValue"] <= float(value) <= spec["MaxValue"], f"{name}={value} out of range"


def test_defaults_and_the_parameters_example_satisfy_the_constraints(template):
    specs = template["Parameters"]
    for name, spec in specs.items():
        if "Default" in spec and not spec["Type"].startswith("AWS::"):
            _check_value(name, spec, str(spec["Default"]))
    example = json.loads(PARAMS_EXAMPLE_PATH.read_text(encoding="utf-8"))
    given = {p["ParameterKey"]: p["ParameterValue"] for p in example}
    assert set(given) <= set(specs), f"unknown parameters: {set(given) - set(specs)}"
    secret = {n for n, s in specs.items() if s.get("NoEcho")}
    assert not secret & set(given), "a secret parameter has no place in an example file"
    missing = {n for n, s in specs.items() if "Default" not in s} - set(given) - secret
    assert not missing, f"the example leaves out required parameters {missing}"
    for name, value in given.items():
        if not specs[name]["Type"].startswith(("AWS::", "List<")):
            _check_value(name, specs[name], value)
    # the Fernet key pattern accepts a real key and refuses a truncated one
    fernet = specs["FernetKey"]["AllowedPattern"]
    assert re.fullmatch(fernet, "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg=")
    assert not re.fullmatch(fernet, "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1P")


def test_the_fernet_key_parameter_takes_airflows_rotation_list(template):
    """FernetKey may be `new,old` (Airflow's MultiFernet: the first key encrypts, every one
    decrypts); whatever the pattern lets through, Airflow's own split builds a MultiFernet from."""
    from cryptography.fernet import Fernet, InvalidToken, MultiFernet

    spec = template["Parameters"]["FernetKey"]
    assert spec["NoEcho"] is True
    assert "new,old" in spec["Description"] and "docs/rotating-secrets.md" in spec["Description"]
    pattern = spec["AllowedPattern"]
    new, old, older = (Fernet.generate_key().decode() for _ in range(3))
    for value in (new, f"{new},{old}", f"{new},{old},{older}"):
        assert re.fullmatch(pattern, value), value
        # as airflow.models.crypto.get_fernet reads [core] fernet_key
        keys = MultiFernet([Fernet(part.encode()) for part in value.split(",")])
        assert Fernet(new.encode()).decrypt(keys.encrypt(b"secret")) == b"secret"
    # new,old: what the old key encrypted still decrypts; what it encrypts now, only new reads
    keys = MultiFernet([Fernet(k.encode()) for k in (new, old)])
    assert keys.decrypt(Fernet(old.encode()).encrypt(b"before")) == b"before"
    with pytest.raises(InvalidToken):
        Fernet(old.encode()).decrypt(keys.encrypt(b"after"))
    for bad in (f"{new}, {old}", f"{new},", f",{new}", f"{new},,{old}", f"{new};{old}",
                f"{new},{old[:-1]}", ""):  # fmt: skip
        assert not re.fullmatch(pattern, bad), bad


# -- the contract with the agent ------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_agent_yaml_loads_and_names_the_roles_units(template, resolver, role):
    cfg = config_from_dict(agent_yaml(template, resolver, role), source=f"{role} agent.yaml")
    assert cfg.role.override == role
    assert cfg.cluster == STACK
    assert cfg.units_for(role) == DEFAULT_UNITS[role]
    # the units it names are the ones systemd/install-units.sh installs
    for unit in cfg.units_for(role) + cfg.agent_units_for(role):
        assert unit_file(unit).is_file(), f"{role}: no unit file for {unit} in systemd/"
    assert cfg.env.file == "/etc/sysconfig/airflow.env"
    assert (cfg.env.owner, cfg.env.group, cfg.env.mode) == ("root", "airflow", "0640")


@pytest.mark.parametrize("role", ROLES)
def test_agent_yaml_names_the_templates_resources(template, resolver, role):
    cfg = config_from_dict(agent_yaml(template, resolver, role))
    res = template["Resources"]
    # SSM: every parameter of the stack lies under env.ssm_paths and maps to one variable,
    # and every variable the agent requires is one of them
    assert cfg.env.ssm_paths == role_ssm_paths(role)
    # every parameter of the stack is under some role's paths; this role reads its own
    all_names = ssm_parameter_names(template, resolver)
    every_path = {path for r in ROLES for path in role_ssm_paths(r)}
    assert all(n.startswith(tuple(every_path)) for n in all_names), all_names
    names = [n for n in all_names if n.startswith(tuple(cfg.env.ssm_paths))]
    mapped = map_parameters([Parameter(n, "v") for n in names], cfg.env.ssm_paths)
    assert set(cfg.env.required) <= set(mapped), set(cfg.env.required) - set(mapped)
    assert "AIRFLOW_HOME" in cfg.env.static
    # role detection: the override, the instance tag and the group map agree
    groups = {
        r: resolver.resolve(res[f"{LOGICAL[r]}Group"]["Properties"]["AutoScalingGroupName"])
        for r in ROLES
    }
    for r, group in groups.items():
        assert match_group(cfg.role.groups, group)[1] == r
    asg_tags = {t["Key"]: t["Value"] for t in res[f"{LOGICAL[role]}Group"]["Properties"]["Tags"]}
    assert asg_tags[cfg.role.tag] == role
    # jobs that name resources: every role hands Airflow the task role's credentials
    task_role = "WorkerTaskRole" if role == "worker" else "TaskRole"
    assert cfg.task_credentials.role_arn == resolver.get_att(task_role, "Arn")
    if role == "scheduler":
        assert cfg.variables.secret_id == resolver.ref("VariablesSecret")
        assert cfg.worker_db.secret_id == resolver.ref("WorkerDbSecret")
    else:
        assert cfg.variables.secret_id is None
        assert cfg.worker_db.secret_id is None
    hook = res["WorkerTerminationHook"]["Properties"]
    if role == "worker":
        assert cfg.lifecycle.hook_name == resolver.resolve(hook["LifecycleHookName"])
        assert cfg.lifecycle.group_name == groups["worker"]
        assert resolver.resolve(hook["AutoScalingGroupName"]) == groups["worker"]
        assert cfg.drain.timeout == float(template["Parameters"]["DrainTimeout"]["Default"])
    else:
        assert cfg.lifecycle.hook_name is None
    # the api-server's restarts leave the load balancer's target group (agent.platform.
    # target_group): the template's own target group, the one the webserver group registers in
    if role == "webserver":
        assert cfg.target_group.arn == resolver.ref("ApiServerTargetGroup")
        assert res["WebserverGroup"]["Properties"]["TargetGroupARNs"] == [
            {"Ref": "ApiServerTargetGroup"}
        ]
    else:
        assert cfg.target_group.arn is None


def test_drain_timeout_fits_codedeploys_application_stop(template):
    appspec = yaml.safe_load((REPO / "codedeploy" / "appspec.yml").read_text(encoding="utf-8"))
    (stop,) = appspec["hooks"]["ApplicationStop"]
    # the drain's deadline, the worker's stop and the agent's start must end before CodeDeploy
    # gives up: the same check the hook makes at run time, at the largest DrainTimeout allowed
    from agent.config import config_from_dict
    from agent.jobs.deploy.budget import over_budget

    stop_timeout = config_from_dict({}).drain.stop_timeout
    largest = template["Parameters"]["DrainTimeout"]["MaxValue"]
    assert over_budget(largest, stop_timeout, stop["timeout"]) is None
    assert over_budget(largest + 61, stop_timeout, stop["timeout"]) is not None


def test_worker_termination_hook(template, resolver):
    hook = template["Resources"]["WorkerTerminationHook"]["Properties"]
    assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["DefaultResult"] == "CONTINUE"
    # heartbeats (agent: HeartbeatTimeout/3, at most 300 s) must fit well inside the timeout
    assert 300 <= hook["HeartbeatTimeout"] <= 7200


def user_data_cfn_init(template, resolver, role: str) -> Dict[str, str]:
    """The options of the cfn-init call in the role's launch template's UserData."""
    lt = template["Resources"][f"{LOGICAL[role]}LaunchTemplate"]["Properties"]
    (line,) = [
        ln
        for ln in resolver.resolve(lt["LaunchTemplateData"]["UserData"]).splitlines()
        if ln.startswith("/opt/aws/bin/cfn-init ")
    ]
    words = line.split()
    return {w[2:]: words[i + 1] for i, w in enumerate(words) if w.startswith("--")}


@pytest.mark.parametrize("role", ROLES)
def test_cfn_hup_hook_watches_the_init_metadata_and_runs_cfn_init_then_env_sync(
    template, resolver, role, tmp_path
):
    init = init_of(template)
    # the hook watches exactly the metadata the instance was built from
    built_from = user_data_cfn_init(template, resolver, role)["resource"]
    assert built_from == INIT_RESOURCE
    hooks = configparser.ConfigParser(interpolation=None)
    hooks.read_string(init_file(template, resolver, role, "/etc/cfn/hooks.d/airflow-agent.conf"))
    (section,) = hooks.sections()
    hook = hooks[section]
    assert hook["path"] == f"Resources.{built_from}.Metadata.AWS::CloudFormation::Init"
    assert "post.update" in hook["triggers"].split(",")
    action = hook["action"]
    script = init_file(template, resolver, role, action)
    main = configparser.ConfigParser(interpolation=None)
    main.read_string(init_file(template, resolver, role, "/etc/cfn/cfn-hup.conf"))
    assert main["main"]["stack"] == resolver.ref("AWS::StackId")

    # the update configSet rewrites the file this role's agent.yaml links to, and only
    # configuration: no reinstall, no command, and it leaves the link alone
    assert init["configSets"]["update"] == ["configure"]
    update = configset_files(init, "update")
    assert agent_yaml_target(template, role) in update
    assert AGENT_YAML not in update and not any(is_symlink(a) for _c, a in update.values())
    for config in configset_configs(init, "update"):
        assert not {"commands", "packages", "sources"} & set(init[config]), config
        # its one service: cfn-hup, restarted by cfn-init when this config changed its files
        # (cfn-hup reads them only at start; cfn-init restarts for files of the same config)
        services = init[config].get("services", {})
        assert set(services) <= {"systemd"}
        for name, svc in services.get("systemd", {}).items():
            assert name == "cfn-hup", name
            assert set(svc["files"]) == {
                "/etc/cfn/cfn-hup.conf",
                "/etc/cfn/hooks.d/airflow-agent.conf",
            }
            assert set(svc["files"]) <= set(init[config]["files"])
    # and first boot writes everything an update rewrites
    assert set(configset_configs(init, "update")) <= set(configset_configs(init, role))
    run_hook_script(script, tmp_path)


def agent_daemon_units() -> Set[str]:
    """The agent's long-running units in systemd/ (they read agent.yaml only at start)."""
    daemons = set()
    for path in SYSTEMD_DIR.glob("airflow-agent-*.service"):
        unit = configparser.ConfigParser(interpolation=None, strict=False)
        unit.optionxform = str  # type: ignore[assignment]
        unit.read_string(path.read_text(encoding="utf-8"))
        if unit["Service"].get("Type", "simple") != "oneshot":
            daemons.add(path.name)
    return daemons


def run_hook_script(script: str, tmp_path: Path) -> None:
    """Run the cfn-hup hook with stand-ins for cfn-init, systemctl and the agent."""
    log = tmp_path / "calls.log"
    agent_yaml_file = tmp_path / "agent.yaml"
    agent_yaml_file.write_text("cluster: a\n")
    stubs = {}
    for name, real in (
        ("cfn-init", "/opt/aws/bin/cfn-init"),
        ("airflow-agent", "/usr/local/bin/airflow-agent"),
        ("systemctl", "systemctl "),
    ):
        stub = tmp_path / name
        body = f'#!/bin/sh\necho "{name} $*" >> "{log}"\n'
        if name == "cfn-init":
            # an update that changes this instance's agent.yaml, when asked to
            body += f'[ -z "$CHANGE_AGENT_YAML" ] || echo "cluster: b" > "{agent_yaml_file}"\n'
        body += f'[ -z "$FAIL_{name.replace("-", "_").upper()}" ] || exit 3\n'
        stub.write_text(body)
        stub.chmod(0o755)
        stubs[real] = str(stub) + (" " if real.endswith(" ") else "")
    stubs[AGENT_YAML] = str(agent_yaml_file)
    assert all(real in script for real in stubs), script
    for real, stub in stubs.items():
        script = script.replace(real, stub)
    path = tmp_path / "hook.sh"
    path.write_text(script)

    def run(**env: str) -> Tuple[int, List[str]]:
        if log.exists():
            log.unlink()
        proc = subprocess.run(
            ["sh", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, **env),
        )
        return proc.returncode, log.read_text().splitlines() if log.exists() else []

    cfn_init = (
        f"cfn-init -v --stack {STACK} --resource {INIT_RESOURCE} --configsets update "
        "--region us-east-1"
    )
    # agent.yaml unchanged: cfn-init, then env sync; no daemon restarted
    assert run() == (0, [cfn_init, "airflow-agent env sync --splay"])
    # agent.yaml changed: the running agent daemons restart (try-restart: stopped ones stay
    # stopped) before env sync, all of them
    rc, calls = run(CHANGE_AGENT_YAML="1")
    assert rc == 0 and calls[0] == cfn_init and calls[-1] == "airflow-agent env sync --splay", calls
    (restart,) = calls[1:-1]
    words = restart.split()
    assert words[:2] == ["systemctl", "try-restart"], restart
    assert set(words[2:]) == agent_daemon_units(), restart
    # a failed cfn-init stops the hook before anything else
    rc, calls = run(FAIL_CFN_INIT="1")
    assert rc != 0 and calls == [cfn_init], "env sync ran after cfn-init failed"
    # a failed restart or env sync fails the hook too (cfn-hup logs it and retries)
    agent_yaml_file.write_text("cluster: a\n")
    rc, calls = run(CHANGE_AGENT_YAML="1", FAIL_SYSTEMCTL="1")
    assert rc == 3 and "airflow-agent env sync --splay" not in calls, calls
    assert run(FAIL_AIRFLOW_AGENT="1")[0] == 3


BOOTSTRAP = "/usr/local/bin/airflow-agent bootstrap"
CLOUDWATCH = "/usr/local/sbin/airflow-cloudwatch-agent"


@pytest.mark.parametrize("role", ROLES)
def test_first_boot_installs_configures_and_bootstraps(template, resolver, role):
    init = init_of(template)
    # the role's configSet: the shared install, what an update re-applies, the role's own
    # config, then start
    assert init["configSets"][role] == ["install", {"ConfigSet": "update"}, role, "start"]
    assert configset_configs(init, role) == ["install", "configure", role, "start"]
    assert user_data_cfn_init(template, resolver, role)["configsets"] == role
    run = [(c, resolver.resolve(cmd)) for c, _key, cmd in configset_commands(init, role)]
    joined = "\n".join(cmd for c, cmd in run if c == "install")
    # the agent's package, fetched with the instance's own role, unpacked where pip reads it
    package = "s3://{}/{}".format(
        TEST_PARAMS["ArtifactBucket"], template["Parameters"]["AgentPackageKey"]["Default"]
    )
    assert f'aws s3 cp --only-show-errors --region us-east-1 "{package}" ' in joined
    assert "tar -xzf /opt/airflow-agent/package.tar.gz -C /opt/airflow-agent/src" in joined
    assert "awscli-2" in init["install"]["packages"]["yum"]
    assert (
        "AWS::CloudFormation::Authentication"
        not in template["Resources"][INIT_RESOURCE]["Metadata"]
    ), "cfn-init's S3 authentication names one IAM role; three roles share this install"
    assert "python3.11 -m venv /opt/airflow-agent/venv" in joined
    assert (
        "/opt/airflow-agent/venv/bin/pip install --no-cache-dir -q /opt/airflow-agent/src" in joined
    )
    assert "python3.11 -m venv /opt/airflow/venv" in joined
    assert "sh /opt/airflow-agent/src/systemd/install-units.sh" in joined
    assert (SYSTEMD_DIR / "install-units.sh").is_file()
    version = template["Parameters"]["AirflowVersion"]["Default"]
    assert f'"apache-airflow[celery,amazon,postgres]=={version}"' in joined
    assert f"constraints-{version}/constraints-3.11.txt" in joined
    # the package first, the agent venv before the units that run it, Airflow after
    assert joined.index(package) < joined.index("/opt/airflow-agent/venv")
    assert joined.index("/opt/airflow-agent/venv") < joined.index("install-units.sh")
    # after install: the role's own commands, then bootstrap, then the CodeDeploy agent;
    # nothing else. The CodeDeploy agent is installed (and starts polling for a launch
    # deployment, whose hooks then run) only once the instance has its role: agent.yaml,
    # env file and units are all in place by then.
    after = [cmd for c, cmd in run if c != "install"]
    own = [cmd for c, cmd in run if c == role]
    (codedeploy,) = [cmd for cmd in after if "codedeploy-install" in cmd]
    # the CloudWatch agent: the role's config starts it first, so the service logs ship before
    # any of the role's own commands (which may fail the boot)
    assert after == own + [BOOTSTRAP, codedeploy]
    assert own[0] == CLOUDWATCH
    own = own[1:]
    assert "/latest/install" in codedeploy and "ruby /tmp/codedeploy-install auto" in codedeploy
    assert not [cmd for cmd in after[:-1] + [joined] if "codedeploy" in cmd]
    # agent.yaml links to the role's file before any of them runs (the role's config writes
    # the link; cfn-init writes a config's files before its commands)
    config, link = configset_files(init, role)[AGENT_YAML]
    assert config == role and is_symlink(link)
    if role == "scheduler":
        # the schema is migrated before bootstrap starts the scheduler, with the env file
        # (env sync first) read by systemd itself, as the airflow user
        migrate, worker_db = own
        # then the workers' own database user (before any worker launches: their group
        # depends on this one)
        assert worker_db == "/usr/local/bin/airflow-agent worker-db-user"
        assert migrate.startswith("/usr/local/bin/airflow-agent env sync && systemd-run ")
        assert "-p EnvironmentFile=/etc/sysconfig/airflow.env -p User=airflow" in migrate
        assert migrate.endswith("/opt/airflow/venv/bin/airflow db migrate")
    else:
        # api-servers and workers wait (up to 10 min) until the schema is the one their
        # Airflow expects before anything of theirs starts
        wait = own[0]
        assert wait.startswith("/usr/local/bin/airflow-agent env sync && systemd-run ")
        assert "-p EnvironmentFile=/etc/sysconfig/airflow.env -p User=airflow" in wait
        assert wait.endswith(
            "/opt/airflow/venv/bin/airflow db check-migrations --migration-wait-timeout 600"
        )
        if role == "worker":
            # the worker extra: Celery, for the drain's remote control
            pip = "/opt/airflow-agent/venv/bin/pip install --no-cache-dir -q"
            assert own[1:] == [f'{pip} "/opt/airflow-agent/src[worker]"']
        else:
            # the admin's passwords file, from the stack's secret
            assert own[1:] == ["/usr/local/sbin/airflow-admin-password"]
    # cfn-hup runs (started by the configure config, which writes its files)
    cfn_hup = init["configure"]["services"]["systemd"]["cfn-hup"]
    assert cfn_hup["enabled"] is True and cfn_hup["ensureRunning"] is True
    assert "configure" in configset_configs(init, role)


_AIRFLOW_STUB = """#!/bin/sh
echo "args=$*"
echo "user=$(id -un)"
echo "cwd=$(pwd)"
echo "executor=$AIRFLOW__CORE__EXECUTOR"
echo "probe=$PROBE"
exit {rc}
"""

# stands in for `airflow-agent env sync`: writes the env file as the real one would
_ENV_SYNC_STUB = """#!/bin/sh
[ "$*" = "env sync" ] || exit 9
mkdir -p /etc/sysconfig
printf '%s\\n' 'AIRFLOW__CORE__EXECUTOR=CeleryExecutor' 'PROBE="a b \\"q\\" $HOME"' \\
    > /etc/sysconfig/airflow.env
chown root:airflow /etc/sysconfig/airflow.env
chmod 0640 /etc/sysconfig/airflow.env
"""


@pytest.mark.systemd
def test_scheduler_db_migrate_command_runs_on_systemd(template, resolver, tmp_path):
    """The scheduler's first-boot migration, run as cfn-init would, on a real systemd 252."""
    from sandbox.systemd_host import SystemdHost

    command = resolver.resolve(
        init_of(template)["scheduler"]["commands"]["10-db-migrate"]["command"]
    )
    with SystemdHost(tmp_path, name="aea-cfn-migrate") as host:
        host.write_file(
            "/etc/sysusers.d/airflow-agent.conf",
            (SYSTEMD_DIR / "airflow-agent.sysusers").read_text(),
        )
        host.run(["systemd-sysusers", "/etc/sysusers.d/airflow-agent.conf"])
        host.run(["install", "-d", "-o", "airflow", "-g", "airflow", "/airflow"])
        host.write_file("/usr/local/bin/airflow-agent", _ENV_SYNC_STUB, mode=0o755)
        host.write_file("/opt/airflow/venv/bin/airflow", _AIRFLOW_STUB.format(rc=0), mode=0o755)
        proc = host.run(["sh", "-c", command], check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout.splitlines()
        # systemd parsed the env file (quotes, escapes, no $ expansion), ran it as airflow
        assert out == [
            "args=db migrate",
            "user=airflow",
            "cwd=/airflow",
            "executor=CeleryExecutor",
            'probe=a b "q" $HOME',
        ]
        # a failed migration fails the command, so cfn-init fails and cfn-signal reports it
        host.write_file("/opt/airflow/venv/bin/airflow", _AIRFLOW_STUB.format(rc=5), mode=0o755)
        proc = host.run(["sh", "-c", command], check=False)
        assert proc.returncode != 0


@pytest.mark.parametrize("role", ROLES)
def test_launch_template_and_group(template, resolver, role):
    res = template["Resources"]
    lt = res[f"{LOGICAL[role]}LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert lt["MetadataOptions"] == {
        "HttpEndpoint": "enabled",
        "HttpTokens": "required",
        "HttpPutResponseHopLimit": 1,
        "InstanceMetadataTags": "enabled",
    }
    # a pinned AMI id: an SSM-parameter type would re-resolve "latest" on every stack update
    assert template["Parameters"]["ImageId"]["Type"] == "AWS::EC2::Image::Id"
    assert (
        "/aws/service/ami-amazon-linux-latest/al2023-ami-"
        in (template["Parameters"]["ImageId"]["Description"])
    )
    tags = {
        t["Key"]: t["Value"]
        for spec in lt["TagSpecifications"]
        if spec["ResourceType"] == "instance"
        for t in spec["Tags"]
    }
    assert tags["airflow:role"] == role
    # UserData: cfn-init of the role's configSet, then cfn-signal of this group; nothing else
    lines = [
        ln
        for ln in resolver.resolve(lt["UserData"]).splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    run = [ln for ln in lines if not ln.startswith("[ -x /opt/aws/bin/cfn-init ]")]
    group = f"{LOGICAL[role]}Group"
    assert run == [
        f"/opt/aws/bin/cfn-init -v --stack {STACK} --resource {INIT_RESOURCE} "
        f"--configsets {role} --region us-east-1",
        f"/opt/aws/bin/cfn-signal -e $? --stack {STACK} --resource {group} --region us-east-1",
    ]
    asg = res[group]
    signal = asg["CreationPolicy"]["ResourceSignal"]
    desired = asg["Properties"]["DesiredCapacity"]
    assert signal["Count"] == desired
    assert asg["UpdatePolicy"]["AutoScalingRollingUpdate"]["WaitOnResourceSignals"] is True
    # the group waits for every SSM parameter its instances read at boot, and for the
    # metadata their cfn-init reads (nothing else makes the group depend on it)
    params = set(resources_of_type(template, "AWS::SSM::Parameter"))
    assert params | {INIT_RESOURCE} <= set(asg["DependsOn"])


def _normalized(value: Any, role: str) -> Any:
    """`value` with the role's names (Worker, worker) replaced by <ROLE>."""
    text = json.dumps(value)
    for name in (LOGICAL[role], role):
        text = text.replace(name, "<ROLE>")
    return json.loads(text)


def test_launch_templates_differ_only_in_role_specific_parts(template):
    def normalized(role: str) -> Dict[str, Any]:
        lt = json.loads(json.dumps(template["Resources"][f"{LOGICAL[role]}LaunchTemplate"]))
        lt["Properties"]["LaunchTemplateData"]["BlockDeviceMappings"][0]["Ebs"].pop("VolumeSize")
        return _normalized(lt, role)

    scheduler = normalized("scheduler")
    assert "Metadata" not in scheduler, "cfn-init's metadata lives on InstanceConfig only"
    for role in ("webserver", "worker"):
        assert normalized(role) == scheduler, role


def test_cfn_init_metadata_is_in_one_place_and_roles_differ_only_in_their_own_parts(
    template, resolver
):
    res = template["Resources"]
    carriers = [r for r, v in res.items() if "AWS::CloudFormation::Init" in v.get("Metadata", {})]
    assert carriers == [INIT_RESOURCE]
    assert not [r for r, v in res.items() if "AWS::CloudFormation::Authentication" in str(v)]
    init = init_of(template)
    assert set(init["configSets"]) == set(ROLES) | {"update"}
    assert set(init) - {"configSets"} == {"install", "configure", "start"} | set(ROLES)

    # one shape: each role's configSet and config are the scheduler's with the role renamed,
    # apart from the commands only that role runs (tested with the first boot)
    def shape(role: str) -> Tuple[Any, Any]:
        config = {k: v for k, v in init[role].items() if k != "commands"}
        return _normalized(init["configSets"][role], role), _normalized(config, role)

    for role in ROLES:
        assert shape(role) == shape("scheduler"), role
        assert set(init[role]) <= {"files", "commands"}
        assert list(init[role]["files"]) == [AGENT_YAML]
    # every role's file is written by the shared configure, side by side
    role_files = {p for p in init["configure"]["files"] if p.startswith("/etc/airflow-agent/")}
    assert role_files == {agent_yaml_target(template, r) for r in ROLES}
    assert {agent_yaml_target(template, r) for r in ROLES} == {
        f"/etc/airflow-agent/roles/{r}.yaml" for r in ROLES
    }
    # the roles' agent.yaml files: the same comments (the config revision) and the same
    # settings, but for the role-specific keys
    texts = {
        r: init_file(template, resolver, "update", agent_yaml_target(template, r)) for r in ROLES
    }
    comments = {
        r: [ln for ln in text.splitlines() if ln.startswith("#")] for r, text in texts.items()
    }
    revision = template["Parameters"]["ConfigRevision"]["Default"]
    assert f"# config revision: {revision}" in comments["scheduler"]
    assert comments["webserver"] == comments["worker"] == comments["scheduler"]
    role_specific = {
        "scheduler": {"variables", "worker_db"},
        "webserver": {"target_group"},
        "worker": {"drain", "lifecycle"},
    }
    common = None
    for role, text in texts.items():
        data = yaml.safe_load(text)
        common_keys = {"cluster", "role", "units", "env", "task_credentials"}
        assert set(data) - common_keys == role_specific[role], role
        assert data["role"].pop("override") == role
        assert data.pop("units") == {role: DEFAULT_UNITS[role]}
        required = data["env"].pop("required")
        # workers consume from the broker: its URL must be there before they start
        broker = "AIRFLOW__CELERY__BROKER_URL_SECRET"
        assert (broker in required) == (role == "worker"), role
        for key in role_specific[role]:
            data.pop(key)
        # checked per role with the template's resources (test_agent_yaml_names_...)
        assert data["env"].pop("ssm_paths") == role_ssm_paths(role)
        data.pop("task_credentials")
        rest = (data, [v for v in required if v != broker])
        common = common or rest
        assert rest == common, role


def test_agent_yaml_on_disk_follows_updates_of_the_metadata(template, resolver, tmp_path):
    """cfn-init's files of each role's first boot, then of `update` after stack updates."""
    init = init_of(template)
    revised = Resolver(
        template, dict(TEST_PARAMS, ConfigRevision="2"), pseudo={"AWS::StackName": STACK}
    )
    drained = Resolver(
        template,
        dict(TEST_PARAMS, ConfigRevision="2", DrainTimeout=600),
        pseudo={"AWS::StackName": STACK},
    )
    # what cfn-hup compares: any of these changes is a change of the watched metadata
    watched = [r.resolve(init) for r in (resolver, revised, drained)]
    assert watched[0] != watched[1] != watched[2]
    for role in ROLES:
        root = tmp_path / role
        write_files(configset_files(init, role), root, resolver.resolve)
        path = Path(str(root) + AGENT_YAML)
        assert path.is_symlink()
        before = path.read_bytes()
        cfg = load_config(str(path))
        assert cfg.role.override == role and cfg.units_for(role) == DEFAULT_UNITS[role]
        # a ConfigRevision bump: cfn-hup runs `update`, which rewrites the link's target
        write_files(configset_files(init, "update"), root, revised.resolve)
        assert path.is_symlink()
        text = path.read_text(encoding="utf-8")
        assert "# config revision: 2" in text and text != before.decode()
        assert load_config(str(path)).role.override == role
        # a worker-only change reaches every instance's hook, but leaves the other roles'
        # agent.yaml byte for byte as it was: env sync then changes nothing for them
        write_files(configset_files(init, "update"), root, drained.resolve)
        after = load_config(str(path))
        if role == "worker":
            assert after.drain.timeout == 600
        else:
            assert path.read_text(encoding="utf-8") == text


def test_a_secrets_revision_changes_every_roles_env_file_after_the_secrets(template, resolver):
    """A secret's new value reaches no env file (they name secrets, never hold them), so the
    units would never restart for it: SecretsRevision is in every role's env.static, so a new
    value changes the watched metadata (cfn-hup runs the hook) and the env file env sync renders
    (confapply restarts the units). The metadata changes only after the secrets a stack update
    can change (those with a SecretString), so no unit restarts before the new value exists."""
    init = init_of(template)
    revised = Resolver(
        template, dict(TEST_PARAMS, SecretsRevision="r2"), pseudo={"AWS::StackName": STACK}
    )
    assert resolver.resolve(init) != revised.resolve(init)
    ssm = [Parameter(f"/airflow/{STACK}/core/executor", "CeleryExecutor", "String")]
    mapped = map_parameters(ssm, [f"/airflow/{STACK}/"])
    for role in ROLES:
        files = []
        for r in (resolver, revised):
            text = init_file(template, r, "update", agent_yaml_target(template, role))
            cfg = config_from_dict(yaml.safe_load(text), f"{role}.yaml")
            files.append(plan_env(mapped, cfg.env.static, [], 1.0, None).content)
        default = template["Parameters"]["SecretsRevision"]["Default"]
        assert parse_env(files[0])["AIRFLOW_SECRETS_REVISION"] == default, role
        assert parse_env(files[1])["AIRFLOW_SECRETS_REVISION"] == "r2", role
        assert files[0] != files[1], role
    depends = set(template["Resources"][INIT_RESOURCE].get("DependsOn", []))
    changeable = {
        rid
        for rid, res in resources_of_type(template, "AWS::SecretsManager::Secret").items()
        if "SecretString" in res["Properties"]
        and "/config/" in str(resolver.resolve(res["Properties"]["Name"]))
    }
    assert changeable == {
        "FernetKeySecret",
        "DbConnSecret",
        "WorkerDbConnSecret",
        "BrokerUrlSecret",
    }
    assert changeable <= depends


def test_codedeploy_has_one_deployment_group_per_role_deployed_workers_first(template):
    res = template["Resources"]
    groups = {
        rid: r["Properties"]
        for rid, r in res.items()
        if r["Type"] == "AWS::CodeDeploy::DeploymentGroup"
    }
    assert sorted(groups) == sorted(f"{LOGICAL[r]}DeploymentGroup" for r in ROLES)
    for role in ROLES:
        group = groups[f"{LOGICAL[role]}DeploymentGroup"]
        assert group["AutoScalingGroups"] == [{"Ref": f"{LOGICAL[role]}Group"}]
        assert group["DeploymentGroupName"] == role
        assert group["ApplicationName"] == {"Ref": "CodeDeployApplication"}
        # never a whole role at once; the agent does the api-servers' traffic control itself
        assert group["DeploymentConfigName"] == "CodeDeployDefault.OneAtATime"
        assert group["DeploymentStyle"]["DeploymentOption"] == "WITHOUT_TRAFFIC_CONTROL"
        assert group["AutoRollbackConfiguration"]["Enabled"] is True
    order = template["Outputs"]["DeploymentOrder"]["Value"]["Fn::Join"][1]
    assert order == [
        {"Ref": f"{LOGICAL[r]}DeploymentGroup"} for r in ("worker", "scheduler", "webserver")
    ]
    assert res["CodeDeployApplication"]["Properties"]["ComputePlatform"] == "Server"


# -- Airflow reads its secrets through the secrets backend -----------------------------------------


_AIRFLOW_PROBE = textwrap.dedent(
    """
    import json, sys
    from airflow.configuration import conf
    conf.load_providers_configuration()
    options = json.loads(sys.argv[1])
    print(json.dumps({f"{s}/{k}": conf.get(s, k) for s, k in options}))
    """
)

_PROBE_BACKEND = textwrap.dedent(
    """
    from airflow.secrets import BaseSecretsBackend

    class PrefixEcho(BaseSecretsBackend):
        # stands in for the amazon provider's SecretsManagerBackend: same config_prefix/key ids
        def __init__(self, config_prefix, base, **kwargs):
            super().__init__()
            self.config_prefix = config_prefix
            self.base = base

        def get_config(self, key):
            # a URL Airflow can parse at import (it builds its engine, connecting to nothing)
            # that carries the secret id it was asked for
            return "sqlite:///" + self.base + "/" + self.config_prefix + "/" + key
    """
)


@pytest.mark.airflow
def test_airflow_resolves_every_secret_option_from_the_stacks_secrets(template, resolver, tmp_path):
    assert AIRFLOW_PYTHON.exists(), "the Airflow venv (.cache/airflow-venv) is missing"
    params = {
        resolver.resolve(p["Properties"]["Name"]): resolver.resolve(p["Properties"]["Value"])
        for p in resources_of_type(template, "AWS::SSM::Parameter").values()
    }
    path = f"/airflow/{STACK}/"
    view = {n: v for n, v in params.items() if n.startswith(tuple(role_ssm_paths("scheduler")))}
    env_vars = map_parameters(
        [Parameter(n, v) for n, v in view.items()], role_ssm_paths("scheduler")
    )
    kwargs = json.loads(params[f"{path}secrets/backend_kwargs"])
    prefix = kwargs["config_prefix"]
    secret_names = {
        resolver.resolve(s["Properties"]["Name"])
        for s in resources_of_type(template, "AWS::SecretsManager::Secret").values()
    }
    options = []
    for name, value in params.items():
        # /airflow/<stack>[-group]/<section>/<key>
        section, key = name.split("/")[3:]
        if key.endswith("_secret"):
            options.append((section, key[: -len("_secret")]))
            assert f"{prefix}/{value}" in secret_names, f"{name} names no secret of the stack"
    assert {o for o in options} >= {
        ("database", "sql_alchemy_conn"),
        ("celery", "broker_url"),
        ("core", "fernet_key"),
        ("api_auth", "jwt_secret"),
    }
    (tmp_path / "probe_backend.py").write_text(_PROBE_BACKEND)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({var: p.value for var, p in env_vars.items()})
    env.update(
        {
            "AIRFLOW_HOME": str(tmp_path / "airflow"),
            "AIRFLOW__SECRETS__BACKEND": "probe_backend.PrefixEcho",
            "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps(
                {"config_prefix": prefix, "base": str(tmp_path)}
            ),
            "PYTHONPATH": str(tmp_path),
            # S3 remote logging needs the amazon provider, which the test venv does not have
            # (instances install apache-airflow[amazon]); it plays no part in config lookups
            "AIRFLOW__LOGGING__REMOTE_LOGGING": "False",
        }
    )
    proc = subprocess.run(
        [str(AIRFLOW_PYTHON), "-c", _AIRFLOW_PROBE, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for section, key in options:
        (value,) = [v for n, v in view.items() if n.endswith(f"/{section}/{key}_secret")]
        # Airflow ignores `<key>_secret` for options it does not treat as sensitive: then the
        # default would come back here instead of the backend's answer
        assert got[f"{section}/{key}"] == f"sqlite:///{tmp_path}/{prefix}/{value}", (section, key)


# -- IAM ------------------------------------------------------------------------------------------


def _arn(service: str, resource: str) -> str:
    return f"arn:aws:{service}:us-east-1:123456789012:{resource}"


def _scoped_resources(template, resolver) -> Dict[str, Set[str]]:
    """service prefix -> the ARNs of this stack a statement of that service may name."""
    secrets = {resolver.ref(s) for s in resources_of_type(template, "AWS::SecretsManager::Secret")}
    logs = resolver.get_att("LogsBucket", "Arn")
    bundles = resolver.get_att("BundleBucket", "Arn")
    artifact = "arn:aws:s3:::{}/{}".format(
        TEST_PARAMS["ArtifactBucket"], template["Parameters"]["AgentPackageKey"]["Default"]
    )
    return {
        "ssm": {
            _arn("ssm", f"parameter/airflow/{STACK}{suffix}{glob}")
            for suffix in ("", "-services", "-worker")
            for glob in ("", "/*")
        }
        | {_arn("ec2", "instance/*")},
        "secretsmanager": secrets,
        "autoscaling": {
            _arn("autoscaling", f"autoScalingGroup:*:autoScalingGroupName/{STACK}-worker")
        },
        "s3": {logs, f"{logs}/logs/*", f"{bundles}/*", artifact},
        "kms": {resolver.get_att("SecretsKey", "Arn")},
        # the task role the agent assumes for Airflow's processes (agent/jobs/task_credentials)
        "sts": {resolver.get_att("TaskRole", "Arn"), resolver.get_att("WorkerTaskRole", "Arn")},
        # the api-servers' target group (agent/platform/target_group.py)
        "elasticloadbalancing": {resolver.ref("ApiServerTargetGroup")},
        # the CloudWatch agent's log streams, in the stack's log groups only
        "logs": {
            resolver.get_att(group, "Arn")
            for group in resources_of_type(template, "AWS::Logs::LogGroup")
        },
    }


@pytest.mark.parametrize("role", ROLES)
def test_instance_role_statements_are_allow_listed_and_scoped(template, resolver, role):
    role_res = template["Resources"][f"{LOGICAL[role]}Role"]["Properties"]
    assert "ManagedPolicyArns" not in role_res, "managed policies are not least privilege"
    allowed = iam_actions.allowed_actions(role)
    scoped = _scoped_resources(template, resolver)
    stmts = [
        s for p in role_res["Policies"] for s in statements(resolver.resolve(p["PolicyDocument"]))
    ]
    assert stmts
    for st in stmts:
        sid = st.get("Sid", "?")
        assert st["Effect"] == "Allow"
        assert "NotAction" not in st and "NotResource" not in st, sid
        actions = as_list(st["Action"])
        resources = as_list(st["Resource"])
        assert set(actions) <= allowed, (
            f"{role}/{sid}: not in agent/platform/iam_actions.py: " + str(set(actions) - allowed)
        )
        assert not any("*" in a for a in actions), f"{role}/{sid}: wildcard action"
        unscoped = [a for a in actions if a in iam_actions.UNSCOPED_ACTIONS]
        if unscoped:
            # an action that supports no resource-level permission never shares a statement
            # with one that does, so "*" is never granted where a scope exists
            assert unscoped == actions and resources == ["*"], sid
            continue
        assert "*" not in resources, f"{role}/{sid}: Resource * for scopable actions"
        services = {a.split(":")[0] for a in actions}
        assert len(services) == 1, f"{role}/{sid}: mixes services {services}"
        (service,) = services
        assert set(resources) <= scoped[service], (
            f"{role}/{sid}: {set(resources) - scoped[service]} are not this stack's"
        )
        if service == "kms":
            via = st["Condition"]["StringEquals"]["kms:ViaService"]
            assert via == "secretsmanager.us-east-1.amazonaws.com", sid


@pytest.mark.parametrize("role", ROLES)
def test_instance_roles_grant_what_their_jobs_call_and_nothing_of_other_roles(
    template, resolver, role
):
    role_res = template["Resources"][f"{LOGICAL[role]}Role"]["Properties"]
    granted = {
        a
        for p in role_res["Policies"]
        for st in statements(p["PolicyDocument"])
        for a in as_list(st["Action"])
    }
    needed = {a for c in iam_actions.ROLE_CONSUMERS[role] for a in iam_actions.consumer_actions(c)}
    assert needed - granted == set(), f"{role} lacks {needed - granted}"
    # role-specific grants stay on their role
    lifecycle_writes = {
        "autoscaling:RecordLifecycleActionHeartbeat",
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:SetInstanceProtection",
    }
    assert bool(granted & lifecycle_writes) == (role == "worker")
    target_group_writes = {
        "elasticloadbalancing:DeregisterTargets",
        "elasticloadbalancing:RegisterTargets",
    }
    assert bool(granted & target_group_writes) == (role == "webserver")
    # the variables secret only for the scheduler; the broker URL everywhere: Celery runs on
    # scheduler and worker, and the Airflow CLI root runs with the instance role at first boot
    # (the webserver's db check-migrations) resolves every configured _secret option (seen on
    # the launched stack: AccessDenied on the webserver)
    refs = json.dumps(role_res)
    assert ('"VariablesSecret"' in refs) == (role == "scheduler")
    assert '"BrokerUrlSecret"' in refs


def _boto_operations() -> Dict[str, Dict[str, str]]:
    """service -> {python method name: IAM action} for the services an instance may call."""
    session = botocore.session.get_session()
    out: Dict[str, Dict[str, str]] = {}
    for service in (
        "ssm",
        "secretsmanager",
        "autoscaling",
        "ec2",
        "elbv2",
        "s3",
        "kms",
        "sts",
        "cloudformation",
        "codedeploy",
        "elasticache",
        "rds",
        "sqs",
        "cloudwatch",
    ):
        model = session.get_service_model(service)
        # CloudWatch signs as "monitoring"; its IAM actions are "cloudwatch:..."
        iam_prefix = {"cloudwatch": "cloudwatch"}.get(service)
        prefix = iam_prefix or model.signing_name or model.endpoint_prefix
        out[service] = {botocore.xform_name(op): f"{prefix}:{op}" for op in model.operation_names}
    return out


def agent_aws_calls() -> Dict[str, Set[str]]:
    """IAM action -> the agent modules whose code calls it (method calls and paginator names).

    A module's calls are matched against the services it makes clients for; a module that
    makes none is handed its clients by its package (`client("secretsmanager")` in
    jobs/variables/cli.py, the call in jobs/variables/sync.py), so it is matched against the
    clients its package's modules make.
    """
    ops = _boto_operations()
    trees = {
        str(path.relative_to(REPO)): ast.parse(path.read_text(encoding="utf-8"))
        for path in sorted((REPO / "agent").rglob("*.py"))
    }
    made: Dict[str, Set[str]] = {}
    for where, tree in trees.items():
        made[where] = {
            n.args[0].value
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "client"
            and n.args
            and isinstance(n.args[0], ast.Constant)
        }
        for service in made[where]:
            assert service in ops, f"{where}: client({service!r}) is not modelled here"
    found: Dict[str, Set[str]] = {}
    for where, tree in trees.items():
        package = os.path.dirname(where)
        services = made[where] or {
            s for other, ss in made.items() if os.path.dirname(other) == package for s in ss
        }
        names = {
            n.func.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
        }
        names |= {
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        for service in services:
            for name in names & set(ops[service]):
                found.setdefault(ops[service][name], set()).add(where)
    return found


def test_iam_allow_list_matches_the_agents_aws_calls():
    calls = agent_aws_calls()
    listed = iam_actions.agent_actions()
    assert calls, "found no AWS calls in agent/: the scan is broken"
    assert set(calls) - listed == set(), (
        "the agent calls actions agent/platform/iam_actions.py does not list: "
        + str({a: sorted(calls[a]) for a in set(calls) - listed})
    )
    # kms:Decrypt is called by Secrets Manager on the agent's behalf, not by agent code
    implicit = {"kms:Decrypt"}
    assert listed - implicit - set(calls) == set(), (
        "agent/platform/iam_actions.py lists actions no agent code calls"
    )


# -- moto -----------------------------------------------------------------------------------------


def test_create_stack_on_moto_then_env_sync_with_the_templates_agent_yaml(
    aws, template, resolver, tmp_path, run_agent
):
    from moto.cloudformation.parsing import get_model_map

    ec2 = boto3.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(
            VpcId=vpc, CidrBlock=f"10.20.{i}.0/24", AvailabilityZone=f"us-east-1{az}"
        )["Subnet"]["SubnetId"]
        for i, az in ((1, "a"), (2, "b"))
    ]
    params = dict(TEST_PARAMS, VpcId=vpc, SubnetIds=",".join(subnets))
    reduced, dropped = reduce_for_moto(template, get_model_map(), resolver)
    print("moto: created without these resources (types moto cannot create):")
    for rid, rtype in sorted(dropped.items(), key=lambda x: (x[1], x[0])):
        print(f"  {rtype:45} {rid}")
    assert set(dropped.values()) == EXPECTED_MOTO_SKIPPED_TYPES
    kept = {r["Type"] for r in reduced["Resources"].values()}
    assert {
        "AWS::AutoScaling::AutoScalingGroup",
        "AWS::EC2::LaunchTemplate",
        "AWS::IAM::Role",
        "AWS::SSM::Parameter",
        "AWS::RDS::DBInstance",
        "AWS::S3::Bucket",
        "AWS::KMS::Key",
    } <= kept

    cfn = boto3.client("cloudformation")
    cfn.create_stack(
        StackName=STACK,
        TemplateBody=json.dumps(reduced),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        Capabilities=["CAPABILITY_IAM"],
    )

    def settled():
        st = cfn.describe_stacks(StackName=STACK)["Stacks"][0]
        return st if not st["StackStatus"].endswith("IN_PROGRESS") else None

    stack = wait_for(settled, timeout=60, what="stack creation to settle")
    events = cfn.describe_stack_events(StackName=STACK)["StackEvents"]
    assert stack["StackStatus"] == "CREATE_COMPLETE", [
        (e["LogicalResourceId"], e.get("ResourceStatusReason")) for e in events
    ]
    created = {
        r["LogicalResourceId"]
        for r in cfn.list_stack_resources(StackName=STACK)["StackResourceSummaries"]
    }
    assert created == set(reduced["Resources"])

    # the groups, their tags and the launch templates' metadata options as AWS sees them
    asg = boto3.client("autoscaling")
    for role in ROLES:
        (group,) = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[f"{STACK}-{role}"])[
            "AutoScalingGroups"
        ]
        assert {t["Key"]: t["Value"] for t in group["Tags"]}["airflow:role"] == role
        (version,) = ec2.describe_launch_template_versions(LaunchTemplateName=f"{STACK}-{role}")[
            "LaunchTemplateVersions"
        ]
        options = version["LaunchTemplateData"]["MetadataOptions"]
        assert options["HttpTokens"] == "required"
        assert options["InstanceMetadataTags"] == "enabled"

    # the real env sync, configured by the scheduler's agent.yaml from the template
    cfg = agent_yaml(template, resolver, "scheduler")
    cfg["state_dir"] = str(tmp_path / "state")
    cfg["env"].update({"file": str(tmp_path / "airflow.env"), "group": "root"})
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = run_agent(config, "env", "sync")
    assert proc.returncode == 0, proc.stderr
    env = parse_env((tmp_path / "airflow.env").read_bytes())
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_SECRET"] == "sql_alchemy_conn"
    assert env["AIRFLOW__SECRETS__BACKEND"].endswith("SecretsManagerBackend")
    assert env["AIRFLOW_HOME"] == "/airflow"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    names = [
        p["Name"]
        for path in {path for r in ROLES for path in role_ssm_paths(r)}
        for page in boto3.client("ssm")
        .get_paginator("get_parameters_by_path")
        .paginate(Path=path, Recursive=True, PaginationConfig={"PageSize": 10})
        for p in page["Parameters"]
    ]
    assert len(names) == len(resources_of_type(template, "AWS::SSM::Parameter"))
    own = [n for n in names if n.startswith(tuple(role_ssm_paths("scheduler")))]
    mapped = map_parameters([Parameter(n, "") for n in own], role_ssm_paths("scheduler"))
    assert set(env) == set(mapped) | {"AIRFLOW_HOME", "AIRFLOW_SECRETS_REVISION"}


def test_the_outputs_name_roles_security_groups_endpoints_and_groups(template):
    outputs = template["Outputs"]
    resources = template["Resources"]
    for role in ("Scheduler", "Webserver", "Worker"):
        assert outputs[f"{role}RoleArn"]["Value"] == {"Fn::GetAtt": [f"{role}Role", "Arn"]}
        assert outputs[f"{role}GroupName"]["Value"] == {"Ref": f"{role}Group"}
        assert outputs[f"{role}DeploymentGroupName"]["Value"] == {"Ref": f"{role}DeploymentGroup"}
    groups = [rid for rid, r in resources.items() if r["Type"] == "AWS::EC2::SecurityGroup"]
    for rid in groups:
        assert outputs[f"{rid}Id"]["Value"] == {"Ref": rid}
    for name in ("DatabaseEndpoint", "BrokerEndpoint", "LoadBalancerDnsName"):
        assert name in outputs
