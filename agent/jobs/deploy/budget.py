"""Does a worker's drain fit in the time CodeDeploy gives ApplicationStop? (pure)

CodeDeploy kills a hook at its appspec `timeout` (at most 3600 s) and fails the deployment
with no word from the agent. A worker's ApplicationStop drain may take `drain.timeout` (its
deadline, counted from the drain's start) and then `drain.stop_timeout` for the idle worker's
`systemctl stop`; START_MARGIN covers the agent starting, reading its state and logging. When
that sum exceeds the hook's timeout, CodeDeploy's kill, not the drain's own deadline, would end
a slow drain: the hook refuses to start such a drain (agent.jobs.deploy.hook), and
tests/test_deploy_budget.py checks the shipped appspec against the template's largest
DrainTimeout and the config defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import yaml

from agent.errors import ConfigError

CODEDEPLOY_MAX_TIMEOUT = 3600.0  # CodeDeploy's limit per lifecycle event (and its default)
START_MARGIN = 60.0
# the CodeDeploy agent's default :root_dir on Linux
DEPLOYMENT_ROOT = "/opt/codedeploy-agent/deployment-root"


def find_stop_appspec(environ: Dict[str, str], root: str = DEPLOYMENT_ROOT) -> Optional[str]:
    """The appspec whose ApplicationStop runs, for hook scripts that do not pass --appspec:
    CodeDeploy runs ApplicationStop from the last successful revision, whose deployment
    directory it records in deployment-instructions/<DEPLOYMENT_GROUP_ID>_last_successful_install.
    None when that is not known (no group id, no record, no appspec there)."""
    group = environ.get("DEPLOYMENT_GROUP_ID", "")
    if not group or "/" in group or group.startswith("."):
        return None
    record = Path(root) / "deployment-instructions" / f"{group}_last_successful_install"
    try:
        deployment_dir = record.read_text().strip()
    except OSError:
        return None
    appspec = Path(deployment_dir) / "deployment-archive" / "appspec.yml"
    return str(appspec) if deployment_dir and appspec.is_file() else None


def hook_timeout(appspec_text: str, event: str, where: str = "appspec.yml") -> float:
    """The effective timeout of `event`'s hooks in an appspec: the sum of its scripts'
    timeouts (CodeDeploy runs them one after another), each defaulting to and capped at 3600."""
    try:
        doc = yaml.safe_load(appspec_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not YAML: {str(exc).splitlines()[0]}") from None
    hooks = doc.get("hooks") if isinstance(doc, dict) else None
    scripts = hooks.get(event) if isinstance(hooks, dict) else None
    if not isinstance(scripts, list) or not scripts:
        raise ConfigError(f"{where}: no hooks.{event} scripts")
    total = 0.0
    for i, script in enumerate(scripts):
        raw = script.get("timeout", CODEDEPLOY_MAX_TIMEOUT) if isinstance(script, dict) else None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: hooks.{event}[{i}].timeout is not a number") from None
        if value <= 0:
            raise ConfigError(f"{where}: hooks.{event}[{i}].timeout must be positive")
        total += min(value, CODEDEPLOY_MAX_TIMEOUT)
    return total


def stop_budget(drain_timeout: float, stop_timeout: float) -> float:
    """The longest a worker's ApplicationStop may take: drain deadline, stop, start margin."""
    return float(drain_timeout) + float(stop_timeout) + START_MARGIN


def over_budget(drain_timeout: float, stop_timeout: float, limit: float) -> Optional[str]:
    """None when the drain fits in `limit` seconds, else why it does not (one line)."""
    need = stop_budget(drain_timeout, stop_timeout)
    if need <= limit:
        return None
    return (
        f"drain.timeout {drain_timeout:g}s + drain.stop_timeout {stop_timeout:g}s + "
        f"{START_MARGIN:g}s to start = {need:g}s exceeds ApplicationStop's {limit:g}s: "
        f"lower drain.timeout to at most {limit - stop_timeout - START_MARGIN:g}s"
    )


def check_appspec(cfg, appspec: str) -> str:
    """Read `appspec` and raise ConfigError when cfg's drain does not fit its ApplicationStop
    timeout (nothing is drained then); else a line for the log."""
    try:
        text = Path(appspec).read_text()
    except OSError as exc:
        raise ConfigError(f"--appspec {appspec}: {exc.strerror or exc}") from None
    limit = hook_timeout(text, "ApplicationStop", appspec)
    why = over_budget(cfg.drain.timeout, cfg.drain.stop_timeout, limit)
    if why:
        raise ConfigError(f"drain not started: {why} ({appspec})")
    need = stop_budget(cfg.drain.timeout, cfg.drain.stop_timeout)
    return f"{need:g}s of {limit:g}s ({appspec})"
