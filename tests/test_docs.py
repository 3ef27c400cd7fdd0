"""The docs name only what exists: the README's command table is the argparse tree (every
command and flag `--help` shows, and nothing else), its exit-code table is the codes the agent
returns, and every repository path, unit, agent.yaml key and instance path the docs name is
real. The units' `Documentation=` points at a file the template's install puts on the instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from agent import errors, state
from agent.cli import COMMANDS, EPILOG, build_parser
from agent.config import config_from_dict
from agent.jobs.status import render
from agent.runtime.config_watch import EXIT_CONFIG_CHANGED
from sandbox.cfn_template import load_template
from tools import doc_blocks, release

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [
    README,
    ROOT / "CHANGELOG.md",
    ROOT / "cloudformation" / "README.md",
    ROOT / "codedeploy" / "README.md",
    ROOT / "systemd" / "SECURITY.md",
    ROOT / "CONTRIBUTING.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
UNITS_DIR = ROOT / "systemd"
# options every command takes; the README says so once, above the table
COMMON = {"-h", "--help", "--config", "--log-level"}
# names shaped like airflow-* that are not units, each with what it is
NOT_UNITS = {
    "airflow-agent": "the command",
    "airflow-ec2-agent": "the project and its package",
    "airflow-agent-cfn-update": "the cfn-hup hook's script in /usr/local/sbin (the template)",
    "airflow-cloudwatch-agent": "the CloudWatch agent's apply script in /usr/local/sbin",
    "airflow-roles": "the CloudWatch agent's per-role configurations' directory (the template)",
    "airflow-agent-gate": "the worker gate's public directory, /var/lib/airflow-agent-gate",
    "airflow-admin-password": "the admin secret's name part (the template)",
    "airflow-artifacts": "an example bucket name",
    "airflow-prod": "an example stack name",
    "airflow-aws": "/run/airflow-aws, the task role's credentials directory",
    "airflow-bundle": "make bundle's file name",
    "airflow-cluster": "the template's file name",
    "airflow-venv": ".cache/airflow-venv, the test rig's Airflow",
    "airflow-dags-check": "the transient unit docs/operations.md's systemd-run names",
    "airflow-db-check-migrations": "the transient unit of the template's check-migrations",
    "airflow-providers-amazon": "apache-airflow-providers-amazon, a Python package",
}
# top-level directories whose paths the docs name
TREES = ("agent", "sandbox", "tests", "bench", "systemd", "codedeploy", "cloudformation")
TREES += ("docs", "tools", "examples")


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


# -- the command table is argparse -----------------------------------------------------------


def _argparse_rows() -> Set[Tuple[str, str]]:
    """(command path, option or positional metavar) for every command `--help` shows."""
    out: Set[Tuple[str, str]] = set()

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        out.add((path, ""))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}".strip())
            elif action.option_strings:
                out.update((path, o) for o in action.option_strings if o not in COMMON)
            else:
                out.add((path, action.metavar or action.dest.upper()))

    top = build_parser()
    for action in top._actions:
        if action.option_strings and not set(action.option_strings) <= COMMON:
            out.update(("", o) for o in action.option_strings)
    for command in COMMANDS:
        parser = build_parser(only=command)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        walk(sub.choices[command], command)
    # a command with subcommands is not run bare: its rows are its subcommands'
    bare_parents = {
        (path, "") for path, _ in out for other, _ in out if other.startswith(path + " ")
    }
    return out - bare_parents


def _table_rows() -> Set[Tuple[str, str]]:
    text = _text(README)
    table = text[text.index("| command | what it does |") :].split("\n\n", 1)[0]
    out: Set[Tuple[str, str]] = set()
    for cell in re.findall(r"^\| `airflow-agent ([^`]*)`", table, re.M):
        words = cell.split()
        path = " ".join(w for w in words if re.fullmatch(r"[a-z][a-z-]*", w))
        out.add((path, ""))
        out.update((path, f) for f in re.findall(r"--[a-z][a-z-]*", cell))
        # a positional is a bare [METAVAR]; an option's own argument is not one
        positionals = re.sub(r"--[a-z-]+ \[?[A-Z]+\]?", "", cell)
        out.update((path, m) for m in re.findall(r"\[([A-Z]+)\]", positionals))
    # `airflow-agent --version` is the program's own option, not a command
    out.discard(("", ""))
    return out


def test_readme_command_table_equals_argparse():
    table, parser = _table_rows(), _argparse_rows()
    assert sorted(parser - table) == [], "shown by --help, missing from the README table"
    assert sorted(table - parser) == [], "in the README table, unknown to --help"


def test_the_table_check_sees_what_the_issue_found_missing():
    rows = _argparse_rows()
    for row in [("role", "--json"), ("undrain", "--timeout"), ("bootstrap", "--role")]:
        assert row in rows
    assert ("bootstrap", "--skip-env-sync") in rows and ("", "--version") in rows
    assert ("env sync", "--splay") in rows and ("deploy-hook", "EVENT") in rows


def test_every_command_takes_the_common_options_the_readme_names():
    text = _text(README)
    intro = text[text.index("## Commands") : text.index("| command | what it does |")]
    for option in ("--help", "--config PATH", "--log-level"):
        assert option in intro
    for command in COMMANDS:
        sub = next(
            a
            for a in build_parser(only=command)._actions
            if isinstance(a, argparse._SubParsersAction)
        )
        options = {o for a in sub.choices[command]._actions for o in a.option_strings}
        assert options >= COMMON


# -- exit codes ------------------------------------------------------------------------------------


def _exit_codes() -> Dict[int, str]:
    codes = {v: k for k, v in vars(errors).items() if k.startswith("EXIT_")}
    codes[EXIT_CONFIG_CHANGED] = "EXIT_CONFIG_CHANGED"
    return codes


def test_readme_exit_code_table_is_every_code_the_agent_returns():
    text = _text(README)
    table = text[text.index("### Exit codes") :].split("\n\n", 2)[1]
    documented = {int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert documented == set(_exit_codes())


def test_help_names_every_exit_code():
    for code in _exit_codes():
        assert re.search(rf"(?<!\d){code} [a-z]", EPILOG), code


# -- names in the docs -----------------------------------------------------------------------------


def _unit_files() -> Set[str]:
    return {p.name for p in UNITS_DIR.iterdir() if p.suffix in (".service", ".timer")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_unit_the_docs_name_is_shipped(doc):
    units = _unit_files()
    bad = []
    for name in set(re.findall(r"\bairflow-[a-z0-9-]+(?:\.service|\.timer)?\b", _text(doc))):
        if name in NOT_UNITS or re.fullmatch(r"airflow-ec2-agent-\d+", name):
            continue  # (the second: the package's file, airflow-ec2-agent-<version>.tar.gz)
        if name not in units and f"{name}.service" not in units:
            bad.append(name)
    assert sorted(bad) == []


def _config_keys() -> Dict[str, Set[str]]:
    cfg = config_from_dict({})
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = {g.name for g in dataclasses.fields(value)}
    return out


# state files and locks share a section's name (env.json, drain.lock): not keys
FILE_SUFFIXES = {"json", "lock", "py", "service", "timer", "yaml", "yml", "conf", "sh", "md"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_key_the_docs_name_exists(doc):
    keys = _config_keys()
    bad = []
    for code in re.findall(r"`([^`\n]+)`", _text(doc)):
        m = re.fullmatch(r"([a-z_]+)\.([a-z_*]+)", code.strip())
        if not m or m.group(1) not in keys or m.group(2) in FILE_SUFFIXES:
            continue
        section, key = m.groups()
        if not fnmatch.filter(keys[section], key):
            bad.append(code)
    assert bad == []


def test_the_config_key_check_knows_the_sections():
    keys = _config_keys()
    assert {"env", "confapply", "drain", "deploy", "lifecycle", "variables"} <= set(keys)
    assert "splay" in keys["env"] and "on_deadline" in keys["drain"]


def _repo_paths(doc: Path) -> List[str]:
    text = _text(doc)
    found = re.findall(rf"(?<![\w./-])((?:{'|'.join(TREES)})/[\w./<>*-]*)", text)
    found += [
        str((doc.parent / link).resolve().relative_to(ROOT))
        for link in re.findall(r"\]\(([^)#:]+)\)", text)
    ]
    out = []
    for p in found:
        p = p.rstrip(".").rstrip("/")
        if re.search(r"[<*]", p) or any(re.fullmatch(r"[A-Z]+", s) for s in p.split("/")):
            continue  # a placeholder: agent/jobs/<job>/, systemd/UNIT
        out.append(p)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_the_docs_name_exists(doc):
    missing = sorted({p for p in _repo_paths(doc) if not (ROOT / p).exists()})
    assert missing == []


def _shipped_text() -> str:
    files = [*(ROOT / "agent").rglob("*.py"), *(ROOT / "sandbox").rglob("*")]
    files += [*UNITS_DIR.iterdir(), *(ROOT / "codedeploy").rglob("*")]
    files += [ROOT / "cloudformation" / "airflow-cluster.yaml", ROOT / "Makefile"]
    return "\n".join(p.read_text(errors="replace") for p in files if p.is_file())


# paths AWS's own software uses on an instance, which the project never touches: path -> the
# AWS documentation that names it (the operator docs tell where to read these logs)
AWS_PATHS = {
    "/var/log/cfn-hup.log": "CloudFormation User Guide, cfn-hup / troubleshooting",
    "/var/log/cloud-init-output.log": "EC2 User Guide, user data: cloud-init's output",
    "/var/log/aws/codedeploy-agent/codedeploy-agent.log": "CodeDeploy agent config, :log_dir:",
    "/opt/codedeploy-agent/deployment-root/deployment-logs/codedeploy-agent-deployments.log": (
        "CodeDeploy User Guide, view log data for EC2/on-premises deployments"
    ),
}


def test_every_instance_path_the_docs_name_is_one_the_project_uses():
    shipped = _shipped_text()
    missing = set()
    for doc in DOCS:
        for path in re.findall(
            r"(?<![\w.:/-])(/(?:etc|opt|var|run|usr|airflow|sys)\b[\w./@-]*)", _text(doc)
        ):
            path = path.rstrip(".").rstrip("/")
            if path not in shipped and path not in AWS_PATHS:
                missing.add((doc.name, path))
    assert sorted(missing) == []


def test_no_doc_says_confapply_restarts_only_some_units():
    # confapply restarts every running unit of the role (they share the one env file); see
    # agent/jobs/confapply/plan.py units_to_restart
    for doc in DOCS:
        assert "whose environment changed" not in _text(doc), doc.name


# -- Documentation= ----------------------------------------------------------------------------


def _install_dir() -> str:
    """Where the template's cfn-init unpacks the agent's package (tar -xzf ... -C DIR)."""
    init = load_template(ROOT / "cloudformation" / "airflow-cluster.yaml")["Resources"]
    commands = init["InstanceConfig"]["Metadata"]["AWS::CloudFormation::Init"]["install"]
    command = commands["commands"]["05-agent-package"]["command"]["Fn::Sub"]
    return re.search(r"tar -xzf \S+ -C (\S+)", command).group(1)


def test_unit_documentation_points_at_what_the_instance_has():
    package = set(release.package_files())
    prefix = _install_dir().rstrip("/") + "/"
    assert prefix == "/opt/airflow-agent/src/"
    seen = 0
    for unit in sorted(UNITS_DIR.iterdir()):
        for url in re.findall(r"^Documentation=(.+)$", unit.read_text(), re.M):
            for item in url.split():
                if item.startswith("file://"):
                    path = item[len("file://") :]
                    assert path.startswith(prefix), (unit.name, path)
                    assert path[len(prefix) :] in package, (unit.name, path)
                    seen += 1
                else:
                    assert item.startswith(("https://", "man:")), (unit.name, item)
    assert seen >= 6  # every agent service names the installed README


# -- the operator docs' commands (docs/operations.md, upgrading.md, troubleshooting.md) ----------

OPERATOR_DOCS = [ROOT / d for d in doc_blocks.OPERATOR_DOCS]
# units the operator docs name that the project does not ship: unit -> who provides it
EXTERNAL_UNITS = {
    "cfn-hup": "the template writes /etc/systemd/system/cfn-hup.service (cfn-init configure)",
    "codedeploy-agent": "the CodeDeploy agent's package (cfn-init's start config installs it)",
}


def _code(text: str) -> List[str]:
    """Every code span and every line of every fenced block."""
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    blocks = [ln for b in re.findall(r"```[\w-]*\n(.*?)```", text, re.S) for ln in b.splitlines()]
    return spans + blocks


def _agent_invocations(text: str) -> List[Tuple[str, List[str]]]:
    """(command path, [--flags]) for every `airflow-agent ...` a doc's code runs."""
    out = []
    for code in _code(text):
        for m in re.finditer(
            r"(?<![\w/-])(?:/usr/local/bin/)?airflow-agent((?: [^|;&)`'\"]*)?)", code
        ):
            words = m.group(1).split()
            path: List[str] = []
            for w in words:
                if not re.fullmatch(r"[a-z][a-z-]*", w):
                    break
                path.append(w)
            flags = [w.split("=")[0] for w in words if w.startswith("--")]
            out.append((" ".join(path), flags))
    return out


