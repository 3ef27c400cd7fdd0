"""The sandbox's cfn-init (sandbox/stack/cfn_init_apply.py) on its own, without a test host.

- An Init key the sandbox does not implement is refused, naming it (issue 11's acceptance), for
  the real template's Init with one key added, before anything is applied.
- Files: content, JSON content, base64, mode, owner/group, 120xxx symlinks, what counts as a
  change (the services' restart trigger).
- Commands: sorted by key, `test` skips, `env` replaces the environment, `cwd`, ignoreErrors,
  a failure stops the run.
- Substitutions: each network install of the template is replaced; a command that still
  downloads is refused by name; another Airflow version than the prebuilt venv's is refused.
Files are written under a temporary root (the applier's `root`); commands are harmless
shell run in temporary directories.
"""

from __future__ import annotations

import copy
import os
import pwd
from pathlib import Path
from typing import Any, Dict

import pytest

from sandbox.cfn_init import UnsupportedInitKey, check_init, init_problems
from sandbox.stack import substitutions as subst
from sandbox.stack.cfn_init_apply import Applier, InitFailed
from sandbox.stack.model import StackModel

REPO = Path(__file__).resolve().parents[1]
CONTEXT = {"wheelhouse": "/wh", "airflow_venv": "/venvs/airflow", "airflow_version": "3.3.2"}


@pytest.fixture(scope="module")
def init() -> Dict[str, Any]:
    return StackModel.load().init_metadata("worker")


def test_the_templates_init_is_accepted(init: Dict[str, Any]) -> None:
    assert init_problems(init) == []
    check_init(init)


def _first(init: Dict[str, Any], kind: str) -> tuple:
    """(config, kind, name[, name]) of the first item of that kind in the Init (the template
    moves things between configs; the test follows)."""
    for config, body in init.items():
        if config != "configSets" and body.get(kind):
            if kind == "services":
                manager, services = next(iter(body[kind].items()))
                return (config, kind, manager, next(iter(services)))
            return (config, kind, next(iter(body[kind])))
    raise AssertionError(f"the template's Init has no {kind}")


@pytest.mark.parametrize(
    "kind, key",
    [
        ("", "users"),
        ("", "sources"),
        ("files", "context"),
        ("commands", "runas"),
        ("services", "packages"),
    ],
)
def test_an_unimplemented_key_is_refused_by_name(init: Dict[str, Any], kind: str, key: str) -> None:
    changed = copy.deepcopy(init)
    where = _first(init, kind) if kind else ("configure",)
    node = changed
    for part in where:
        node = node[part]
    node[key] = {"x": "y"}
    with pytest.raises(UnsupportedInitKey) as err:
        Applier(changed, CONTEXT, root="/nonexistent")
    assert ".".join(where + (key,)) in str(err.value)


def test_an_unknown_service_manager_and_package_manager_are_refused(
    init: Dict[str, Any],
) -> None:
    changed = copy.deepcopy(init)
    changed["start"].setdefault("services", {})["upstart"] = {"x": {}}
    changed["install"]["packages"]["msi"] = {"x": "http://example.invalid/x.msi"}
    problems = init_problems(changed)
    assert any(p.startswith("start.services.upstart:") for p in problems)
    assert any(p.startswith("install.packages.msi:") for p in problems)


def test_files_are_written_as_cfn_init_does(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    init = {
        "configSets": {"a": ["c"]},
        "c": {
            "files": {
                "/etc/x/plain": {
                    "content": "hello\n",
                    "mode": "000640",
                    "owner": "nobody",
                    "group": "root",
                },
                "/etc/x/json": {"content": {"k": [1, 2]}},
                "/etc/x/b64": {"content": "aGk=", "encoding": "base64", "mode": "000400"},
                "/etc/x/link": {"content": "/etc/x/plain", "mode": "120644"},
            }
        },
    }
    a = Applier(init, CONTEXT, root=str(tmp_path))
    a.apply_configsets(["a"])
    st = os.stat(tmp_path / "etc/x/plain")
    assert (tmp_path / "etc/x/plain").read_text() == "hello\n"
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, nobody.pw_uid, 0)
    assert (tmp_path / "etc/x/json").read_text() == '{"k": [1, 2]}'
    assert (tmp_path / "etc/x/b64").read_bytes() == b"hi"
    assert os.stat(tmp_path / "etc/x/b64").st_mode & 0o7777 == 0o400
    assert os.readlink(tmp_path / "etc/x/link") == "/etc/x/plain"
    assert os.stat(tmp_path / "etc/x").st_mode & 0o777 == 0o755
    assert a.changed_files == set(init["c"]["files"])
    # a second run changes nothing; a new mode or content is a change
    a.apply_configsets(["a"])
    assert a.changed_files == set()
    init["c"]["files"]["/etc/x/plain"]["mode"] = "000600"
    init["c"]["files"]["/etc/x/json"]["content"] = {"k": 3}
    a.apply_configsets(["a"])
    assert a.changed_files == {"/etc/x/plain", "/etc/x/json"}


def test_an_unknown_owner_fails_the_run(tmp_path: Path) -> None:
    init = {"c": {"files": {"/f": {"content": "x", "owner": "no-such-user-aea"}}}}
    with pytest.raises(InitFailed, match="user no-such-user-aea does not exist"):
        Applier(init, CONTEXT, root=str(tmp_path)).apply_config("c")


