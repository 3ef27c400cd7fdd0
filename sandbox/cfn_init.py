"""What cfn-init does with an `AWS::CloudFormation::Init` configSet, for tests.

The template keeps one Init (on `InstanceConfig`) for the three roles; each role's instance
runs the configSet named after it, cfn-hup runs `update`. These helpers follow aws-cfn-bootstrap's
rules so a test can ask what an instance of a role ends up with:

- `configset_configs(init, name)`: the config keys a configSet runs, in order, with
  `{"ConfigSet": name}` references expanded (cfn-init refuses unknown names and cycles).
- `configset_files(init, name)`: every file the configSet writes, path -> (config, attributes);
  a later config writing the same path wins, as on disk.
- `configset_commands(init, name)`: every command in run order (configs in order; within a
  config, commands sorted by key, after its files).
- `write_files(files, root, resolve)`: the files written under `root` as cfn-init writes them;
  a mode of 120xxx makes a symbolic link whose target is the content (re-rooted here).
- `check_init(init)`: refuse, by name, every key of the Init that the sandbox's cfn-init
  (sandbox/stack/cfn_init_apply.py) does not implement, so a template change it cannot apply
  fails loudly before anything boots (`UnsupportedInitKey`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

CONFIGSETS = "configSets"

# What sandbox/stack/cfn_init_apply.py implements, as cfn-init 2.0 does; every other key is
# refused by name. Config keys are processed in cfn-init's order (ORDER); users, groups and
# sources are not used by the template, so they are refused rather than half-done.
ORDER = ("packages", "files", "commands", "services")
FILE_KEYS = frozenset({"content", "mode", "owner", "group", "encoding"})
COMMAND_KEYS = frozenset({"command", "env", "cwd", "test", "ignoreErrors", "waitAfterCompletion"})
SERVICE_MANAGERS = frozenset({"sysvinit", "systemd"})
SERVICE_KEYS = frozenset({"enabled", "ensureRunning", "files", "commands"})
PACKAGE_MANAGERS = frozenset({"yum", "rpm", "apt", "python", "rubygems"})
ENCODINGS = ("plain", "base64")


class UnsupportedInitKey(ValueError):
    """The Init uses something the sandbox's cfn-init does not implement; names it."""


def configset_configs(
    init: Dict[str, Any], name: str, _seen: Optional[Tuple[str, ...]] = None
) -> List[str]:
    """The config keys configSet `name` runs, in order."""
    seen = _seen or ()
    if name in seen:
        raise ValueError(f"configSet cycle: {' -> '.join(seen + (name,))}")
    sets = init.get(CONFIGSETS, {})
    if name not in sets:
        raise KeyError(f"no configSet named {name}")
    items = sets[name]
    out: List[str] = []
    for item in [items] if isinstance(items, (str, dict)) else items:
        if isinstance(item, dict):
            if set(item) != {"ConfigSet"}:
                raise ValueError(f"configSet {name}: {item} is neither a config nor a reference")
            out += configset_configs(init, item["ConfigSet"], seen + (name,))
        elif item not in init or item == CONFIGSETS:
            raise KeyError(f"configSet {name} names no config {item!r}")
        else:
            out.append(item)
    return out


def is_symlink(attribs: Dict[str, Any]) -> bool:
    return "mode" in attribs and stat.S_ISLNK(int(str(attribs["mode"]), 8))


def configset_files(init: Dict[str, Any], name: str) -> Dict[str, Tuple[str, Dict[str, Any]]]:
    files: Dict[str, Tuple[str, Dict[str, Any]]] = {}
    for config in configset_configs(init, name):
        for path, attribs in sorted(init[config].get("files", {}).items()):
            files[path] = (config, attribs)
    return files


def configset_commands(init: Dict[str, Any], name: str) -> List[Tuple[str, str, Any]]:
    """(config, command key, command) in the order cfn-init runs them."""
    return [
        (config, key, spec["command"])
        for config in configset_configs(init, name)
        for key, spec in sorted(init[config].get("commands", {}).items())
    ]


def write_files(
    files: Dict[str, Tuple[str, Dict[str, Any]]], root: Path, resolve: Callable[[Any], Any]
) -> None:
    """Write `files` (from `configset_files`) under `root`; ownership is left alone."""
    for path, (_config, attribs) in sorted(files.items()):
        dest = Path(str(root) + path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        content = resolve(attribs.get("content", ""))
        if is_symlink(attribs):
            target = str(root) + content
            if dest.is_symlink() and os.readlink(dest) == target:
                continue  # cfn-init leaves a link that already points there
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            os.symlink(target, dest)
            continue
        if dest.is_symlink():
            dest.unlink()
        dest.write_text(content, encoding="utf-8")
        if "mode" in attribs:
            dest.chmod(stat.S_IMODE(int(str(attribs["mode"]), 8)))


def check_init(init: Dict[str, Any]) -> None:
    """Raise UnsupportedInitKey naming the first key (as a path) the sandbox cannot apply."""
    problems = init_problems(init)
    if problems:
        raise UnsupportedInitKey(
            "AWS::CloudFormation::Init uses what the sandbox's cfn-init does not implement: "
            + "; ".join(problems)
        )


def init_problems(init: Dict[str, Any]) -> List[str]:
    """Every unsupported key of the Init, as 'config.key[.sub...]: why'."""
    out: List[str] = []
    for name in init.get(CONFIGSETS, {}):
        configset_configs(init, name)  # unknown names and cycles raise here
    for config, body in init.items():
        if config == CONFIGSETS:
            continue
        if not isinstance(body, dict):
            out.append(f"{config}: a config must be a mapping")
            continue
        for key in body:
            if key not in ORDER:
                out.append(f"{config}.{key}: config key not implemented")
        for path, attrs in (body.get("files") or {}).items():
            for k in set(attrs) - FILE_KEYS:
                out.append(f"{config}.files.{path}.{k}: file attribute not implemented")
            if str(attrs.get("encoding", "plain")) not in ENCODINGS:
                out.append(f"{config}.files.{path}.encoding: {attrs['encoding']!r}")
        for key, spec in (body.get("commands") or {}).items():
            for k in set(spec) - COMMAND_KEYS:
                out.append(f"{config}.commands.{key}.{k}: command attribute not implemented")
            if "command" not in spec:
                out.append(f"{config}.commands.{key}: no command")
        for manager, services in (body.get("services") or {}).items():
            if manager not in SERVICE_MANAGERS:
                out.append(f"{config}.services.{manager}: service manager not implemented")
                continue
            for svc, spec in services.items():
                for k in set(spec) - SERVICE_KEYS:
                    out.append(f"{config}.services.{manager}.{svc}.{k}: not implemented")
        for manager in body.get("packages") or {}:
            if manager not in PACKAGE_MANAGERS:
                out.append(f"{config}.packages.{manager}: package manager not implemented")
    return out