def _known_commands() -> Dict[str, Set[str]]:
    known: Dict[str, Set[str]] = {}
    for path, option in _argparse_rows():
        known.setdefault(path, set())
        if option.startswith("--"):
            known[path].add(option)
    return known


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_agent_command_the_docs_show_exists_with_its_flags(doc):
    known = _known_commands()
    bad = []
    for path, flags in _agent_invocations(_text(doc)):
        words = path.split()
        # the longest known command the words start with ("env sync --diff", "status --json")
        cmd = next((" ".join(words[:n]) for n in range(len(words), -1, -1)
                    if " ".join(words[:n]) in known), None)  # fmt: skip
        if cmd is None or (cmd == "" and words):
            bad.append((path, "no such command"))
            continue
        extra = [w for w in words[len(cmd.split()) :] if w in known]
        unknown = [f for f in flags if f not in known[cmd] | COMMON | known[""]]
        if unknown or extra:
            bad.append((path, unknown or extra))
    assert bad == []


def test_the_command_check_catches_a_wrong_flag_and_command():
    text = "```sh\nairflow-agent drain --timout 5\nairflow-agent envsync --diff\n```\n"
    found = _agent_invocations(text)
    assert found == [("drain", ["--timout"]), ("envsync", ["--diff"])]
    known = _known_commands()
    assert "--timout" not in known["drain"] and "envsync" not in known
    assert "--prune" in known["variables sync"] and "--splay" in known["env sync"]


