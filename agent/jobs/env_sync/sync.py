"""`airflow-agent env sync`: SSM Parameter Store -> the EnvironmentFile of every Airflow unit.

The I/O shell around `agent.jobs.env_sync.plan`: fetch every parameter under the configured paths
(recursive, decrypted, paginated to the end), plan the new file, and write it atomically only
when its bytes change. Runs take turns (`env.lock` in the state dir, waited for up to
`env.lock_timeout`): fetch, render, write and the env.json update happen under it. Any failure or
suspicious result leaves the last good file in place and exits non-zero with a one-line reason,
recorded in `env.json` (agent.jobs.env_sync.state.EnvDoc) under the lock. Values never reach
logs or stdout; `--diff` prints names.

Fleet scale (agent.jobs.env_sync.pacing): `--splay` waits a random 0..env.splay seconds before
the first SSM call (the cfn-hup hook and fleet-wide Run Command pass it; boot runs do not), and a
throttled call is retried with backoff until env.fetch_deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from agent.errors import EXIT_OK, AgentError, ConfigError, DeadlineError, RefusedError
from agent.events.publish import record as record_event
from agent.jobs.env_sync.pacing import Backoff, Pacer, ThrottledOut
from agent.jobs.env_sync.plan import EnvPlan, Parameter, map_parameters, plan_env
from agent.jobs.env_sync.state import EnvDoc
from agent.logs import register_secrets
from agent.platform.aws import AWS_ERRORS, AwsClients, describe_error
from agent.platform.fsutil import (
    FileLock,
    atomic_write,
    read_bytes_or_none,
    remove_stale_temps,
    resolve_owner,
)
from agent.runtime.runner import classify, record_failure
from agent.state import StateStore

log = logging.getLogger(__name__)

PAGE_SIZE = 10  # the API's maximum for GetParametersByPath
LOCK_NAME = "env.lock"
KEPT = "env sync kept the last good file"


def FAILURE_DOCUMENT(args: argparse.Namespace) -> Optional[type]:  # noqa: N802 - the runner's name
    """Where the job runner records a failed run: EnvDoc, unless the run recorded it itself
    (under its lock) or gave up waiting for the lock, or was a dry run (writes nothing)."""
    if getattr(args, "dry_run", False) or getattr(args, "env_failure_handled", False):
        return None
    return EnvDoc


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="env_command", metavar="ACTION", required=True)
    sync = sub.add_parser(
        "sync",
        parents=[common],
        help="fetch SSM parameters and rewrite the env file if its content changed",
        description=(
            "Fetch every parameter under env.ssm_paths, map names to variables, merge "
            "env.static (SSM wins) and write env.file atomically when its bytes change. "
            "An error, an empty result, a missing required key or too large a drop keeps "
            "the last good file and exits non-zero."
        ),
    )
    sync.add_argument("--diff", action="store_true", help="print added/removed/changed names")
    sync.add_argument("--dry-run", action="store_true", help="plan and check, write nothing")
    sync.add_argument(
        "--allow-drop",
        action="store_true",
        help="accept a sync that removes more variables than env.max_drop_fraction",
    )
    sync.add_argument(
        "--splay",
        nargs="?",
        const=SPLAY_FROM_CONFIG,
        default=None,
        type=_seconds,
        metavar="SECONDS",
        help=(
            "first wait a random 0..SECONDS (default env.splay) so that a fleet syncing at "
            "once (cfn-hup hook, Run Command) spreads its SSM calls; boot runs leave it out"
        ),
    )


SPLAY_FROM_CONFIG = -1.0  # `--splay` without a value: env.splay


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"--splay wants seconds >= 0, got {text!r}")
    return value


def splay_of(args: argparse.Namespace, cfg) -> float:
    """The splay a run waits at most: none unless --splay was given (a boot run must not wait)."""
    value = getattr(args, "splay", None)
    if value is None:
        return 0.0
    return cfg.env.splay if value == SPLAY_FROM_CONFIG else value


def pacer_for(cfg, splay: float = 0.0, clock=time.monotonic, sleep=time.sleep, rand=None) -> Pacer:
    env = cfg.env
    return Pacer(
        splay=splay,
        deadline=env.fetch_deadline,
        backoff=Backoff(cap=env.backoff_cap),
        clock=clock,
        sleep=sleep,
        rand=rand or random.random,
    )


def fetch_parameters(ssm: Any, paths: List[str], pacer: Optional[Pacer] = None) -> List[Parameter]:
    """Every parameter under `paths`, decrypted; raises AgentError naming the failing path.

    `pacer` retries a throttled page (same NextToken) within its deadline; without one a
    throttling error beyond botocore's own retries fails at once.
    """
    pacer = pacer or Pacer()
    pacer.begin()
    params: List[Parameter] = []
    for path in paths:
        token: Optional[str] = None
        while True:
            kwargs = {"Path": path, "Recursive": True, "WithDecryption": True}
            kwargs["MaxResults"] = PAGE_SIZE
            if token:
                kwargs["NextToken"] = token

            # bound now (a default), not when the pacer calls it: kwargs changes each page
            def get_page(kwargs: Dict[str, Any] = kwargs) -> Dict[str, Any]:
                return ssm.get_parameters_by_path(**kwargs)

            try:
                page = pacer.call(get_page, f"SSM GetParametersByPath {path}")
            except ThrottledOut as exc:
                raise AgentError(str(exc)) from None
            except AWS_ERRORS as exc:
                raise AgentError(
                    f"SSM GetParametersByPath {path} failed: {describe_error(exc)}"
                ) from None
            for p in page.get("Parameters", []):
                params.append(Parameter(p["Name"], p.get("Value", ""), p.get("Type", "String")))
            # a page can be empty and still carry a token: only a missing token ends the path
            token = page.get("NextToken")
            if not token:
                break
    return params


class EnvSync:
    """One sync run; `ssm` is any client with get_parameters_by_path (a boto3 SSM client), or
    None: one is made from the config once the lock is held (so its failure is recorded there).

    A run that writes holds `<state_dir>/env.lock` from before the fetch until env.json is
    updated: runs take turns, the later one fetches after the earlier one wrote (the later SSM
    snapshot wins), and stale temp files are removed only while no writer can be mid-write.
    A failure inside the lock is recorded in env.json inside it, and `failure_handled` says so
    (the job runner must not record it again, after the lock is released).
    """

    def __init__(
        self,
        cfg,
        ssm: Any = None,
        state: Optional[StateStore] = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        splay: float = 0.0,
        rand: Optional[Callable[[], float]] = None,
    ):
        self.cfg = cfg
        # the splay is slept with `sleep`, like the lock wait, so tests run it on virtual time
        self.pacer = pacer_for(cfg, splay, clock=clock, sleep=sleep, rand=rand)
        self.ssm = ssm
        self.state = state or StateStore(cfg.state_dir)
        self.path = Path(cfg.env.file)
        self.clock = clock
        self.sleep = sleep
        self.failure_handled = False

    def _owner(self) -> tuple[int, int]:
        try:
            return resolve_owner(self.cfg.env.owner, self.cfg.env.group)
        except KeyError as exc:
            raise ConfigError(f"{self.cfg.source}: env.owner/env.group: {exc.args[0]}") from None

    def plan(self, allow_drop: bool = False) -> tuple[EnvPlan, Optional[bytes]]:
        if self.ssm is None:
            self.ssm = AwsClients(self.cfg).client("ssm")
        params = fetch_parameters(self.ssm, self.cfg.env.ssm_paths, self.pacer)
        if self.pacer.throttled:
            log.info("SSM fetch done despite throttling: %s", self.pacer.summary())
        register_secrets(p.value for p in params if p.type == "SecureString")
        mapped = map_parameters(params, self.cfg.env.ssm_paths)
        current = read_bytes_or_none(self.path)
        plan = plan_env(
            mapped,
            self.cfg.env.static,
            self.cfg.env.required,
            self.cfg.env.max_drop_fraction,
            current,
            allow_drop=allow_drop,
        )
        return plan, current

    def _fix_metadata(self, uid: int, gid: int) -> bool:
        st = self.path.stat()
        mode = self.cfg.env.mode_bits
        fixed = False
        if (st.st_mode & 0o7777) != mode:
            os.chmod(self.path, mode)
            fixed = True
        if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
            os.chown(self.path, uid, gid)
            fixed = True
        return fixed

    # -- taking turns

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold env.lock, waiting up to env.lock_timeout; DeadlineError naming the holder."""
        self.state.ensure()
        lock = FileLock(self.state.dir / LOCK_NAME)
        timeout = self.cfg.env.lock_timeout
        if not lock.acquire(self.clock(), self.clock, self.sleep):
            log.info(
                "another env sync (%s) holds %s; waiting up to %g s (env.lock_timeout)",
                lock.holder() or "holder unknown",
                lock.path,
                timeout,
            )
            # a run that never got its turn records nothing in env.json (timed out or
            # interrupted while waiting): the holder records its own run, and only it may write
            self.failure_handled = True
            if not lock.acquire(self.clock() + timeout, self.clock, self.sleep):
                raise DeadlineError(
                    f"env sync gave up waiting {timeout:g} s (env.lock_timeout) for {lock.path}, "
                    f"held by another env sync ({lock.holder() or 'holder unknown'}); "
                    "this run read and wrote nothing"
                )
        self.failure_handled = False
        try:
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            lock.write_holder(f"pid {os.getpid()} (env sync) since {started}")
            yield
        finally:
            lock.release()

    def _failed(self, exc: BaseException, record: bool) -> Optional[AgentError]:
        """The error to raise instead of `exc` (None: `exc` itself, its message prefixed); with
        `record`, the failure is recorded in env.json (the caller holds the lock)."""
        if isinstance(exc, ConfigError):
            return None  # the job did not run: not recorded (as the job runner does)
        err: Optional[AgentError] = None
        if isinstance(exc, AgentError):
            exc.args = (f"{KEPT}: {exc}",)
        elif isinstance(exc, AWS_ERRORS):
            err = AgentError(f"{KEPT}: {describe_error(exc)}")
        elif isinstance(exc, OSError):
            where = exc.filename or self.path
            err = AgentError(f"{KEPT}: {where}: {exc.strerror or exc}")
        if record:
            _code, result, reason = classify(err or exc)
            record_failure(self.cfg.state_dir, EnvDoc, result, reason)
            self.failure_handled = True
            if isinstance(exc, Exception):  # an interrupt is not a failed sync
                refused = isinstance(exc, RefusedError)
                record_event(self.cfg, "EnvSyncRefusals" if refused else "EnvSyncFailures")
        return err

    # -- the run

    def run(self, dry_run: bool = False, allow_drop: bool = False) -> EnvPlan:
        uid, gid = self._owner()
        if self.pacer.splay > 0:
            # before the lock: a waiting run holds nothing up. Interrupted here it has read and
            # written nothing, so it records nothing (as a run waiting for the lock)
            self.failure_handled = True
            self.pacer.wait_splay()
            self.failure_handled = False
        if dry_run:
            # writes nothing, so it neither waits for a writer nor records anything
            try:
                return self._dry_run(allow_drop)
            except (Exception, KeyboardInterrupt) as exc:
                err = self._failed(exc, record=False)
                if err is None:
                    raise
                raise err from None
        with self._turn():
            try:
                return self._write(uid, gid, allow_drop)
            except (Exception, KeyboardInterrupt) as exc:
                err = self._failed(exc, record=True)
                if err is None:
                    raise
                raise err from None

    def _dry_run(self, allow_drop: bool) -> EnvPlan:
        plan, current = self.plan(allow_drop=allow_drop)
        n = len(plan.variables)
        if current == plan.content:
            log.info("dry run: %s unchanged: %d variables", self.path, n)
        else:
            log.info("dry run: would write %s: %d variables, %s", self.path, n, plan.summary())
        return plan

    def _write(self, uid: int, gid: int, allow_drop: bool) -> EnvPlan:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temps(self.path)
        if stale:
            log.warning("removed %d temp file(s) a killed sync left beside %s", stale, self.path)
        plan, current = self.plan(allow_drop=allow_drop)
        n = len(plan.variables)
        if current == plan.content:
            if self._fix_metadata(uid, gid):
                log.warning("env file %s had the wrong owner or mode; fixed", self.path)
            log.info("env file %s unchanged: %d variables, sha256 %.12s", self.path, n, plan.sha256)
        else:
            atomic_write(self.path, plan.content, mode=self.cfg.env.mode_bits, uid=uid, gid=gid)
            log.info(
                "env file %s written: %d variables, %s, sha256 %.12s",
                self.path,
                n,
                plan.summary(),
                plan.sha256,
            )
        self.state.update_doc(
            EnvDoc,
            last_sync=time.time(),
            last_sync_result="ok",
            file_sha256=plan.sha256,
            variables=n,
        )
        return plan


def print_diff(plan: EnvPlan, out=None) -> None:
    out = out or sys.stdout
    for name in plan.added:
        print(f"+ {name}", file=out)
    for name in plan.removed:
        print(f"- {name}", file=out)
    for name in plan.changed:
        print(f"~ {name}", file=out)


def run(args: argparse.Namespace, cfg) -> int:
    sync = EnvSync(cfg, splay=splay_of(args, cfg))
    try:
        plan = sync.run(dry_run=args.dry_run, allow_drop=args.allow_drop)
    finally:
        args.env_failure_handled = sync.failure_handled
    if args.diff:
        print_diff(plan)
    return EXIT_OK
