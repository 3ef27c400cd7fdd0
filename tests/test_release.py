"""The release (tools/release.py, `make dist`, `make bundle`): one version, the package the
template downloads is the one the sandbox installs, and a revision CodeDeploy can run."""

from __future__ import annotations

import configparser
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import agent
from sandbox.cfn_template import load_template
from sandbox.codedeploy_runner import unpack_bundle
from sandbox.stack import scenario
from sandbox.stack.instance import agent_package
from tools import release

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "cloudformation" / "airflow-cluster.yaml"
EXAMPLE_PARAMS = ROOT / "cloudformation" / "parameters.example.json"
HOOK_SCRIPTS = sorted(p.name for p in (ROOT / "codedeploy" / "hooks").glob("*.sh"))


def _make(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", f"PYTHON={sys.executable}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _install_command() -> str:
    """The template's cfn-init command that downloads and unpacks the agent's package."""
    init = load_template(TEMPLATE)["Resources"]["InstanceConfig"]["Metadata"]
    commands = init["AWS::CloudFormation::Init"]["install"]["commands"]
    return commands["05-agent-package"]["command"]["Fn::Sub"]


# -- one version ------------------------------------------------------------------------------


def test_the_version_has_one_home():
    assert release.version() == agent.__version__
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: agent.__version__"


def test_template_default_example_parameters_and_artifact_name_agree():
    ver = agent.__version__
    key = release.package_key(ver)
    assert key == f"airflow-ec2-agent/airflow-ec2-agent-{ver}.tar.gz"
    assert key.endswith("/" + release.dist_name(ver))
    param = load_template(TEMPLATE)["Parameters"]["AgentPackageKey"]
    assert param["Default"] == key
    assert re.fullmatch(param["AllowedPattern"], key)
    example = json.loads(EXAMPLE_PARAMS.read_text())
    assert {p["ParameterKey"]: p["ParameterValue"] for p in example}["AgentPackageKey"] == key
    # the template downloads exactly that key and unpacks it where it installs from
    command = _install_command()
    assert '"s3://${ArtifactBucket}/${AgentPackageKey}"' in command
    assert "tar -xzf /opt/airflow-agent/package.tar.gz -C /opt/airflow-agent/src" in command


def test_the_changelogs_newest_entry_is_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    entries = re.findall(r"^## (\S+)", text, re.M)
    assert entries and entries[0] == agent.__version__
    assert len(entries) == len(set(entries))


def test_release_cli_prints_version_and_key():
    out = subprocess.run(
        [sys.executable, "-m", "tools.release", "key"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.strip() == release.package_key(agent.__version__)


# -- the package (make dist) --------------------------------------------------------------------


def _members(data: bytes):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_dist_holds_what_the_templates_install_commands_use_at_its_top():
    members = _members(release.build_dist())
    # 10-agent-venv pip-installs src (setup.cfg reads README.md), 20-agent-units runs this script
    for name in ("setup.cfg", "pyproject.toml", "README.md", "CHANGELOG.md", "agent/__init__.py"):
        assert name in members
    assert "sh /opt/airflow-agent/src/systemd/install-units.sh" in json.dumps(
        load_template(TEMPLATE)["Resources"]["InstanceConfig"]
    )
    assert "systemd/install-units.sh" in members
    units = {p.name for p in (ROOT / "systemd").iterdir() if p.is_file()}
    assert {n.split("/", 1)[1] for n in members if n.startswith("systemd/")} == units
    assert {n for n in members if n.startswith("agent/") and n.endswith(".py")} == {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "agent").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert not [n for n in members if "__pycache__" in n or n.endswith(".pyc")]
    assert all(m.isfile() and m.uid == 0 and m.uname == "root" for m in members.values())
    assert all(m.mode in (0o644, 0o755) for m in members.values())


def test_dist_leaves_out_caches_and_dotfiles(tmp_path):
    repo = tmp_path / "repo"
    (repo / "agent" / "__pycache__").mkdir(parents=True)
    (repo / "systemd").mkdir()
    (repo / "agent" / "__init__.py").write_text('__version__ = "9.8.7"\n')
    (repo / "agent" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (repo / "agent" / ".swp").write_text("x")
    (repo / "systemd" / "install-units.sh").write_text("#!/bin/sh\n")
    (repo / "systemd" / "install-units.sh").chmod(0o755)
    (repo / "setup.cfg").write_text("[metadata]\n")
    members = _members(release.build_dist(repo))
    assert sorted(members) == ["agent/__init__.py", "setup.cfg", "systemd/install-units.sh"]
    assert members["systemd/install-units.sh"].mode == 0o755
    assert release.write_dist(tmp_path / "out", repo).name == "airflow-ec2-agent-9.8.7.tar.gz"


def test_dist_is_reproducible_and_is_what_the_sandbox_uploads():
    assert release.build_dist() == release.build_dist() == agent_package()


def test_make_dist_writes_the_artifact_the_sandbox_installs(tmp_path):
    out = _make("dist", f"DIST={tmp_path}")
    assert out.returncode == 0, out.stderr
    path = tmp_path / f"airflow-ec2-agent-{agent.__version__}.tar.gz"
    assert out.stdout.strip() == str(path)
    assert path.read_bytes() == agent_package()


def test_the_package_builds_a_wheel_of_this_version_with_the_cli(tmp_path):
    from sandbox.systemd_host import unpack_package

    # the template's tar -xzf ... -C /opt/airflow-agent/src
    src = unpack_package(release.REPO, tmp_path / "src")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "wheels"), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    assert wheel.name == f"airflow_ec2_agent-{agent.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        info = f"airflow_ec2_agent-{agent.__version__}.dist-info"
        assert "airflow-agent = agent.cli:main" in zf.read(f"{info}/entry_points.txt").decode()


# -- the revision (make bundle) -----------------------------------------------------------------


def _zip(data: bytes):
    return zipfile.ZipFile(io.BytesIO(data))


def test_bundle_of_the_example_dags():
    with _zip(release.build_bundle(ROOT / "examples" / "dags")) as zf:
        names = zf.namelist()
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in zf.infolist()}
        appspec = zf.read("appspec.yml")
    assert names == ["appspec.yml"] + [f"hooks/{h}" for h in HOOK_SCRIPTS] + ["dags/hello.py"]
    assert appspec == (ROOT / "codedeploy" / "appspec.yml").read_bytes()
    assert all(modes[f"hooks/{h}"] == 0o755 for h in HOOK_SCRIPTS)
    assert modes["appspec.yml"] == modes["dags/hello.py"] == 0o644
    assert len(HOOK_SCRIPTS) == 5


def test_every_hook_the_appspec_names_is_in_the_bundle():
    import yaml

    spec = yaml.safe_load((ROOT / "codedeploy" / "appspec.yml").read_text())
    locations = {h["location"] for hooks in spec["hooks"].values() for h in hooks}
    with _zip(release.build_bundle(ROOT / "examples" / "dags")) as zf:
        assert locations <= set(zf.namelist())


def test_the_example_dag_uses_airflow_3s_task_sdk():
    source = (ROOT / "examples" / "dags" / "hello.py").read_text()
    compile(source, "hello.py", "exec")
    assert "from airflow.sdk import dag, task" in source


def test_bundle_with_plugins_and_nested_dags(tmp_path):
    (tmp_path / "dags" / "sub").mkdir(parents=True)
    (tmp_path / "dags" / "a.py").write_text("a = 1\n")
    (tmp_path / "dags" / "sub" / "b.sql").write_text("select 1\n")
    (tmp_path / "dags" / "__pycache__").mkdir()
    (tmp_path / "dags" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "p.py").write_text("p = 1\n")
    with _zip(release.build_bundle(tmp_path / "dags", tmp_path / "plugins")) as zf:
        names = zf.namelist()
    assert names[-3:] == ["dags/a.py", "dags/sub/b.sql", "plugins/p.py"]


@pytest.mark.parametrize("dags", [None, ""])
def test_bundle_without_dags_is_refused_naming_dags(dags):
    with pytest.raises(release.ReleaseError, match="DAGS"):
        release.build_bundle(dags)


def test_bundle_of_a_missing_or_empty_dags_dir_is_refused(tmp_path):
    with pytest.raises(release.ReleaseError, match=r"DAGS=.*not a directory"):
        release.build_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("x")
    with pytest.raises(release.ReleaseError, match=r"DAGS=.*no \.py or \.zip file"):
        release.build_bundle(tmp_path / "empty")


def test_make_bundle_without_dags_refuses_naming_dags(tmp_path):
    out = _make("bundle", f"DIST={tmp_path}")
    assert out.returncode != 0
    assert "DAGS is not set" in out.stderr and "make bundle DAGS=" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_make_bundle_writes_a_named_reproducible_zip(tmp_path):
    out = _make("bundle", "DAGS=examples/dags", f"DIST={tmp_path}")
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.parent == tmp_path and re.fullmatch(r"airflow-bundle-[0-9a-f]{12}\.zip", path.name)
    assert path.read_bytes() == release.build_bundle(ROOT / "examples" / "dags")
    assert _make("bundle", "DAGS=examples/dags", f"DIST={tmp_path}").stdout.strip() == str(path)


def test_the_sandbox_deploys_the_bundle_builders_zip_with_its_modes(tmp_path):
    bundle = scenario.revision(tmp_path / "v1", "v1", tasks=2)
    assert bundle.read_bytes() == release.build_bundle(tmp_path / "v1" / "dags")
    tree = unpack_bundle(bundle, tmp_path / "archive")
    assert (tree / "appspec.yml").is_file()
    assert 'VERSION = "v1"' in (tree / "dags" / f"{scenario.DAG}.py").read_text()
    for hook in HOOK_SCRIPTS:
        assert (tree / "hooks" / hook).stat().st_mode & 0o777 == 0o755
    assert (tree / "appspec.yml").stat().st_mode & 0o777 == 0o644


def test_unpack_refuses_a_member_outside_the_revision(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside", "x")
    with pytest.raises(ValueError, match="outside the revision"):
        unpack_bundle(evil, tmp_path / "archive")
    assert not (tmp_path / "outside").exists()


def test_the_test_hosts_agent_wheel_is_built_from_the_dist_artifact(tmp_path):
    from sandbox.systemd_host import unpack_package

    src = unpack_package(ROOT, tmp_path / "src")
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert files == sorted(release.package_files())
    assert (src / "agent" / "__init__.py").read_bytes() == (ROOT / "agent/__init__.py").read_bytes()
