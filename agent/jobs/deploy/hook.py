"""`airflow-agent deploy-hook [EVENT]`: one CodeDeploy lifecycle event for this instance's role.

`codedeploy/appspec.yml` runs thin scripts that `exec` this command; EVENT defaults to
$LIFECYCLE_EVENT, which the CodeDeploy agent sets (with DEPLOYMENT_ID, APPLICATION_NAME,
DEPLOYMENT_GROUP_NAME). What each event does, per role (`plan_hook` is the table):

| event            | worker                                  | scheduler / webserver           |
|------------------|-----------------------------------------|---------------------------------|
| ApplicationStop  | drain (jobs.drain.drainer): no task killed | nothing: units keep running  |
| BeforeInstall    | clear `__pycache__` under dags/plugins   | same; snapshot the tree's hashes |
| AfterInstall     | chown the tree; DAG import check         | same                            |
| ApplicationStart | write the revision marker; undrain/start | marker; restart a unit only if  |
|                  |                                         | the bundle changed what it loads |
| ValidateService  | unit active + answers a Celery ping      | units active + scheduler job /  |
|                  | and consumes at least one queue         | api-server health URL           |

The scheduler and webserver roles' units are not stopped for a deployment: Airflow 3's
scheduler and api-server do not read DAG files, and every running task calls the api-server's
execution API for its whole life. ApplicationStart restarts one only when plugins, config or
requirements changed (agent.jobs.deploy.units, agent.jobs.deploy.content).

BeforeInstall clears the `__pycache__` directories Python wrote next to the previous
revision's DAGs and plugins: they are not CodeDeploy's files, so its cleanup leaves them and
the directories that hold them behind, and stale bytecode must not shadow the new sources.
(Files CodeDeploy did not install that the bundle also contains are handled by the appspec's
`file_exists_behavior: OVERWRITE`.)

Root does these file operations in a tree the `airflow` user controls, so they go through
directory descriptors and never follow a symlink out of AIRFLOW_HOME (agent.jobs.deploy.bundle).
ApplicationStop on a worker refuses a drain that does not fit its appspec timeout
(agent.jobs.deploy.budget; the appspec is `--appspec` or the last successful revision's).
ApplicationStart on a worker moves its record (agent.worker.state) to `running` through
undrain, and fails (exit 1, the worker left stopped) on a terminating or Spot-noticed instance.

Every step is idempotent (a drained worker drains at once, starting a started unit is a no-op),
so CodeDeploy may run a hook twice. A failing hook exits non-zero with one `ERROR agent: ...`
line that CodeDeploy shows in the deployment's event log. Nothing this command leaves running
holds its stdout/stderr: units are started by systemd, not forked from here, every command it
runs goes through agent.platform.process (output to our pipes or /dev/null, never CodeDeploy's)
and is waited for, and the Airflow CLI dies with the hook.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional

from agent.airflow.units_env import airflow_aws_env
from agent.errors import AgentError, ConfigError
from agent.jobs.deploy import budget, bundle
from agent.jobs.deploy.units import UnitSteps
from agent.jobs.deploy.validate import ValidateSteps
from agent.platform import process
from agent.platform.fsutil import resolve_owner
from agent.platform.systemd import Systemctl, systemctl_from_config

log = logging.getLogger(__name__)

EVENTS = ("ApplicationStop", "BeforeInstall", "AfterInstall", "ApplicationStart", "ValidateService")
CODEDEPLOY_VARS = ("LIFECYCLE_EVENT", "DEPLOYMENT_ID", "APPLICATION_NAME", "DEPLOYMENT_GROUP_NAME")
BUNDLE_CODE_DIRS = ("dags", "plugins")


def plan_hook(event: str, role: str) -> List[str]:
    """The steps of one event for one role (pure; the table in the module docstring)."""
    worker = role == "worker"
    if event == "ApplicationStop":
        return ["drain"] if worker else ["keep-units"]
    if event == "BeforeInstall":
        return ["clear-pycache"] + ([] if worker else ["snapshot-tree"])
    if event == "AfterInstall":
        return ["chown", "check-imports"]
    if event == "ApplicationStart":
        return ["write-marker", "undrain" if worker else "apply-units"]
    if event == "ValidateService":
        steps = ["units-active"]
        steps += {"worker": ["worker-ping"], "scheduler": ["scheduler-job"]}.get(role, [])
        return steps + (["health-url"] if role == "webserver" else [])
    raise ConfigError(f"unknown lifecycle event {event!r}; events are {', '.join(EVENTS)}")


def role_of(cfg) -> str:
    """The recorded role (agent.jobs.role), else role.override; an error naming both otherwise."""
    from agent.jobs.role import current_role

    role = current_role(cfg) or cfg.role.override
    if role not in ("scheduler", "webserver", "worker"):
        raise AgentError(
            f"this instance has no role: no role.json in {cfg.state_dir} and no role.override "
            f"(run `airflow-agent role --apply` first)"
        )
    return role


class DeployHook(ValidateSteps, UnitSteps):
    def __init__(
        self,
        cfg,
        role: str,
        event: str,
        environ: Optional[Dict[str, str]] = None,
        systemctl: Optional[Systemctl] = None,
        clock=time.monotonic,
        sleep=time.sleep,
        appspec: Optional[str] = None,
    ):
        self.cfg = cfg
        self.role = role
        self.event = event
        self.environ = dict(os.environ if environ is None else environ)
        self.systemctl = systemctl or systemctl_from_config(cfg)
        self.clock = clock
        self.sleep = sleep
        self.appspec = appspec
        self.home = Path(cfg.airflow_home)
        self.units = cfg.units_for(role)
        self._task_credentials_checked = False

    @property
    def deployment(self) -> str:
        return self.environ.get("DEPLOYMENT_ID") or "manual"

    def run(self) -> None:
        steps = plan_hook(self.event, self.role)
        log.info(
            "deploy-hook %s role=%s deployment=%s application=%s group=%s: %s",
            self.event,
            self.role,
            self.deployment,
            self.environ.get("APPLICATION_NAME", "-"),
            self.environ.get("DEPLOYMENT_GROUP_NAME", "-"),
            ", ".join(steps),
        )
        for step in steps:
            getattr(self, "step_" + step.replace("-", "_"))()
        log.info("deploy-hook %s: done", self.event)

    # -- ApplicationStop ---------------------------------------------------------------------

    def check_stop_budget(self) -> None:
        """Refuse a drain CodeDeploy would kill before its own deadline ends it."""
        appspec = self.appspec or budget.find_stop_appspec(self.environ)
        if not appspec:
            log.warning(
                "ApplicationStop budget not checked: no --appspec and no last successful "
                "revision in %s (a manual run?)",
                budget.DEPLOYMENT_ROOT,
            )
            return
        log.info("ApplicationStop budget: %s", budget.check_appspec(self.cfg, appspec))

    def step_drain(self) -> None:
        from agent.jobs.drain.drainer import drain

        self.check_stop_budget()
        result = drain(self.cfg)
        log.info("drain: %s (%s)", result.outcome, result.method)

    # -- BeforeInstall -----------------------------------------------------------------------

    def step_clear_pycache(self) -> None:
        removed = bundle.clear_pycache(self.home, BUNDLE_CODE_DIRS)
        log.info(
            "removed %d __pycache__ director%s under %s",
            removed,
            "y" if removed == 1 else "ies",
            self.home,
        )

    # -- AfterInstall ------------------------------------------------------------------------

    def step_chown(self) -> None:
        try:
            uid, gid = resolve_owner(self.cfg.deploy.owner, self.cfg.deploy.group)
        except KeyError as exc:
            raise AgentError(f"deploy.owner/deploy.group: {exc.args[0]}") from None
        n = bundle.chown_tree(self.home, uid, gid)
        log.info(
            "ownership %s:%s on %s (%d changed)",
            self.cfg.deploy.owner,
            self.cfg.deploy.group,
            self.home,
            n,
        )

    def _airflow_env(self) -> Dict[str, str]:
        from agent.platform.envfile import parse_env

        env: Dict[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            env.update(parse_env(Path(self.cfg.env.file).read_bytes()))
        except FileNotFoundError:
            log.warning("%s not found; running the Airflow CLI without it", self.cfg.env.file)
        env.setdefault("AIRFLOW_HOME", str(self.home))
        # the DAG import check acts as the Airflow units do (task role, no IMDS), never as root's
        # instance role
        env.update(airflow_aws_env(self.cfg))
        return env

    def _ensure_task_credentials(self) -> None:
        """The task role's credentials on disk before the first Airflow CLI this hook runs.

        The units get them from airflow-agent-task-credentials.service (Wants= at their
        start), but a fresh worker's units wait for its first deployment (the boot gate), so
        AfterInstall's DAG check can come before any unit has started: without this the
        secrets backend finds no credentials. Fresh credentials are kept (no STS call).
        Without a task role there is nothing to fetch: Airflow gets no AWS credentials.
        """
        if self._task_credentials_checked or self.cfg.task_credentials.role_arn is None:
            return
        from agent.jobs.task_credentials.job import TaskCredentials

        try:
            result = TaskCredentials(self.cfg).run()
        except AgentError as exc:
            raise AgentError(f"task credentials for the Airflow CLI: {exc}") from None
        except Exception as exc:  # botocore errors: name them, never a traceback to CodeDeploy
            raise AgentError(
                f"task credentials for the Airflow CLI: {type(exc).__name__}: {exc}"
            ) from None
        log.info("task credentials for the Airflow CLI: %s", result)
        self._task_credentials_checked = True

    def _airflow(self, *args: str, timeout: float) -> process.Result:
        self._ensure_task_credentials()
        user = None
        if os.geteuid() == 0 and self.cfg.deploy.owner != "root":
            # parse as the user the units run as: no root-owned bytecode or logs left behind
            try:
                user = process.RunAs.lookup(
                    self.cfg.deploy.owner, self.cfg.deploy.group, supplementary=False
                )
            except KeyError as exc:
                raise AgentError(f"deploy.owner/deploy.group: {exc.args[0]}") from None
        elif os.geteuid() == 0:
            log.warning(
                "the Airflow CLI runs as root with the settings of %s (deploy.owner is root): "
                "whoever writes its SSM parameters chooses code that runs as root; set "
                "deploy.owner to the Airflow units' user",
                self.cfg.env.file,
            )
        # a timeout is a ProcessError with exit code 4, as DeadlineError
        return process.run(
            list(self.cfg.deploy.airflow_command) + list(args),
            timeout=timeout,
            env=self._airflow_env(),
            user=user,
            cwd=self.home,
            die_with_parent=True,
            label="airflow " + " ".join(args[:2]),
        )

    def step_check_imports(self) -> None:
        if not self.cfg.deploy.check_import_errors:
            log.info("DAG import check disabled (deploy.check_import_errors: false)")
            return
        if not Path(self.cfg.deploy.airflow_command[0]).exists():
            log.warning(
                "%s not found: DAG import check skipped", self.cfg.deploy.airflow_command[0]
            )
            return
        proc = self._airflow(
            "dags",
            "list-import-errors",
            "--local",
            "-o",
            "json",
            timeout=self.cfg.deploy.check_timeout,
        )
        errors = _parse_import_errors(proc.stdout)
        if proc.returncode != 0 and errors is None:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])[:300]
            raise AgentError(
                f"airflow dags list-import-errors failed (rc {proc.returncode}): {tail}"
            )
        if errors:
            # every error on its own line (the deployment's log keeps them all), so one
            # failed deployment shows everything to fix, not one file per attempt
            lines = import_error_lines(errors)
            for line in lines:
                log.error("%s", line)
            raise AgentError(
                f"the bundle has {len(errors)} DAG import error(s); first: "
                f"{_import_error(errors[0])}"
            )
        log.info("DAG import check: no import errors")

    # -- ApplicationStart --------------------------------------------------------------------

    def step_write_marker(self) -> None:
        marker = Path(self.cfg.deploy.first_revision_marker)
        bundle.write_marker(self.home, marker, (self.deployment + "\n").encode())
        log.info("revision marker %s = %s", marker, self.deployment)

    def step_undrain(self) -> None:
        from agent.jobs.drain.drainer import undrain

        done = undrain(self.cfg, timeout=self.cfg.deploy.validate_timeout)
        log.info("undrain: %s", done)

    def _restart_guard(self):
        """Held around a restart of this instance's units (agent.jobs.deploy.units): the
        role's fleet-wide restart slot, shared with confapply, and an api-server out of the
        load balancer's rotation (agent.airflow.restart_guard). The slot is waited for at
        most deploy.validate_timeout, so the wait and the restart fit ApplicationStart's."""
        from agent.airflow.restart_guard import restart_guard

        holder = f"{socket.gethostname()} deployment {self.deployment}"
        return restart_guard(
            self.cfg, self.role, holder, slot_timeout=self.cfg.deploy.validate_timeout
        )


