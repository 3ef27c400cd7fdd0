"""`python -m sandbox` without a running stack: `up` refuses a template copy whose Init uses a
key the sandbox's cfn-init does not implement, naming it, before anything starts (issue 11
acceptance); `status`, `shell`, `credentials`, `deploy` and `down` say there is no stack;
`deploy` refuses a file that is not a CodeDeploy revision first, naming it. Subprocesses of the
real CLI; nothing heavy starts (the refusal comes first)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from sandbox.cfn_template import load_template
from sandbox.stack.model import TEMPLATE

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, cwd=str(REPO), timeout=120,
    )  # fmt: skip


def test_up_refuses_an_init_key_the_sandbox_does_not_implement(tmp_path):
    template = load_template(TEMPLATE)
    init = template["Resources"]["InstanceConfig"]["Metadata"]["AWS::CloudFormation::Init"]
    init["configure"]["sources"] = {"/opt/extra": "https://example.invalid/extra.tar.gz"}
    copy = tmp_path / "airflow-cluster.yaml"
    copy.write_text(yaml.safe_dump(template, sort_keys=False))
    p = cli("up", "--template", str(copy), run_dir=tmp_path / "run")
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("sandbox up: refused: ")
    assert "configure.sources: config key not implemented" in p.stderr
    # refused before anything started: no run directory, no state
    assert not (tmp_path / "run").exists()


def test_status_and_down_without_a_stack(tmp_path):
    p = cli("status", run_dir=tmp_path)
    assert p.returncode == 3 and "no stack is up" in p.stderr
    p = cli("down", run_dir=tmp_path)
    assert p.returncode == 0 and "no stack is up" in p.stdout


@pytest.mark.parametrize(
    "args", [("shell", "worker"), ("credentials",), ("shell", "worker", "true")]
)
def test_the_stack_commands_without_a_stack_say_so(tmp_path, args):
    p = cli(*args, run_dir=tmp_path)
    assert p.returncode == 3 and "no stack is up" in p.stderr


def test_deploy_refuses_what_is_not_a_codedeploy_revision_naming_it(tmp_path):
    not_zip = tmp_path / "dags.tar"
    not_zip.write_text("x")
    p = cli("deploy", str(not_zip), run_dir=tmp_path)
    assert p.returncode == 2 and f"{not_zip}: not a zip file" in p.stderr
    no_appspec = tmp_path / "dags.zip"
    with zipfile.ZipFile(no_appspec, "w") as zf:
        zf.writestr("dags/hello.py", "")
    p = cli("deploy", str(no_appspec), run_dir=tmp_path)
    assert p.returncode == 2 and "no appspec.yml at the top" in p.stderr
    # a good revision, but no stack to deploy it to
    bundle = Path(cli_bundle(tmp_path))
    p = cli("deploy", str(bundle), run_dir=tmp_path)
    assert p.returncode == 3 and "no stack is up" in p.stderr


def cli_bundle(out: Path) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "tools.release", "bundle", "--dags", "examples/dags", "--out",
         str(out)], capture_output=True, text=True, cwd=str(REPO), timeout=120, check=True,
    )  # fmt: skip
    return p.stdout.strip()
