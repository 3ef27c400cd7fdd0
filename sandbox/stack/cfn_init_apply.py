"""The sandbox's cfn-init: applies an `AWS::CloudFormation::Init` configSet on the instance it
runs on, as aws-cfn-bootstrap 2.0's cfn-init does, for the subset the template uses.

Installed in every test host as /opt/aws/bin/cfn-init (sandbox/stack/instance.py), so the
template's UserData and its cfn-hup hook call it with their own arguments
(`-v --stack S --resource R --configsets A,B --region X`). The stack's resolved metadata comes
from substitutions.METADATA_FILE, written by the supervisor, instead of DescribeStackResource.

What it does, in cfn-init's order within each config (configSets expanded by
sandbox/cfn_init.py; anything else refused by name there, before anything is applied):
- packages: none installed; each must have a stand-in in substitutions.PACKAGES;
- files: content (strings as written, mappings/lists as JSON), encoding plain/base64, mode
  (120xxx: a symbolic link to the content), owner, group; parents made 0755;
- commands: sorted by key; `test` first (a non-zero exit skips the command); `env` replaces
  the environment, `cwd`; a failure ends the run unless `ignoreErrors`; strings run with
  /bin/sh, lists without a shell; network installs replaced per substitutions.COMMANDS;
  `waitAfterCompletion` is Windows-only and ignored, as on Linux;
- services (sysvinit/systemd, both through systemctl): `enabled` enables/disables,
  `ensureRunning` starts/stops; a running service is restarted when one of its `files` was
  changed or one of its `commands` ran in the same config (cfn-init tracks changes per config).
Logs go to /var/log/cfn-init.log and /var/log/cfn-init-cmd.log, as cfn-init's do.

Stdlib only (runs with the host's /usr/bin/python3).
"""

from __future__ import annotations

import argparse
import base64
import grp
import json
import os
import pwd
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Set

from sandbox.cfn_init import check_init, configset_configs, is_symlink
from sandbox.stack import substitutions as subst

LOG = "/var/log/cfn-init.log"
CMD_LOG = "/var/log/cfn-init-cmd.log"


class InitFailed(RuntimeError):
    """A step of the configSet failed; cfn-init exits non-zero."""


