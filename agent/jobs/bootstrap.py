"""`airflow-agent bootstrap`: first boot of an instance, safe to repeat on every cfn-init run.

Steps, each idempotent:
1. detect the role (`jobs.role.detect_role`, all sources; a conflict stops here, nothing enabled);
2. `env sync` (jobs.env_sync.sync.EnvSync): writes the env file only when its bytes change; a failed
   sync stops here and keeps the last good file (the Airflow units would otherwise start
   without their configuration);
3. record the role and enable + start the role's units, stop + disable other roles' units
   (`agent.jobs.role.apply_role`): a unit already enabled is not enabled again, a unit already
   active is not started again, and nothing is ever restarted. A second run changes nothing.

Boot gate (agent.worker.boot_gate, for CodeDeploy): a worker whose record (agent.worker.state)
says it must not run (never deployed to: `deploy.first_revision_marker` absent with
`deploy.boot_gate: true`; paused, drained), or that sits in a warm pool, gets its Airflow units
enabled but not started; ApplicationStart starts them. On a terminating or Spot-noticed worker
bootstrap refuses (exit 1) before touching anything.

The units themselves are installed by cfn-init (systemd/install-units.sh), before this runs; a
missing unit is an error naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

from agent.config import ROLES
from agent.errors import EXIT_OK, AgentError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--role",
        choices=ROLES,
        default=None,
        help="name the role (one of the role sources; see `role --help`)",
    )
    parser.add_argument(
        "--skip-env-sync",
        action="store_true",
        help="do not sync the env file first (it must already exist)",
    )


def _target_lifecycle_state(cfg, role: str) -> Optional[str]:
    """Warmed:* holds a worker too; best effort, IMDS being down must not stop a boot."""
    if role != "worker":
        return None
    from agent.platform.imds import ImdsClient

    try:
        return ImdsClient.from_config(cfg).target_lifecycle_state()
    except AgentError as exc:
        log.warning("target lifecycle state unknown (%s); boot gate uses the marker only", exc)
        return None


def run(args: argparse.Namespace, cfg) -> int:
    from agent.jobs.role import apply_role, detect_role_sources
    from agent.platform.systemd import systemctl_from_config
    from agent.worker.boot_gate import refuse_if_terminating, start_gate

    role, results = detect_role_sources(cfg, cli_role=args.role)
    refuse_if_terminating(cfg, role, "bootstrap")  # before env sync: nothing touched
    if not args.skip_env_sync:
        from agent.jobs.env_sync.state import EnvDoc
        from agent.jobs.env_sync.sync import EnvSync
        from agent.platform.aws import AWS_ERRORS
        from agent.runtime.runner import classify, record_failure

        sync = EnvSync(cfg)  # makes its SSM client under env.lock: that failure is recorded too
        try:
            sync.run()
        except (AgentError, *AWS_ERRORS) as exc:
            # recorded as env sync's failure (status shows it there); bootstrap goes no further.
            # A failure inside env.lock is already recorded there, under the lock.
            _code, result, reason = classify(exc)
            if not sync.failure_handled:
                record_failure(cfg.state_dir, EnvDoc, result, reason)
            raise AgentError(f"bootstrap stopped at env sync (no unit touched): {reason}") from None
    elif not os.path.exists(cfg.env.file):
        raise AgentError(f"--skip-env-sync given but {cfg.env.file} does not exist")
    target = _target_lifecycle_state(cfg, role)
    with start_gate(cfg, role, "bootstrap", target) as hold:
        changed = apply_role(cfg, role, systemctl_from_config(cfg), hold=hold, results=results)
    done = {k: v for k, v in changed.items() if v}
    if done:
        log.info(
            "bootstrap as %s done: %s",
            role,
            "; ".join(f"{k} {', '.join(v)}" for k, v in done.items()),
        )
    else:
        log.info("bootstrap as %s: nothing to change", role)
    return EXIT_OK