def test_commands_run_in_key_order_with_test_env_cwd(tmp_path: Path) -> None:
    out = tmp_path / "out"
    init = {
        "c": {
            "commands": {
                "20-second": {"command": f"echo second >> {out}"},
                "10-first": {
                    "command": f"echo first-$AEA_X-$(pwd) >> {out}",
                    "env": {"AEA_X": "y"},
                    "cwd": str(tmp_path),
                },
                "15-skipped": {"command": f"echo skipped >> {out}", "test": "exit 3"},
                "16-tested": {
                    "command": ["sh", "-c", f"echo tested >> {out}"],
                    "test": 'test -n "$HOME"',
                },
                "17-env-replaced": {"command": f"echo home=$HOME >> {out}", "env": {"A": "1"}},
                "18-fails-ok": {
                    "command": "exit 4",
                    "ignoreErrors": "true",
                    "waitAfterCompletion": 0,
                },
            }
        }
    }
    a = Applier(init, CONTEXT, root=str(tmp_path))
    a.apply_config("c")
    assert out.read_text().splitlines() == [f"first-y-{tmp_path}", "tested", "home=", "second"]
    assert a.ran_commands == {
        "10-first",
        "16-tested",
        "17-env-replaced",
        "18-fails-ok",
        "20-second",
    }


def test_a_failing_command_stops_the_run(tmp_path: Path) -> None:
    init = {
        "c": {
            "commands": {
                "1": {"command": "echo boom; exit 5"},
                "2": {"command": f"touch {tmp_path}/ran"},
            }
        }
    }
    with pytest.raises(InitFailed, match=r"command 1 failed \(rc 5\):\nboom"):
        Applier(init, CONTEXT, root=str(tmp_path)).apply_config("c")
    assert not (tmp_path / "ran").exists()


def test_every_network_install_of_the_template_is_substituted(init: Dict[str, Any]) -> None:
    seen = set()
    for config, body in init.items():
        for key, spec in (body.get("commands") or {}).items() if config != "configSets" else ():
            cmd, used = subst.substitute_command(spec["command"], CONTEXT)
            assert subst.network_use(cmd) is None, (key, cmd)
            seen.update(used)
    assert seen == {s.name for s in subst.COMMANDS}
    cmd, _ = subst.substitute_command(
        init["install"]["commands"]["10-agent-venv"]["command"], CONTEXT
    )
    # the rest of the command runs as written
    assert cmd.startswith("python3.11 -m venv /opt/airflow-agent/venv && ")
    assert '--no-index --find-links /wh "airflow-ec2-agent"' in cmd
    assert cmd.endswith(
        "ln -sfn /opt/airflow-agent/venv/bin/airflow-agent /usr/local/bin/airflow-agent"
    )
    cmd, _ = subst.substitute_command(
        init["worker"]["commands"]["10-agent-worker-extra"]["command"], CONTEXT
    )
    assert cmd.endswith('--find-links /wh "airflow-ec2-agent[worker]"')
    for manager, pkgs in init["install"]["packages"].items():
        for pkg in pkgs:
            assert subst.package_why(manager, pkg)


def test_a_download_without_substitution_and_another_airflow_are_refused(
    init: Dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(subst.SubstitutionError, match="'curl'"):
        subst.substitute_command("curl -fsS https://example.invalid/x | sh", CONTEXT)
    with pytest.raises(subst.SubstitutionError, match="pip install"):
        subst.substitute_command("pip install requests", CONTEXT)
    airflow = init["install"]["commands"]["30-airflow-venv"]["command"]
    with pytest.raises(subst.SubstitutionError, match="Airflow 3.3.2, the prebuilt venv has 3.1"):
        subst.substitute_command(airflow, dict(CONTEXT, airflow_version="3.1"))
    bad = {"c": {"commands": {"05-fetch": {"command": "wget http://example.invalid/a"}}}}
    with pytest.raises(InitFailed, match="config c, command 05-fetch: reaches the network"):
        Applier(bad, CONTEXT, root=str(tmp_path)).apply_config("c")
    with pytest.raises(subst.SubstitutionError, match="yum:gcc has no sandbox stand-in"):
        Applier(
            {"c": {"packages": {"yum": {"gcc": []}}}}, CONTEXT, root=str(tmp_path)
        ).apply_config("c")


def test_a_template_copy_with_an_unimplemented_init_key_is_refused(tmp_path: Path) -> None:
    """Issue 11's acceptance, on a copy of the template: the Init the launch would apply
    (the model's, as `up` and Instance.start() check it before booting) is refused, naming
    the key; the unchanged template passes."""
    text = (REPO / "cloudformation" / "airflow-cluster.yaml").read_text()
    marker = "\n        configure:\n"
    assert text.count(marker) == 1
    copy_path = tmp_path / "airflow-cluster.yaml"
    copy_path.write_text(
        text.replace(marker, marker + "          users:\n            aea-extra: {groups: [x]}\n")
    )
    with pytest.raises(UnsupportedInitKey, match=r"configure\.users: config key not implemented"):
        check_init(StackModel.load(copy_path).init_metadata("worker"))
    check_init(StackModel.load().init_metadata("worker"))
