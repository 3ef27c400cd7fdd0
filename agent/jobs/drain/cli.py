"""`airflow-agent drain` / `undrain`: the command line of the drain job (agent.jobs.drain.drainer
holds the procedure and its Python API)."""

from __future__ import annotations

import argparse
import json
import logging

from agent.errors import ConfigError
from agent.jobs.drain.drainer import drain, undrain

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Stop the local Celery worker consuming from every queue it consumes, wait until it "
        "has no running task, then stop its unit. Resumes an interrupted drain; exits 4 at the "
        "deadline when drain.on_deadline is fail."
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds until the deadline (default: drain.timeout)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def add_undrain_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.description = (
        "Undo a drain: re-add the consumers a drain cancelled, or start the worker unit if it "
        "is stopped."
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="how long to wait for the worker to answer (default 60)",
    )


def run(args, cfg) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout:g}")
    result = drain(cfg, timeout=args.timeout)
    log.info(
        "drain %s: %s (%s)%s",
        result.node,
        result.outcome,
        result.method,
        f": {result.message}" if result.message else "",
    )
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), sort_keys=True))
    return 0


def run_undrain(args, cfg) -> int:
    done = undrain(cfg, timeout=args.timeout)
    log.info("undrain: %s", done)
    return 0