@pytest.mark.parametrize("doc", OPERATOR_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shell_block_of_the_operator_docs_is_marked(doc):
    blocks = doc_blocks.doc_blocks(doc, ROOT)  # DocBlockError names any unmarked block
    assert blocks, "an operator doc without a command"


def test_the_runbook_runs_on_every_role_of_the_sandbox():
    roles = {b.role for b in doc_blocks.sandbox_blocks(ROOT)}
    assert roles == set(doc_blocks.ROLES)


def _label_problems(text: str, name: str) -> List[str]:
    """Every operator-doc block whose visible label (the line above its mark) is missing or
    does not say where it runs (tools/doc_blocks.LABELS, NEEDS_LABELS)."""
    lines = text.splitlines()
    bad = []
    for block in doc_blocks.parse_blocks(text, name):
        label = lines[block.line - 3].strip() if block.line >= 3 else ""
        if block.where == "sandbox":
            ok = label.startswith(doc_blocks.LABELS[block.role])
        elif block.where == doc_blocks.LOCAL:
            ok = label.startswith(doc_blocks.LOCAL_LABEL)
        else:
            ok = label.startswith(doc_blocks.NEEDS_LABELS)
        if not ok or not label.endswith(":"):
            bad.append(f"{block.name}: label {label!r}")
    return bad


@pytest.mark.parametrize("doc", OPERATOR_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_of_the_operator_docs_says_where_it_runs_in_the_rendered_text(doc):
    # the mark is an HTML comment, invisible once rendered: the line above it is what a reader sees
    assert _label_problems(_text(doc), str(doc.relative_to(ROOT))) == []


def test_the_label_check_sees_a_missing_and_a_wrong_label():
    text = (
        "Text:\n\n<!-- sandbox: worker -->\n```sh\nls\n```\n\n"
        "On a scheduler:\n<!-- sandbox: worker -->\n```sh\nls\n```\n\n"
        "On a worker:\n<!-- sandbox: worker -->\n```sh\nls\n```\n\n"
        "From your workstation (AWS CLI):\n<!-- needs: aws-account -->\n```sh\naws s3 ls\n```\n"
    )
    assert _label_problems(text, "d.md") == ["d.md:4: label ''", "d.md:10: label 'On a scheduler:'"]


@pytest.mark.parametrize("doc", OPERATOR_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_unit_the_operator_docs_act_on_exists(doc):
    units = {u.rsplit(".", 1)[0] for u in _unit_files()} | set(NOT_UNITS)
    template = (ROOT / "cloudformation" / "airflow-cluster.yaml").read_text()
    bad = []
    for code in _code(_text(doc)):
        # -u/--unit of journalctl and systemd-run (not sudo's -u USER)
        named = []
        if re.search(r"\b(?:journalctl|systemd-run)\b", code):
            named = re.findall(r"(?:-u|--unit)\s+([\w@.-]+)", code)
        m = re.match(r"\s*systemctl\s+(?:start|stop|restart|status|show|kill)\s+(.*)", code)
        if m:
            rest = re.sub(r"(?:-p|--property)\s+\S+", "", m.group(1))
            named += [w for w in rest.split() if not w.startswith("-")]
        for unit in named:
            name = unit.rsplit(".", 1)[0] if unit.endswith((".service", ".timer")) else unit
            if name not in units and name not in EXTERNAL_UNITS:
                bad.append(unit)
    assert bad == []
    assert "/etc/systemd/system/cfn-hup.service" in template
    assert "codedeploy-agent" in template


def _agent_source() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "agent").rglob("*.py"))


def test_every_message_the_troubleshooting_doc_quotes_is_one_the_agent_prints():
    text = _text(ROOT / "docs" / "troubleshooting.md")
    source = _agent_source()
    quoted = [q for h in re.findall(r"^#{2,4} (.*)$", text, re.M)
              for q in re.findall(r"`([^`]+)`", h)]  # fmt: skip
    assert len(quoted) >= 30
    missing = []
    for q in quoted:
        for fragment in q.split("..."):
            fragment = fragment.strip(" ,;:()")
            if fragment and fragment not in source:
                missing.append((q, fragment))
    assert missing == []


def test_every_shell_block_of_the_operator_docs_parses_as_bash():
    bad = []
    for doc in OPERATOR_DOCS:
        for block in doc_blocks.doc_blocks(doc, ROOT):
            p = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
            if p.returncode != 0:
                bad.append((block.name, p.stderr.strip()))
    assert bad == []


# -- the template's parameter tables (cloudformation/README.md, "Parameters") --------------------

CFN_README = ROOT / "cloudformation" / "README.md"


def _parameter_rows(text: str) -> List[Tuple[str, str]]:
    """(name, default cell) of every row of the "## Parameters" section's tables."""
    section = text[text.index("\n## Parameters\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"^\| `([A-Za-z0-9]+)` \| ([^|]+?) \|", section, re.M)


def _shown_default(cell: str) -> object:
    """A default cell as the template would hold it: "required" (no Default) -> None,
    `""` -> "", `X` -> "X"."""
    if cell == "required":
        return None
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"a default cell is `VALUE` or required, got {cell!r}"
    return "" if m.group(1) == '""' else m.group(1)


def test_the_parameter_tables_are_the_templates_parameters_and_defaults(template):
    rows = _parameter_rows(_text(CFN_README))
    names = [name for name, _ in rows]
    params = template["Parameters"]
    assert sorted(set(params) - set(names)) == [], "template parameters missing from the tables"
    assert sorted(set(names) - set(params)) == [], "table rows that are not template parameters"
    assert len(names) == len(set(names)), "a parameter listed twice"
    wrong = []
    for name, cell in rows:
        default = params[name].get("Default")
        shown = _shown_default(cell)
        if (None if default is None else str(default)) != shown:
            wrong.append((name, shown, default))
    assert wrong == [], "(parameter, default shown, the template's default)"


def test_the_parameter_table_check_sees_a_wrong_default_and_a_missing_row():
    text = (
        "x\n## Parameters\n\n| parameter | default | what |\n|---|---|---|\n"
        "| `AirflowVersion` | `3.0.0` | v |\n| `VpcId` | required | v |\n"
        '| `AlarmTopicArn` | `""` | t |\n\n## Next\n| `Other` | `1` | outside |\n'
    )
    rows = _parameter_rows(text)
    assert rows == [("AirflowVersion", "`3.0.0`"), ("VpcId", "required"), ("AlarmTopicArn", '`""`')]
    assert [_shown_default(c) for _, c in rows] == ["3.0.0", None, ""]


# -- the stack-update helper (docs/operations.md, "Change a stack parameter") -------------------

FAKE_AWS = """#!/bin/sh
# a stand-in for the AWS CLI: records its argv, answers describe-stacks with three keys, and
# copies update-stack's parameters file (it is removed right after the call)
printf '%s\\n' "$*" >> "$FAKE_AWS_LOG"
case "$2" in
describe-stacks) echo '["VpcId", "FernetKey", "WorkerMaxSize"]' ;;
update-stack)
    for a in "$@"; do case "$a" in file://*) cp "${a#file://}" "$FAKE_AWS_PARAMS"
        stat -c %a "${a#file://}" > "$FAKE_AWS_PARAMS.mode" ;; esac; done ;;
wait) exit "${FAKE_AWS_WAIT_RC:-0}" ;;
esac
"""


def _helper_block() -> str:
    blocks = doc_blocks.doc_blocks(ROOT / "docs" / "operations.md", ROOT)
    (block,) = [b for b in blocks if "stack_update() {" in b.text]
    return block.text


def _run_helper(tmp_path: Path, call: str, wait_rc: int = 0) -> subprocess.CompletedProcess:
    (tmp_path / "bin").mkdir(exist_ok=True)
    aws = tmp_path / "bin" / "aws"
    aws.write_text(FAKE_AWS)
    aws.chmod(0o755)
    script = f"REGION=eu-west-1\nSTACK=s\n{_helper_block()}\n{call}\n"
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "FAKE_AWS_LOG": str(tmp_path / "argv.log"),
        "FAKE_AWS_PARAMS": str(tmp_path / "params.json"),
        "FAKE_AWS_WAIT_RC": str(wait_rc),
    }
    return subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_stack_update_helper_keeps_every_other_parameter_and_never_puts_a_secret_on_argv(
    tmp_path,
):
    (tmp_path / "key.txt").write_text("SECRETKEY=\n")
    p = _run_helper(tmp_path, "stack_update WorkerMaxSize=8 FernetKey=@key.txt")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "params.json").read_text()) == [
        {"ParameterKey": "VpcId", "UsePreviousValue": True},
        {"ParameterKey": "FernetKey", "ParameterValue": "SECRETKEY="},
        {"ParameterKey": "WorkerMaxSize", "ParameterValue": "8"},
    ]
    assert (tmp_path / "params.json.mode").read_text().strip() == "600"
    argv = (tmp_path / "argv.log").read_text()
    assert "SECRETKEY" not in argv and "--use-previous-template" in argv
    assert "wait stack-update-complete" in argv
    assert not (tmp_path / "stack-update-params.json").exists()  # removed after the call


