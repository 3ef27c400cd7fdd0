"""`airflow-agent variables sync|watch`: the command line of the variables job.

`sync` runs one agent.jobs.variables.sync.VariablesSync (the timer's oneshot); `watch` is the
daemon in agent/jobs/variables/watch.py, routed there by its subparser's `handler`, so the sync
module never imports the daemon. A failed `sync` (not a dry run) is recorded by the job runner
in `variables.json` (FAILURE_DOCUMENT).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any, Optional

from agent.errors import EXIT_OK, AgentError, ConfigError
from agent.jobs.variables.state import VariablesDoc

log = logging.getLogger(__name__)


def FAILURE_DOCUMENT(args: argparse.Namespace) -> Optional[type]:  # noqa: N802 - the runner's name
    """A failed sync is recorded; a dry run changes no state, and the watch records its own."""
    if getattr(args, "variables_command", None) == "sync" and not args.dry_run:
        return VariablesDoc
    return None


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="variables_command", metavar="ACTION", required=True)
    sync = sub.add_parser(
        "sync",
        parents=[common],
        help="import new and changed variables from the secret into Airflow, verified",
        description=(
            "Read variables.secret_id from Secrets Manager. When its VersionId was synced "
            "already, do nothing. Otherwise import only new and changed keys into Airflow, "
            "read them back, and fail naming any key that did not land. Keys removed from "
            "the secret are deleted only with --prune. Values never reach logs or argv."
        ),
    )
    sync.add_argument(
        "--diff", action="store_true", help="print new (+), changed (~), removed (-) names"
    )
    sync.add_argument(
        "--dry-run", action="store_true", help="plan only: no Airflow call, no state change"
    )
    sync.add_argument(
        "--prune", action="store_true", help="delete variables removed from the secret"
    )
    sync.add_argument(
        "--all",
        action="store_true",
        help="import every key even if recorded as synced (e.g. after Airflow's database was "
        "restored or edited by hand)",
    )
    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="daemon: poll the secret and sync each new version through a warm Airflow bridge",
        description=(
            "Keep one Airflow interpreter (the bridge) running, poll GetSecretValue every "
            "interval, and sync when the VersionId changes (an unchanged secret costs no "
            "Airflow work). Restarts the bridge if it dies or the env file changes. Reports "
            "READY/STATUS/WATCHDOG to systemd; exits cleanly on SIGTERM."
        ),
    )
    watch.add_argument(
        "--interval",
        type=float,
        default=None,
        metavar="S",
        help="seconds between polls (default: variables.watch_interval)",
    )
    watch.add_argument(
        "--prune", action="store_true", help="delete variables removed from the secret"
    )
    # the daemon is its own module: agent/cli.py imports it only when `watch` is chosen
    watch.set_defaults(handler=f"{__name__}:run_watch")


class Terminated(AgentError):
    """SIGTERM reached a oneshot sync."""


def _raise_terminated(signum: int, _frame: Any) -> None:
    # a oneshot blocked waiting for the CLI: raising unwinds through the finally blocks that
    # remove the temp files (agent.platform.process.run kills the child on the way out)
    raise Terminated(f"terminated by signal {signum}; nothing more imported")


def _secret_id_set(cfg) -> bool:
    return bool(cfg.variables.secret_id)


def run(args: argparse.Namespace, cfg) -> int:
    """`variables sync`."""
    if not _secret_id_set(cfg):
        # the scheduler's timer is enabled by default: a cluster without variables must not
        # see it fail every run
        log.warning("variables.secret_id is not set in %s: nothing to import", cfg.source)
        return EXIT_OK
    from agent.jobs.variables.sync import VariablesSync
    from agent.platform.aws import AWS_ERRORS, AwsClients, describe_error

    # a oneshot blocked on Airflow: SIGTERM unwinds through the finally blocks that remove the
    # temp file (cli) or end the co-process (api), and is recorded as a failed run
    old_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        sm = AwsClients(cfg).client("secretsmanager")
        VariablesSync(cfg, sm).run(
            full=args.all,
            dry_run=args.dry_run,
            prune=args.prune,
            diff_out=sys.stdout if args.diff else None,
        )
    except AWS_ERRORS as exc:
        raise AgentError(f"variables sync: {describe_error(exc)}") from None
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    return EXIT_OK


def run_watch(args: argparse.Namespace, cfg) -> int:
    """`variables watch`: the daemon needs a secret to watch."""
    if not _secret_id_set(cfg):
        raise ConfigError(f"{cfg.source}: key 'variables.secret_id' is not set")
    from agent.jobs.variables.watch import watch

    return watch(args, cfg)
