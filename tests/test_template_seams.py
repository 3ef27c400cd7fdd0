"""The template's seams with Airflow and CloudFormation that a launched stack showed (issue 11).

Each test here would have failed on the template before its fix:
- rolling updates: for every group and WebserverCount 1 and 2 (and the parameters' extremes),
  MinInstancesInService < MaxSize, which CloudFormation requires (it was 1 = MaxSize with one
  webserver);
- log servers: every role running one (Celery worker, triggerer) and the api-server that signs
  the log requests read the same `[api] secret_key` (only the webserver could);
- auth: one admin password for every api-server, from a generated secret through
  SimpleAuthManager's passwords file; the boot script that writes it, run against the embedded
  AWS, and the real Airflow login with the file it wrote;
- schema: api-servers and workers launch (and are replaced) only after the scheduler group,
  whose instances migrate the schema before they signal; `airflow db check-migrations`, which
  their first boot runs, waits for an unmigrated schema and passes on a migrated one (real
  Airflow);
- ImageId: no SSM-parameter type that re-resolves "latest" on every stack update.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set

import boto3
import pytest
import yaml

from agent.config import DEFAULT_UNITS, ROLES
from sandbox.airflow_cluster import AIRFLOW_VENV
from sandbox.cfn_init import configset_commands
from sandbox.cfn_template import Resolver, as_list, references, statements

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_PATH = REPO / "cloudformation" / "airflow-cluster.yaml"
SYSTEMD_DIR = REPO / "systemd"
STACK = "airflow-test"
LOGICAL = {"scheduler": "Scheduler", "webserver": "Webserver", "worker": "Worker"}
TEST_PARAMS: Dict[str, Any] = {
    "VpcId": "vpc-0123456789abcdef0",
    "SubnetIds": ["subnet-0a", "subnet-0b"],
    "UiAllowedCidr": "10.20.0.0/16",
    "ArtifactBucket": "example-artifacts",
    "ImageId": "ami-0123456789abcdef0",
    "FernetKey": "x" * 43 + "=",
}
ADMIN_SCRIPT = "/usr/local/sbin/airflow-admin-password"
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)


def resolver_for(template, **params: Any) -> Resolver:
    return Resolver(template, dict(TEST_PARAMS, **params), pseudo={"AWS::StackName": STACK})


def role_agent_yaml(template, resolver, role: str) -> Dict[str, Any]:
    """The agent.yaml the template writes for `role` (configure's roles/<role>.yaml)."""
    init = template["Resources"]["InstanceConfig"]["Metadata"]["AWS::CloudFormation::Init"]
    content = init["configure"]["files"][f"/etc/airflow-agent/roles/{role}.yaml"]["content"]
    return yaml.safe_load(resolver.resolve(content))


def ssm_values(template, resolver, role: str = "scheduler") -> Dict[str, str]:
    """<section>/<key> -> value of the SSM parameters under the role's env.ssm_paths: what its
    env file is rendered from."""
    paths = role_agent_yaml(template, resolver, role)["env"]["ssm_paths"]
    out = {}
    for res in template["Resources"].values():
        if res["Type"] == "AWS::SSM::Parameter":
            name = resolver.resolve(res["Properties"]["Name"])
            path = next((x for x in paths if name.startswith(x)), None)
            if path is not None:
                out[name[len(path) :]] = resolver.resolve(res["Properties"]["Value"])
    return out


def secret_arn_named(template, resolver, name: str) -> str:
    (arn,) = [
        resolver.ref(rid)
        for rid, res in template["Resources"].items()
        if res["Type"] == "AWS::SecretsManager::Secret"
        and resolver.resolve(res["Properties"]["Name"]) == name
    ]
    return arn


def role_allows(template, resolver, role: str, action: str, resource: str) -> bool:
    """Whether the role's own policies allow `action` on `resource` (Allow statements only:
    the template has no Deny; Action and Resource as IAM globs)."""
    rid = f"{LOGICAL[role]}Role" if role in LOGICAL else role  # a role, or a role's logical id
    props = template["Resources"][rid]["Properties"]
    for policy in props["Policies"]:
        for st in statements(resolver.resolve(policy["PolicyDocument"])):
            assert st["Effect"] == "Allow"
            if any(fnmatch.fnmatchcase(action, a) for a in as_list(st["Action"])) and any(
                fnmatch.fnmatchcase(resource, r) for r in as_list(st["Resource"])
            ):
                return True
    return False


# -- rolling updates CloudFormation accepts -------------------------------------------------------


def rolling_update_problems(template, resolver) -> List[str]:
    """What CloudFormation would refuse (or what would take a whole group down) in each group's
    AutoScalingRollingUpdate, with the resolver's parameters."""
    problems = []
    for rid, res in template["Resources"].items():
        if res["Type"] != "AWS::AutoScaling::AutoScalingGroup":
            continue
        rolling = resolver.resolve(res["UpdatePolicy"])["AutoScalingRollingUpdate"]
        props = resolver.resolve(res["Properties"])
        low, high = int(props["MinSize"]), int(props["MaxSize"])
        keep, batch = int(rolling["MinInstancesInService"]), int(rolling["MaxBatchSize"])
        if not keep < high:
            problems.append(f"{rid}: MinInstancesInService {keep} is not below MaxSize {high}")
        if batch < 1 or keep < 0:
            problems.append(f"{rid}: MaxBatchSize {batch}, MinInstancesInService {keep}")
        if not low <= int(props["DesiredCapacity"]) <= high:
            problems.append(f"{rid}: DesiredCapacity outside MinSize..MaxSize")
        if rid == "WebserverGroup" and high >= 2 and keep < 1:
            problems.append(f"{rid}: no api-server in service during an update of {high}")
    return problems


def parameter_cases(template) -> Iterator[Dict[str, Any]]:
    """WebserverCount 1 and 2 (and its maximum), with the other groups' sizes at their bounds."""
    spec = template["Parameters"]
    for webservers in (1, 2, spec["WebserverCount"]["MaxValue"]):
        for schedulers in (spec["SchedulerCount"]["MinValue"], spec["SchedulerCount"]["MaxValue"]):
            for workers_max in (spec["WorkerMaxSize"]["MinValue"], 4):
                yield {
                    "WebserverCount": webservers,
                    "SchedulerCount": schedulers,
                    "WorkerMaxSize": workers_max,
                    "WorkerMinSize": 0,
                    "WorkerDesiredCapacity": 1,
                }


def test_rolling_updates_are_ones_cloudformation_accepts_for_every_group_and_size(template):
    cases = list(parameter_cases(template))
    assert {c["WebserverCount"] for c in cases} >= {1, 2}
    for params in cases:
        assert rolling_update_problems(template, resolver_for(template, **params)) == [], params
    # the check catches the template as it was: MinInstancesInService 1 with one api-server
    old = copy.deepcopy(template)
    old["Resources"]["WebserverGroup"]["UpdatePolicy"]["AutoScalingRollingUpdate"][
        "MinInstancesInService"
    ] = 1
    assert rolling_update_problems(old, resolver_for(old, WebserverCount=1)) == [
        "WebserverGroup: MinInstancesInService 1 is not below MaxSize 1"
    ]
    assert rolling_update_problems(old, resolver_for(old, WebserverCount=2)) == []


# -- log servers ----------------------------------------------------------------------------------

# Airflow 3 commands that start a log server by default (`--skip-serve-logs` turns it off); the
# scheduler serves logs only for executors that run tasks locally, not CeleryExecutor
LOG_SERVER_COMMANDS = ("airflow celery worker", "airflow triggerer")


def exec_start(unit: str) -> str:
    for line in (SYSTEMD_DIR / f"{unit}.service").read_text(encoding="utf-8").splitlines():
        if line.startswith("ExecStart="):
            return line[len("ExecStart=") :]
    raise AssertionError(f"{unit}: no ExecStart")


def log_server_roles() -> Set[str]:
    roles = set()
    for role in ROLES:
        for unit in DEFAULT_UNITS[role]:
            command = exec_start(unit)
            if (
                any(c in command for c in LOG_SERVER_COMMANDS)
                and "--skip-serve-logs" not in command
            ):
                roles.add(role)
    return roles


def test_every_log_server_and_the_api_server_read_the_same_api_secret_key(template, resolver):
    assert log_server_roles() == {"scheduler", "worker"}  # the triggerer; the Celery worker
    values = ssm_values(template, resolver)
    prefix = json.loads(values["secrets/backend_kwargs"])["config_prefix"]
    secret = secret_arn_named(template, resolver, f"{prefix}/{values['api/secret_key_secret']}")
    # the api-server signs the log request with [api] secret_key, the log server checks it with
    # its own: every one of them must resolve the one secret
    for role in log_server_roles() | {"webserver"}:
        assert role_allows(template, resolver, role, "secretsmanager:GetSecretValue", secret), role
        assert role_allows(
            template, resolver, role, "kms:Decrypt", resolver.get_att("SecretsKey", "Arn")
        )


def test_airflow_signs_and_checks_log_requests_with_the_api_secret_key():
    # Airflow 3.3's own code: the log server and the api-server's log reader both take the
    # signing key from [api] secret_key (a change of Airflow here must revisit the IAM above)
    site = next((AIRFLOW_VENV / "lib").glob("python3*/site-packages/airflow"))
    for module in ("utils/serve_logs/log_server.py", "utils/log/file_task_handler.py"):
        text = (site / module).read_text(encoding="utf-8")
        assert 'get_signing_key("api", "secret_key")' in text, module


# -- auth -----------------------------------------------------------------------------------------


def admin_script(template, resolver) -> str:
    init = template["Resources"]["InstanceConfig"]["Metadata"]["AWS::CloudFormation::Init"]
    attribs = init["configure"]["files"][ADMIN_SCRIPT]
    assert (attribs["mode"], attribs["owner"], attribs["group"]) == ("000700", "root", "root")
    return resolver.resolve(attribs["content"])


def test_one_admin_from_the_admin_secret_on_every_api_server(template, resolver):
    res = template["Resources"]
    generate = res["AdminPasswordSecret"]["Properties"]["GenerateSecretString"]
    user = json.loads(generate["SecretStringTemplate"])["username"]
    assert generate["GenerateStringKey"] == "password" and generate["PasswordLength"] >= 20
    values = ssm_values(template, resolver)
    assert values["core/auth_manager"] == SIMPLE_AUTH_MANAGER
    assert values["core/simple_auth_manager_users"] == f"{user}:admin"
    script = admin_script(template, resolver)
    arn = resolver.ref("AdminPasswordSecret")
    assert f'SECRET_ID = "{arn}"' in script and 'REGION = "us-east-1"' in script
    target = values["core/simple_auth_manager_passwords_file"]
    assert f'TARGET = "{target}"' in script
    # the file is in no directory the airflow user or a bundle writes
    assert not target.startswith(("/airflow/", "/tmp/", "/var/tmp/"))
    # only the api-server's role reads the admin's password
    for role in ROLES:
        allowed = role_allows(template, resolver, role, "secretsmanager:GetSecretValue", arn)
        assert allowed == (role == "webserver"), role
    # the api-server's first boot writes the file before bootstrap starts the api-server
    init = res["InstanceConfig"]["Metadata"]["AWS::CloudFormation::Init"]
    run = [resolver.resolve(cmd) for _c, _k, cmd in configset_commands(init, "webserver")]
    bootstrap = run.index("/usr/local/bin/airflow-agent bootstrap")
    assert ADMIN_SCRIPT in run[:bootstrap]
    # the outputs say who the admin is and where the password is
    outputs = resolver.resolve(template["Outputs"])
    assert outputs["AdminUser"]["Value"] == user
    assert outputs["AdminPasswordSecretArn"]["Value"] == arn


def unit_settings(unit: str) -> Dict[str, List[str]]:
    """[Service] settings of a unit file in systemd/: name -> every value given."""
    out: Dict[str, List[str]] = {}
    section = None
    for line in (SYSTEMD_DIR / f"{unit}.service").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_the_api_server_unit_may_open_the_passwords_file_read_write(template, resolver):
    # SimpleAuthManager opens its passwords file with "a+"/"r+": under ProtectSystem=strict
    # (or full) /etc is read-only unless ReadWritePaths= names the file's directory
    target = Path(ssm_values(template, resolver)["core/simple_auth_manager_passwords_file"])
    settings = unit_settings("airflow-api-server")
    protect = (settings.get("ProtectSystem") or ["no"])[-1]
    writable = [
        Path(p.lstrip("-")) for value in settings.get("ReadWritePaths", []) for p in value.split()
    ]
    if protect in ("strict", "full") or (protect == "yes" and target.parts[1] in ("usr", "boot")):
        assert any(target.parent == w or w in target.parent.parents for w in writable), (
            f"{target} is read-only for airflow-api-server (ProtectSystem={protect}, "
            f"ReadWritePaths={settings.get('ReadWritePaths')})"
        )


LOGIN_PROBE = """
import json, sys
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_app
client = TestClient(create_app())
out = {}
for name, password in json.loads(sys.stdin.read()).items():
    reply = client.post("/auth/token", json={"username": "admin", "password": password})
    out[name] = reply.status_code
print("RESULT " + json.dumps(out))
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A scratch directory another user can reach (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="aea-admin-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_admin_password_script_writes_the_file_airflow_logs_in_with(
    aws, template, resolver, shared_dir
):
    """The template's boot script against the embedded AWS, then the real Airflow login."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the script chowns the file to the Airflow user")
    props = template["Resources"]["AdminPasswordSecret"]["Properties"]
    generate = props["GenerateSecretString"]
    password = boto3.client("secretsmanager").get_random_password(
        PasswordLength=generate["PasswordLength"], ExcludePunctuation=True
    )["RandomPassword"]
    body = json.loads(generate["SecretStringTemplate"])
    body[generate["GenerateStringKey"]] = password
    created = boto3.client("secretsmanager").create_secret(
        Name=resolver.resolve(props["Name"]), SecretString=json.dumps(body)
    )
    values = ssm_values(template, resolver)
    target = values["core/simple_auth_manager_passwords_file"]
    local_target = shared_dir / "etc-airflow" / Path(target).name
    # the instance's paths and user, mapped into the scratch directory and `nobody`; the
    # secret's ARN is the embedded AWS's, whose random suffix differs from the resolver's
    script = (
        admin_script(template, resolver)
        .replace(resolver.ref("AdminPasswordSecret"), created["ARN"])
        .replace(f'TARGET = "{target}"', f'TARGET = "{local_target}"')
        .replace('pwd.getpwnam("airflow")', 'pwd.getpwnam("nobody")')
    )
    assert script.startswith("#!/opt/airflow-agent/venv/bin/python\n")
    path = shared_dir / "airflow-admin-password"
    path.write_text(script)
    proc = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert proc.returncode == 0, proc.stderr
    assert password not in proc.stdout + proc.stderr
    info = local_target.stat()
    assert json.loads(local_target.read_text()) == {body["username"]: password}
    assert stat.S_IMODE(info.st_mode) == 0o600
    nobody = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout)
    assert info.st_uid == nobody
    parent = local_target.parent.stat()
    assert (parent.st_uid, stat.S_IMODE(parent.st_mode)) == (0, 0o750)
    assert not list(local_target.parent.glob(".passwords-*")), "a temporary file was left"

    def login(passwords: Dict[str, str]) -> Dict[str, Any]:
        airflow_home = shared_dir / "airflow-home"
        airflow_home.mkdir(exist_ok=True)
        airflow_home.chmod(0o777)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(airflow_home),
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__AUTH_MANAGER": values["core/auth_manager"],
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": values["core/simple_auth_manager_users"],
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(local_target),
            "AIRFLOW__API_AUTH__JWT_SECRET": "j" * 64,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
        proc = subprocess.run(
            ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups"]
            + [str(AIRFLOW_VENV / "bin" / "python"), "-c", LOGIN_PROBE],
            input=json.dumps(passwords),
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        return {
            "rc": proc.returncode,
            "result": json.loads(results[-1][len("RESULT ") :]) if results else None,
            "stderr": proc.stderr,
        }

    # the Airflow user's api-server: the secret's password logs in, another one does not, and
    # Airflow leaves the file as written (no password of its own generated)
    got = login({"right": password, "wrong": password[::-1]})
    assert got["rc"] == 0, got["stderr"][-3000:]
    assert got["result"] == {"right": 201, "wrong": 401}
    assert json.loads(local_target.read_text()) == {body["username"]: password}
    # why the file is the Airflow user's: SimpleAuthManager opens it read-write, so a root-owned
    # 0640 file (readable through the group) stops the api-server from starting
    os.chown(local_target, 0, nobody)
    local_target.chmod(0o640)
    refused = login({"right": password})
    assert refused["rc"] != 0 and "PermissionError" in refused["stderr"]


# -- the schema before anything needs it ---------------------------------------------------------


def depends_on(template) -> Dict[str, Set[str]]:
    """Logical id -> every resource it waits for (DependsOn and references), transitively."""
    resources = template["Resources"]
    direct = {}
    for rid, res in resources.items():
        deps = set(as_list(res.get("DependsOn", [])))
        for key in ("Properties", "Metadata", "UpdatePolicy", "CreationPolicy"):
            deps |= references(res.get(key, {})) & set(resources)
        direct[rid] = deps
    closed: Dict[str, Set[str]] = {}

    def close(rid: str, path: Set[str]) -> Set[str]:
        if rid not in closed:
            assert rid not in path, f"dependency cycle through {rid}"
            out = set(direct[rid])
            for dep in direct[rid]:
                out |= close(dep, path | {rid})
            closed[rid] = out
        return closed[rid]

    for rid in resources:
        close(rid, set())
    return closed


def test_api_servers_and_workers_launch_and_roll_only_after_the_scheduler_group(template, resolver):
    res = template["Resources"]
    deps = depends_on(template)
    assert "WebserverGroup" not in deps["SchedulerGroup"]
    assert "WorkerGroup" not in deps["SchedulerGroup"]
    for group in ("WebserverGroup", "WorkerGroup"):
        # created after, and updated after, the scheduler group: CloudFormation creates and
        # updates a resource only once everything it depends on is complete
        assert "SchedulerGroup" in deps[group], group
    # ... and the scheduler group is complete only when every scheduler has signalled, which
    # its UserData does after cfn-init ran the scheduler's configSet, `db migrate` included
    scheduler = res["SchedulerGroup"]
    assert scheduler["CreationPolicy"]["ResourceSignal"]["Count"] == {"Ref": "SchedulerCount"}
    assert scheduler["Properties"]["MinSize"] == {"Ref": "SchedulerCount"}
    assert scheduler["UpdatePolicy"]["AutoScalingRollingUpdate"]["WaitOnResourceSignals"] is True
    user_data = resolver.resolve(
        res["SchedulerLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    )
    lines = user_data.splitlines()
    (init_at,) = [
        i for i, ln in enumerate(lines) if "cfn-init" in ln and "--configsets scheduler" in ln
    ]
    assert (
        "cfn-signal -e $? " in lines[init_at + 1]
        and "--resource SchedulerGroup" in lines[init_at + 1]
    )
    init = res["InstanceConfig"]["Metadata"]["AWS::CloudFormation::Init"]
    run = [resolver.resolve(cmd) for _c, _k, cmd in configset_commands(init, "scheduler")]
    migrate = [i for i, cmd in enumerate(run) if cmd.endswith("airflow db migrate")]
    assert migrate and migrate[0] < run.index("/usr/local/bin/airflow-agent bootstrap")
    # a new AirflowVersion is a new launch template version for every group (a rolling
    # replacement), so the order above is the order in which the groups meet the new schema
    for role in ROLES:
        lt = res[f"{LOGICAL[role]}LaunchTemplate"]["Properties"]["LaunchTemplateData"]
        assert "${AirflowVersion}" in lt["UserData"]["Fn::Base64"]["Fn::Sub"], role
    # and api-servers and workers check the schema themselves before anything of theirs starts
    for role in ("webserver", "worker"):
        run = [resolver.resolve(cmd) for _c, _k, cmd in configset_commands(init, role)]
        checks = [i for i, cmd in enumerate(run) if "/airflow db check-migrations " in cmd]
        assert checks and checks[0] < run.index("/usr/local/bin/airflow-agent bootstrap"), role


def test_check_migrations_waits_for_an_unmigrated_schema_and_passes_a_migrated_one(tmp_path):
    """The command the api-servers' and workers' first boot runs, with the real Airflow CLI."""
    airflow = AIRFLOW_VENV / "bin" / "airflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(tmp_path),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/airflow.db",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
    )

    def airflow_db(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(airflow), "db", *args], capture_output=True, text=True, timeout=300, env=env
        )

    waited = airflow_db("check-migrations", "--migration-wait-timeout", "2")
    assert waited.returncode != 0
    assert "unapplied migrations after 2 seconds" in waited.stdout + waited.stderr
    assert airflow_db("migrate").returncode == 0
    passed = airflow_db("check-migrations", "--migration-wait-timeout", "600")
    assert passed.returncode == 0, passed.stderr[-2000:]


# -- the task role -------------------------------------------------------------------------------


def task_role_of(template, resolver, role: str) -> str:
    """Logical id of the task role the role's agent.yaml names."""
    arn = role_agent_yaml(template, resolver, role)["task_credentials"]["role_arn"]
    (rid,) = [
        rid
        for rid, res in template["Resources"].items()
        if res["Type"] == "AWS::IAM::Role" and resolver.get_att(rid, "Arn") == arn
    ]
    return rid


@pytest.mark.parametrize("role", ROLES)
def test_task_role_grants_what_airflow_calls_and_none_of_the_instances_powers(
    template, resolver, role
):
    from agent.platform import iam_actions

    task = task_role_of(template, resolver, role)
    props = template["Resources"][task]["Properties"]
    stmts = [
        s for p in props["Policies"] for s in statements(resolver.resolve(p["PolicyDocument"]))
    ]
    granted = {a for st in stmts for a in as_list(st["Action"])}
    assert granted == set(iam_actions.task_role_actions())
    for st in stmts:
        assert "*" not in as_list(st["Resource"]), st.get("Sid")
    # nothing of the instances' own powers: Auto Scaling, SSM, EC2, assuming roles
    assert not {a for a in granted if a.split(":")[0] in ("autoscaling", "ssm", "ec2", "sts")}
    # the secrets Airflow reads on this role (the api secret key included: log servers), and
    # no other config secret
    values = ssm_values(template, resolver, role)
    prefix = json.loads(values["secrets/backend_kwargs"])["config_prefix"]
    readable = {
        arn
        for st in stmts
        if "secretsmanager:GetSecretValue" in as_list(st["Action"])
        for arn in as_list(st["Resource"])
    }
    wanted = {
        secret_arn_named(template, resolver, f"{prefix}/{value}")
        for name, value in values.items()
        if name.endswith("_secret")
    }
    assert readable == wanted, (task, readable ^ wanted)
    # the role's instances may assume it, and no other role
    arn = resolver.get_att(task, "Arn")
    assert role_allows(template, resolver, role, "sts:AssumeRole", arn), role
    assert not role_allows(template, resolver, role, "sts:AssumeRole", arn + "-other"), role
    for other, res in template["Resources"].items():
        if res["Type"] == "AWS::IAM::Role" and other != task:
            other_arn = resolver.get_att(other, "Arn")
            assert not role_allows(template, resolver, role, "sts:AssumeRole", other_arn), other


# -- the workers' database user ------------------------------------------------------------------


def test_workers_use_their_own_database_user_never_the_master(template, resolver):
    res = template["Resources"]
    worker = ssm_values(template, resolver, "worker")
    services = ssm_values(template, resolver, "scheduler")
    assert ssm_values(template, resolver, "webserver") == services
    prefix = json.loads(worker["secrets/backend_kwargs"])["config_prefix"]
    key = "database/sql_alchemy_conn_secret"
    worker_conn = secret_arn_named(template, resolver, f"{prefix}/{worker[key]}")
    master_conn = secret_arn_named(template, resolver, f"{prefix}/{services[key]}")
    assert worker_conn != master_conn
    assert master_conn == resolver.ref("DbConnSecret")
    # the workers' URL is the worker secret's user and password, on the same database
    user = json.loads(
        res["WorkerDbSecret"]["Properties"]["GenerateSecretString"]["SecretStringTemplate"]
    )["username"]
    (conn_id,) = [
        r
        for r in res
        if res[r]["Type"] == "AWS::SecretsManager::Secret" and resolver.ref(r) == worker_conn
    ]
    url = res[conn_id]["Properties"]["SecretString"]["Fn::Sub"]
    assert url.startswith(
        f"postgresql+psycopg2://{user}:{{{{resolve:secretsmanager:${{WorkerDbSecret}}:"
    )
    master_url = res["DbConnSecret"]["Properties"]["SecretString"]["Fn::Sub"]
    assert url.split("@", 1)[1] == master_url.split("@", 1)[1], "not the same database"
    # nothing on a worker may read the master's URL or password
    master = {master_conn, resolver.ref("DbMasterSecret")}
    for who in ("worker", task_role_of(template, resolver, "worker")):
        for arn in master:
            assert not role_allows(template, resolver, who, "secretsmanager:GetSecretValue", arn)
        assert role_allows(template, resolver, who, "secretsmanager:GetSecretValue", worker_conn)
    # the scheduler creates the user (master URL + the worker secret) after the migration and
    # before its signal, so before any worker launches (their group depends on the scheduler's)
    assert role_agent_yaml(template, resolver, "scheduler")["worker_db"] == {
        "secret_id": resolver.ref("WorkerDbSecret")
    }
    assert role_allows(
        template,
        resolver,
        "scheduler",
        "secretsmanager:GetSecretValue",
        resolver.ref("WorkerDbSecret"),
    )
    for role in ("webserver", "worker"):
        assert not role_allows(
            template,
            resolver,
            role,
            "secretsmanager:GetSecretValue",
            resolver.ref("WorkerDbSecret"),
        ), role
    init = res["InstanceConfig"]["Metadata"]["AWS::CloudFormation::Init"]
    run = [resolver.resolve(cmd) for _c, _k, cmd in configset_commands(init, "scheduler")]
    created = run.index("/usr/local/bin/airflow-agent worker-db-user")
    migrated = [i for i, cmd in enumerate(run) if cmd.endswith("airflow db migrate")][0]
    assert migrated < created < run.index("/usr/local/bin/airflow-agent bootstrap")


# -- the AMI --------------------------------------------------------------------------------------


def test_no_parameter_re_resolves_on_every_stack_update(template):
    # AWS::SSM::Parameter::Value<...> parameters are read again at every stack update: with the
    # "latest AMI" path, a ConfigRevision bump replaced every instance
    for name, spec in template["Parameters"].items():
        assert not spec["Type"].startswith("AWS::SSM::Parameter::Value"), name
    assert template["Parameters"]["ImageId"]["Type"] == "AWS::EC2::Image::Id"
    assert "Default" not in template["Parameters"]["ImageId"]


# -- the cfn-hup hook on a real systemd -----------------------------------------------------------

_HOOK_CFN_INIT_STUB = """#!/bin/sh
# stands in for cfn-init's `update`: rewrites the role file agent.yaml links to when asked
echo "cfn-init $*" >> /var/log/hook-calls
if [ -e /run/change-agent-yaml ]; then
    echo "# revision $(cat /run/change-agent-yaml)" >> /etc/airflow-agent/roles/worker.yaml
fi
"""

_HOOK_AGENT_STUB = """#!/bin/sh
echo "airflow-agent $*" >> /var/log/hook-calls
"""

_DAEMON_UNIT = """[Unit]
Description=stand-in for {name}
[Service]
ExecStart=/bin/sleep infinity
"""


def test_cfn_hup_hook_restarts_running_agent_daemons_only_when_agent_yaml_changed(
    template, resolver, tmp_path
):
    """The hook script as cfn-hup runs it, with the real systemctl of a systemd 252 host."""
    from sandbox.systemd_host import SystemdHost

    init = template["Resources"]["InstanceConfig"]["Metadata"]["AWS::CloudFormation::Init"]
    action = "/usr/local/sbin/airflow-agent-cfn-update"
    script = resolver.resolve(init["configure"]["files"][action]["content"])
    # the daemons the hook restarts, as it names them (every unit is installed on every role)
    restarted = re.search(r"systemctl try-restart ([^\n]+)", script)
    assert restarted, script
    daemons = [u.removesuffix(".service") for u in restarted.group(1).split()]
    assert "airflow-agent-confapply" in daemons and "airflow-agent-variables-watch" in daemons
    with SystemdHost(tmp_path, name="aea-cfn-hup-hook") as host:
        host.write_file(action, script, mode=0o700)
        host.write_file("/opt/aws/bin/cfn-init", _HOOK_CFN_INIT_STUB, mode=0o755)
        host.write_file("/usr/local/bin/airflow-agent", _HOOK_AGENT_STUB, mode=0o755)
        host.write_file("/etc/airflow-agent/roles/worker.yaml", "cluster: airflow-test\n")
        host.run(["ln", "-s", "roles/worker.yaml", "/etc/airflow-agent/agent.yaml"])
        for name in daemons:
            host.write_file(f"/etc/systemd/system/{name}.service", _DAEMON_UNIT.format(name=name))
        host.systemctl("daemon-reload")
        # confapply runs; lifecycle runs too (a worker); variables-watch is not this role's
        host.systemctl("start", "airflow-agent-confapply", "airflow-agent-lifecycle")

        def pids() -> Dict[str, int]:
            return {name: host.main_pid(name) for name in daemons}

        before = pids()
        assert before["airflow-agent-confapply"] and before["airflow-agent-lifecycle"]
        # metadata changed, this instance's agent.yaml did not: nothing restarts
        host.run([action])
        assert pids() == before
        # agent.yaml changed: the running daemons restart, the stopped one stays stopped, and
        # env sync runs after them
        host.write_file("/run/change-agent-yaml", "2\n")
        host.run([action])
        after = pids()
        for name in ("airflow-agent-confapply", "airflow-agent-lifecycle"):
            assert after[name] and after[name] != before[name], name
        assert after["airflow-agent-variables-watch"] == 0
        assert host.unit_property("airflow-agent-variables-watch", "ActiveState") == "inactive"
        calls = host.read_file("/var/log/hook-calls").decode().splitlines()
        assert [c.split()[0] for c in calls] == ["cfn-init", "airflow-agent"] * 2
        assert calls[-1] == "airflow-agent env sync --splay"


# -- what the template runs exists ----------------------------------------------------------------


def test_every_agent_command_the_template_runs_is_one_the_agent_has(template, resolver):
    # a command cfn-init (or the cfn-hup hook) runs that the CLI does not know fails the
    # instance's boot or every update, and only on a launched stack
    import re

    from agent.cli import COMMANDS

    text = json.dumps(resolver.resolve(template["Resources"]["InstanceConfig"]["Metadata"]))
    used = set(re.findall(r"/usr/local/bin/airflow-agent ([a-z][a-z-]*)", text))
    assert {"env", "bootstrap"} <= used
    assert used - set(COMMANDS) == set(), f"the agent has no command {used - set(COMMANDS)}"