def test_the_stack_update_helper_refuses_an_unknown_parameter_and_reports_a_failed_update(
    tmp_path,
):
    p = _run_helper(tmp_path, "stack_update WorkerMaxSise=8")
    assert p.returncode != 0 and "not a parameter of this stack: WorkerMaxSise" in p.stderr
    assert "update-stack" not in (tmp_path / "argv.log").read_text()
    assert not (tmp_path / "stack-update-params.json").exists()
    p = _run_helper(tmp_path, "stack_update WorkerMaxSize=8", wait_rc=255)
    assert p.returncode == 255


def test_the_push_check_sent_to_every_instance_is_the_one_shown_for_one_instance():
    blocks = doc_blocks.doc_blocks(ROOT / "docs" / "operations.md", ROOT)
    (one,) = [b for b in blocks if b.where == "sandbox" and "config_rev=" in b.text]
    (fleet,) = [b for b in blocks if "push-check.json" in b.text]
    assert one.text in fleet.text


# -- the status rows table (docs/operations.md, "Read the agent's view") ------------------------

OPERATIONS = ROOT / "docs" / "operations.md"
# the rows render() prints itself, around one row per registered document with a status key
STATUS_FIXED_ROWS = ("role", "env file", "config hash", "worker tasks", "units")


def _status_table_rows(text: str) -> List[str]:
    """The first cell (a code span: the title as `status` prints it) of every row of the table
    in the section "Read the agent's view", in order."""
    section = text[text.index("\n## Read the agent's view: `airflow-agent status`\n") :]
    section = section[: section.index("\n## ", 1)]
    table = section[section.index("| row | on | what it shows |") :].split("\n\n", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", table, re.M)


def _printed_titles() -> List[str]:
    """The title of every row `status` can print, in its order: render() with every shown
    document, the worker's tasks and systemd unreachable (its `units` row)."""
    s: Dict[str, object] = {
        "role": "worker",
        "env_file": {"path": "/e", "sha256": "a" * 64, "error": None, "synced_sha256": None},
        "config": {
            "current_hash": "b" * 64,
            "applied_hash": None,
            "in_sync": False,
            "last_result": None,
            "last_error": None,
            "hash_error": None,
            "held": {},
        },
        "worker_tasks": {"running": 0, "error": None, "tasks": [], "source": "cgroup"},
        "systemd": {"reachable": False, "error": "no bus"},
        "units": {},
    }
    for entry in state.registered():
        if entry.status_key:
            s[entry.status_key] = {"some_field": 1}
    # a title is words with single spaces, padded to the longest, then two spaces
    return [re.match(r"(\S+(?: \S+)*)  ", line).group(1) for line in render(s).splitlines()]


def _status_titles() -> Set[str]:
    """The registry's titles (every document with a status key) and render()'s own rows."""
    return {e.title for e in state.registered() if e.status_key} | set(STATUS_FIXED_ROWS)


def _status_table_problems(rows: List[str], printed: List[str]) -> List[str]:
    problems = [f"missing from the table: {t}" for t in printed if t not in rows]
    problems += [f"status never prints: {t}" for t in rows if t not in printed]
    problems += [f"listed twice: {t}" for t in sorted({t for t in rows if rows.count(t) > 1})]
    if not problems and rows != printed:
        problems.append(f"not in the order status prints them: {', '.join(printed)}")
    return problems


def test_the_status_table_lists_exactly_the_rows_status_prints():
    printed = _printed_titles()
    assert len(printed) == len(set(printed)), printed
    # render() prints the registry's rows and its own, nothing else
    assert set(printed) == _status_titles()
    assert _status_table_problems(_status_table_rows(_text(OPERATIONS)), printed) == []


def test_the_status_table_check_sees_a_new_job_a_missing_and_an_unknown_row(monkeypatch):
    rows = _status_table_rows(_text(OPERATIONS))
    printed = _printed_titles()
    # a job registered tomorrow with a status row fails the check until the table names it
    monkeypatch.setattr(state, "_REGISTRY", dict(state._REGISTRY))
    monkeypatch.setattr(state, "_BY_TYPE", dict(state._BY_TYPE))

    class BackupDoc:
        name = "backup-check"
        version = 1

        @classmethod
        def from_dict(cls, data):
            return cls()

        def to_dict(self):
            return {}

    state.register(BackupDoc, status_key="backup", title="backup check")
    assert "backup check" in _status_titles()
    assert _status_table_problems(rows, _printed_titles()) == [
        "missing from the table: backup check"
    ]
    # a row dropped, a row misnamed
    text = (
        "x\n## Read the agent's view: `airflow-agent status`\n\n"
        "| row | on | what it shows | when it looks wrong |\n|---|---|---|---|\n"
        "| `role` | every role | r | - |\n| `drains` | worker | d | - |\n\n"
        "| `env file` | not the table | - | - |\n## Next\n"
    )
    assert _status_table_rows(text) == ["role", "drains"]
    problems = _status_table_problems(["role", "drains"], printed)
    assert "missing from the table: env file" in problems
    assert "status never prints: drains" in problems
    swapped = [printed[1], printed[0], *printed[2:]]
    assert _status_table_problems(swapped, printed)[0].startswith("not in the order")


def test_every_block_of_the_readme_quick_start_is_marked_as_needing_an_account():
    # the quick start is the AWS path; the sandbox's is docs/sandbox.md, whose blocks run
    text = doc_blocks.section_only(_text(README), doc_blocks.QUICK_START)
    blocks = doc_blocks.parse_blocks(text, "README.md")
    assert len(blocks) >= 2 and {b.where for b in blocks} == {doc_blocks.AWS_ACCOUNT}
    assert _label_problems(text, "README.md") == []


def test_the_block_listing_names_every_block_and_counts_them(capsys):
    doc_blocks.main()
    out = capsys.readouterr().out.splitlines()
    blocks = doc_blocks.all_blocks(ROOT)
    assert [ln.split()[0] for ln in out[:-1]] == [b.name for b in blocks]
    local = sum(b.where == doc_blocks.LOCAL for b in blocks)
    assert f"{local} on this machine" in out[-1]
