"""`python -m sandbox up|status|down` without a running stack: `up` refuses a template copy
whose Init uses a key the sandbox's cfn-init does not implement, naming it, before anything
starts (issue 11 acceptance); `status` and `down` say there is no stack. Subprocesses of the
real CLI; nothing heavy starts (the refusal comes first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    assert p.returncode == 3 and "no stack is up" in p.stdout
    p = cli("down", run_dir=tmp_path)
    assert p.returncode == 0 and "no stack is up" in p.stdout