def _private_append(path: str) -> Any:
    """Open a log for appending, created 0600: command output can hold what a command read."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a")


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() == "true"


class Applier:
    """Applies configs to the root filesystem it runs in (an instance), logging as cfn-init."""

    def __init__(self, init: Dict[str, Any], context: Dict[str, str], root: str = "") -> None:
        check_init(init)
        self.init = init
        self.context = context
        self.root = root  # "" on an instance; a directory in the fast tests (files only)
        self.changed_files: Set[str] = set()
        self.ran_commands: Set[str] = set()

    def log(self, msg: str, cmd: bool = False) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')},000 [INFO] {msg}\n"
        sys.stderr.write(line)
        for path in (LOG, CMD_LOG) if cmd else (LOG,):
            try:
                with _private_append(self.root + path) as f:
                    f.write(line)
            except OSError:
                pass

    # -- configSets ------------------------------------------------------------------------

    def apply_configsets(self, names: Sequence[str]) -> List[str]:
        configs = [c for n in names for c in configset_configs(self.init, n)]
        self.log(f"Running configSets: {', '.join(names)} -> configs {configs}")
        for config in configs:
            self.apply_config(config)
        return configs

    def apply_config(self, name: str) -> None:
        body = self.init[name]
        self.log(f"Running config {name}")
        self.changed_files, self.ran_commands = set(), set()
        for manager, packages in sorted((body.get("packages") or {}).items()):
            for pkg in sorted(packages):
                self.log(
                    f"package {manager}:{pkg} not installed: {subst.package_why(manager, pkg)}"
                )
        for path, attrs in sorted((body.get("files") or {}).items()):
            if self.write_file(path, attrs):
                self.changed_files.add(path)
        for key, spec in sorted((body.get("commands") or {}).items()):
            if self.run_command(name, key, spec):
                self.ran_commands.add(key)
        for manager, services in sorted((body.get("services") or {}).items()):
            for svc, spec in sorted(services.items()):
                self.service(manager, svc, spec)

    # -- files -----------------------------------------------------------------------------

    def write_file(self, path: str, attrs: Dict[str, Any]) -> bool:
        """Write one file as cfn-init does; True when its content, mode or owner changed."""
        dest = self.root + path
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        content = attrs.get("content", "")
        if not isinstance(content, str):
            content = json.dumps(content)
        uid, gid = self._owner(attrs)
        if is_symlink(attrs):
            if os.path.islink(dest) and os.readlink(dest) == content:
                self.log(f"Symlink {path} already points to {content}")
                return False
            if os.path.lexists(dest):
                os.unlink(dest)
            os.symlink(content, dest)
            os.lchown(dest, uid, gid)
            self.log(f"Symlink {path} -> {content}")
            return True
        if str(attrs.get("encoding", "plain")) == "base64":
            data = base64.b64decode(content)
        else:
            data = content.encode("utf-8")
        mode = int(str(attrs.get("mode", "000644")), 8) & 0o7777
        before = self._stat(dest)
        old = None
        if before is not None and not os.path.islink(dest):
            with open(dest, "rb") as f:
                old = f.read()
        tmp = f"{dest}.cfn-init.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
        changed = old != data or before != (mode, uid, gid)
        self.log(f"Writing file {path} (mode {mode:o}, {uid}:{gid}, changed {changed})")
        return changed

    @staticmethod
    def _stat(path: str) -> Optional[tuple]:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        return (st.st_mode & 0o7777, st.st_uid, st.st_gid)

    @staticmethod
    def _owner(attrs: Dict[str, Any]) -> tuple:
        def look(value: Any, by_name: Any, kind: str) -> int:
            if value is None:
                return 0  # cfn-init leaves root, which runs it, as the owner
            text = str(value)
            if text.isdigit():
                return int(text)
            try:
                return by_name(text)
            except KeyError:
                raise InitFailed(f"{kind} {text} does not exist") from None

        uid = look(attrs.get("owner"), lambda n: pwd.getpwnam(n).pw_uid, "user")
        gid = look(attrs.get("group"), lambda n: grp.getgrnam(n).gr_gid, "group")
        return uid, gid

    # -- commands --------------------------------------------------------------------------

    def run_command(self, config: str, key: str, spec: Dict[str, Any]) -> bool:
        """Run one command; True when it ran (its test passed)."""
        cmd = spec["command"]
        try:
            if isinstance(cmd, str):
                cmd, used = subst.substitute_command(cmd, self.context)
                for name in used:
                    self.log(f"Command {key}: sandbox substitution '{name}'")
            else:
                cmd = [str(a) for a in cmd]
                bad = subst.network_use(" ".join(cmd))
                if bad:
                    raise subst.SubstitutionError(f"reaches the network ({bad!r})")
        except subst.SubstitutionError as exc:
            raise InitFailed(f"config {config}, command {key}: {exc}") from exc
        env = {str(k): str(v) for k, v in spec["env"].items()} if "env" in spec else None
        cwd = spec.get("cwd")
        if "test" in spec:
            test = spec["test"]
            t = subprocess.run(
                test, shell=isinstance(test, str), env=env, cwd=cwd, capture_output=True, text=True
            )
            self.log(f"Test for Command {key}: rc {t.returncode}\n{t.stdout}{t.stderr}", cmd=True)
            if t.returncode != 0:
                self.log(f"Test failed with code {t.returncode}: skipping command {key}")
                return False
        p = subprocess.run(
            cmd, shell=isinstance(cmd, str), env=env, cwd=cwd, capture_output=True, text=True
        )
        self.log(f"Command {key} rc {p.returncode}\n{p.stdout}{p.stderr}", cmd=True)
        if p.returncode != 0:
            if _truthy(spec.get("ignoreErrors", False)):
                self.log(f"Command {key} failed; ignoreErrors is set")
            else:
                raise InitFailed(
                    f"config {config}, command {key} failed (rc {p.returncode}):\n"
                    f"{(p.stdout + p.stderr)[-3000:]}"
                )
        return True

    # -- services --------------------------------------------------------------------------

    def service(self, manager: str, svc: str, spec: Dict[str, Any]) -> None:
        unit = svc if "." in svc else f"{svc}.service"
        if "enabled" in spec:
            verb = "enable" if _truthy(spec["enabled"]) else "disable"
            self._systemctl(verb, unit)
        if "ensureRunning" not in spec:
            return
        active = self._systemctl("is-active", "--quiet", unit, check=False) == 0
        if not _truthy(spec["ensureRunning"]):
            if active:
                self._systemctl("stop", unit)
            return
        files = set(spec.get("files") or []) & self.changed_files
        commands = set(spec.get("commands") or []) & self.ran_commands
        if not active:
            self._systemctl("start", unit)
        elif files or commands:
            self.log(f"Restarting {unit}: changed {sorted(files | commands)}")
            self._systemctl("restart", unit)

    def _systemctl(self, *args: str, check: bool = True) -> int:
        p = subprocess.run(["systemctl", *args], capture_output=True, text=True)
        self.log(f"systemctl {' '.join(args)}: rc {p.returncode} {p.stderr.strip()}")
        if check and p.returncode != 0:
            raise InitFailed(f"systemctl {' '.join(args)} failed: {p.stderr.strip()}")
        return p.returncode


def load_metadata(stack: str, resource: str) -> Dict[str, Any]:
    with open(subst.METADATA_FILE, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("stack") not in (stack, doc.get("stack_id")):
        raise InitFailed(f"stack {stack} is not {doc.get('stack')}")
    try:
        return doc["resources"][resource]["Metadata"]["AWS::CloudFormation::Init"]
    except KeyError:
        raise InitFailed(f"resource {resource} has no AWS::CloudFormation::Init") from None


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="cfn-init", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("-s", "--stack", required=True)
    ap.add_argument("-r", "--resource", required=True)
    ap.add_argument("-c", "--configsets", default="default")
    ap.add_argument("--region")
    args = ap.parse_args(argv)
    try:
        init = load_metadata(args.stack, args.resource)
        with open(subst.CONTEXT_FILE, encoding="utf-8") as f:
            context = json.load(f)
        Applier(init, context).apply_configsets(args.configsets.split(","))
    except (InitFailed, OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"cfn-init: Error occurred during build: {exc}\n")
        with _private_append(LOG) as f:
            f.write(f"[ERROR] Error occurred during build: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
