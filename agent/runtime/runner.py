"""The job runner: every command runs through `run_job`, which turns its outcome into an exit
code (README: 0 ok, 1 failed, 2 usage, 3 refused, 4 deadline, 130 interrupted) and records a
failed run in the job's state document (when, result, reason).

A job names the document that records its failures with `failure_document` (a registered
state document type whose `failure_fields` are set), or a function of the parsed arguments
returning one or None (e.g. no record for a dry run). `record_failure` is public for code that
records a failure without exiting (a daemon's failed pass, bootstrap's env sync step).

What a failure becomes:

    AgentError (and subclasses)  its own exit code; result "refused" for RefusedError,
                                 "timeout" for DeadlineError, else "failed"; its message
    ConfigError                  exit 2, not recorded (the job did not run)
    an AWS SDK error             exit 1, "failed", described without its request details
    KeyboardInterrupt            exit 130, "interrupted"
    anything else                exit 1, "failed", "internal error: <type>: <message>"
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Optional, Tuple, Union

from agent.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    AgentError,
    ConfigError,
    DeadlineError,
    RefusedError,
)
from agent.state import StateStore, registration

log = logging.getLogger("agent")

FAILED = "failed"
REFUSED = "refused"
TIMEOUT = "timeout"
INTERRUPTED = "interrupted"

# a document type, or a function of the parsed arguments naming one (or None: no record)
FailureDocument = Union[None, type, Callable[[Any], Optional[type]]]


def classify(exc: BaseException) -> Tuple[int, str, str]:
    """(exit code, result, one-line reason) of an exception a job raised."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, INTERRUPTED, "interrupted"
    if isinstance(exc, AgentError):
        if isinstance(exc, RefusedError):
            result = REFUSED
        elif isinstance(exc, DeadlineError):
            result = TIMEOUT
        else:
            result = FAILED
        return exc.exit_code, result, str(exc)
    if type(exc).__module__.split(".")[0] in ("botocore", "boto3"):
        # imported here: a command that never touched AWS must not pay for boto3
        from agent.platform.aws import describe_error

        return EXIT_FAILURE, FAILED, describe_error(exc)  # type: ignore[arg-type]
    return EXIT_FAILURE, FAILED, f"internal error: {type(exc).__name__}: {exc}"


def record_failure(
    state_dir: str, doc_type: type, result: str, reason: str, when: Optional[float] = None
) -> bool:
    """Record a failed run in `doc_type`'s (when, result, reason) fields; False when it could not
    be written (the state dir may be the very thing that is broken; the log line still goes out).
    """
    registration(doc_type)  # a TypeError now, not at the first failure in production
    fields = getattr(doc_type, "failure_fields", None)
    if not fields:
        raise TypeError(f"{doc_type.__name__} does not record failures (no failure_fields)")
    at, res, why = fields
    try:
        StateStore(state_dir).update_doc(
            doc_type, **{at: time.time() if when is None else when, res: result, why: reason}
        )
    except OSError as exc:
        log.warning("cannot record the failure in the state dir: %s", exc.strerror)
        return False
    return True


def _document(failure_document: FailureDocument, args: Any) -> Optional[type]:
    if failure_document is None:
        return None
    if isinstance(failure_document, type):
        return failure_document
    return failure_document(args)


@dataclasses.dataclass
class Outcome:
    """What a run ended with (for tests and callers that want more than the exit code)."""

    exit_code: int
    result: str = "ok"
    reason: str = ""
    recorded: bool = False


def run_job(
    command: str,
    job: Callable[[Any, Any], Optional[int]],
    args: Any,
    load_cfg: Callable[[], Any],
    failure_document: FailureDocument = None,
) -> Outcome:
    """Load the config, run `job(args, cfg)`, and map how it ended (see the module docstring)."""
    cfg = None
    try:
        cfg = load_cfg()
        return Outcome(int(job(args, cfg) or 0))
    except (Exception, KeyboardInterrupt) as exc:
        return _failed(command, exc, args, cfg, failure_document)
    finally:
        if cfg is not None:
            # the events the job recorded (a drain, a refused sync) go out now, bounded by
            # metrics.events.flush_timeout; those that cannot wait in the spool
            from agent.events.publish import flush_pending

            flush_pending(cfg, recorded_here=True)


def _failed(
    command: str, exc: BaseException, args: Any, cfg: Any, failure_document: FailureDocument
) -> Outcome:
    """Log and record a failed run (see the module docstring); its outcome."""
    code, result, reason = classify(exc)
    if isinstance(exc, (KeyboardInterrupt, AgentError)):
        log.error("%s", reason)
    elif reason.startswith("internal error: "):
        # the last line of defence: one clear line, not a traceback dump
        log.error("internal error in %s: %s", command, reason[len("internal error: ") :])
        log.debug("traceback", exc_info=True)
    else:
        log.error("%s: %s", command, reason)
    recorded = False
    if cfg is not None and not isinstance(exc, ConfigError):
        doc_type = None
        with contextlib.suppress(Exception):  # an odd args object must not hide the error
            doc_type = _document(failure_document, args)
        if doc_type is not None:
            recorded = record_failure(cfg.state_dir, doc_type, result, reason)
    return Outcome(code, result, reason, recorded)