def import_error_lines(errors: List[dict]) -> List[str]:
    """`DAG import error N/M: <file>: <the error's last line>` per error, as the hook logs
    them (at most 200 characters of the error)."""
    return [
        f"DAG import error {n}/{len(errors)}: {_import_error(e)}" for n, e in enumerate(errors, 1)
    ]


def _import_error(error: dict) -> str:
    """`<file>: <the error's last line>` (at most 200 characters of the error)."""
    where = error.get("filepath") or error.get("fileloc") or "?"
    why = str(error.get("error") or error.get("stacktrace") or "").strip().splitlines()
    return f"{where}: {why[-1][:200] if why else 'unknown error'}"


def _parse_import_errors(stdout: str) -> Optional[List[dict]]:
    """The JSON list `list-import-errors -o json` prints on one line; Airflow's own log and
    warning lines (which may contain brackets) come before it. None when there is none."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("["):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, list):
            return [e for e in data if isinstance(e, dict)]
    return [] if "No data found" in stdout else None


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run one CodeDeploy lifecycle event for this instance's role (see codedeploy/appspec.yml)."
    )
    parser.add_argument(
        "event",
        nargs="?",
        metavar="EVENT",
        help=f"one of {', '.join(EVENTS)} (default: $LIFECYCLE_EVENT)",
    )
    parser.add_argument(
        "--appspec",
        metavar="FILE",
        help="the appspec.yml of the revision whose hook runs (the hook scripts pass their "
        "own): ApplicationStop on a worker refuses a drain longer than its timeout",
    )


def run(args, cfg) -> int:
    env_event = os.environ.get("LIFECYCLE_EVENT")
    event = args.event or env_event
    if not event:
        raise ConfigError("no EVENT given and $LIFECYCLE_EVENT is not set")
    if event not in EVENTS:
        raise ConfigError(f"unknown lifecycle event {event!r}; events are {', '.join(EVENTS)}")
    if env_event and args.event and env_event != args.event:
        log.warning(
            "EVENT %s differs from $LIFECYCLE_EVENT=%s; running %s",
            args.event,
            env_event,
            args.event,
        )
    DeployHook(cfg, role_of(cfg), event, appspec=args.appspec).run()
    return 0
