"""`airflow-agent` command line: parses arguments, loads agent.yaml, dispatches to one job.

Each job lives in its own module with `add_arguments(parser)` and `run(args, cfg) -> int`
(names per the table below). Only the chosen job's module is imported, so `--help` and quick
commands stay fast and a job's heavy imports (boto3, celery) are paid only where used.

A subcommand may name its own function with `parser.set_defaults(handler="module:function")`
(imported only when chosen). The job module (or the handler's module) may name the state
document that records a failed run with `FAILURE_DOCUMENT` (see agent.runtime.runner, which
runs every command and maps its outcome to the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

from agent import __version__
from agent.config import load_config
from agent.errors import EXIT_USAGE
from agent.logs import setup_logging
from agent.runtime.runner import run_job

# command -> (module, add_arguments function, run function, one-line help)
COMMANDS: Dict[str, Tuple[str, str, str, str]] = {
    "role": (
        "agent.jobs.role",
        "add_arguments",
        "run",
        "detect this instance's role; --apply enables its units",
    ),
    "env": (
        "agent.jobs.env_sync.sync",
        "add_arguments",
        "run",
        "SSM Parameter Store -> the Airflow env file",
    ),
    "confapply": (
        "agent.jobs.confapply.daemon",
        "add_arguments",
        "run",
        "restart Airflow units when the env file's content changes",
    ),
    "drain": (
        "agent.jobs.drain.cli",
        "add_arguments",
        "run",
        "stop the local Celery worker taking tasks, wait, stop it",
    ),
    "undrain": (
        "agent.jobs.drain.cli",
        "add_undrain_arguments",
        "run_undrain",
        "let the local Celery worker consume again",
    ),
    "deploy-hook": (
        "agent.jobs.deploy.hook",
        "add_arguments",
        "run",
        "run one CodeDeploy lifecycle event for this role",
    ),
    "lifecycle": (
        "agent.jobs.lifecycle.watch",
        "add_arguments",
        "run",
        "react to Auto Scaling termination and Spot notices",
    ),
    "variables": (
        "agent.jobs.variables.cli",
        "add_arguments",
        "run",
        "Secrets Manager secret -> Airflow Variables",
    ),
    "bootstrap": (
        "agent.jobs.bootstrap",
        "add_arguments",
        "run",
        "first boot: role, env sync, units; safe to repeat",
    ),
    "task-credentials": (
        "agent.jobs.task_credentials.job",
        "add_arguments",
        "run",
        "assume the task role; keep Airflow's AWS credentials file fresh",
    ),
    "worker-db-user": (
        "agent.jobs.worker_db.job",
        "add_arguments",
        "run",
        "scheduler: create or update the Celery workers' own database user",
    ),
    "metrics": (
        "agent.jobs.metrics.daemon",
        "add_arguments",
        "run",
        "scheduler: publish Celery queue depth and desired workers to CloudWatch",
    ),
    "worker-gate": (
        "agent.worker.boot_gate",
        "add_arguments",
        "run",
        "exit 0 when the worker's record lets it start (the worker unit's ExecCondition)",
    ),
    "status": (
        "agent.jobs.status",
        "add_arguments",
        "run",
        "what the agent knows and what the units are doing",
    ),
}

EPILOG = """\
exit codes: 0 ok; 1 an operation failed (last good state kept); 2 bad command line or
agent.yaml; 3 input refused as bad or suspicious (last good state kept); 4 a deadline passed;
75 a daemon ended because agent.yaml changed (its unit restarts it); 130 interrupted (SIGINT).
Config: --config PATH, else $AIRFLOW_AGENT_CONFIG, else /etc/airflow-agent/agent.yaml."""


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="agent.yaml to use (default: $AIRFLOW_AGENT_CONFIG or /etc/airflow-agent/agent.yaml)",
    )
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity on stderr (default INFO)",
    )
    return common


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; `only` names the one job whose module is imported for its arguments."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="airflow-agent",
        description="The on-instance agent for Apache Airflow on EC2.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"airflow-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add_fn, _run_fn, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == only:
            getattr(importlib.import_module(module), add_fn)(p, common)
    return parser


def _chosen_command(argv: List[str]) -> Optional[str]:
    skip_next = False
    for token in argv:
        if skip_next:
            skip_next = False
            continue
        if token in ("--config", "--log-level"):
            skip_next = True
            continue
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen_command(argv)
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    module, _add_fn, run_fn, _help = COMMANDS[args.command]
    handler = getattr(args, "handler", None) or f"{module}:{run_fn}"
    job_module, _, function = handler.partition(":")

    def job(a: argparse.Namespace, cfg: object) -> Optional[int]:
        return getattr(importlib.import_module(job_module), function)(a, cfg)

    def failure_document(a: argparse.Namespace) -> Optional[type]:
        doc = getattr(importlib.import_module(job_module), "FAILURE_DOCUMENT", None)
        return doc if doc is None or isinstance(doc, type) else doc(a)

    outcome = run_job(
        args.command,
        job,
        args,
        lambda: load_config(getattr(args, "config", None)),
        failure_document,
    )
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
