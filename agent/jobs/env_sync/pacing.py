"""Fleet-safe pacing of env sync's SSM calls: a random splay, then backoff on throttling.

SSM Parameter Store's Get* throughput (40 TPS by default) is shared by the whole account and
region. When every instance syncs at once (cfn-hup after a stack update, Run Command on the
fleet, a scale-out), most calls are throttled, and botocore's own retries (`aws.max_attempts`)
are spent within seconds: the sync failed on a fleet of a few hundred. So a run

- may first wait a random 0..splay seconds (`env sync --splay`, `env.splay`), which spreads a
  fleet's first calls over the splay instead of one instant (boot runs do not wait), and
- keeps retrying a throttled call (the same page: pages already read are not read again) after
  a full-jitter exponential backoff, until `env.fetch_deadline` seconds after its first call.

How this combines with botocore's retries (agent.platform.aws: adaptive mode, aws.max_attempts
total attempts): botocore stays the inner layer, unchanged for every client. It absorbs a short
throttling burst and transient errors, and its adaptive mode's client-side rate limiter slows
this process once it has been throttled. Only when botocore gives up on a throttling error does
the loop here take over; any other error still fails the sync at once. The deadline is checked
before each of this loop's attempts, so a run can overrun it by at most one botocore call with
its own retries (seconds). `env.fetch_deadline: 0` restores the behaviour before this module:
throttling beyond botocore's attempts fails the sync.

Pure apart from what is passed in: the clock, sleep and the random source are parameters, so
tests run it on virtual time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import botocore.exceptions

log = logging.getLogger(__name__)

T = TypeVar("T")

# botocore's own list of throttling codes (botocore.retries.standard), plus HTTP 429 below
THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)


def is_throttle(exc: BaseException) -> bool:
    """True for an AWS error that says "slow down" (worth retrying later), nothing else."""
    if not isinstance(exc, botocore.exceptions.ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in THROTTLE_CODES or status == 429


@dataclass(frozen=True)
class Backoff:
    """Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"): the n-th retry
    waits uniformly 0..min(cap, base * 2**n). Jitter decorrelates a fleet's retries; the cap
    bounds how long the bucket may sit idle while throttled instances sleep, which is what the
    last instances of a fleet wait for (bench/fleet.py measured cap 8 s against 2..20 s)."""

    base: float = 0.5
    cap: float = 8.0

    def delay(self, retry: int, rand: Callable[[], float]) -> float:
        ceiling = self.cap if retry >= 60 else min(self.cap, self.base * 2**retry)
        return rand() * ceiling


class ThrottledOut(Exception):
    """Still throttled at the deadline; the message names the key that bounds it."""


class Pacer:
    """The splay and the throttling retries of one sync run.

    `splay`: upper bound of the random wait before the first call (0: none). `deadline`: seconds
    after the first call during which throttled calls are retried (0: never). `clock` is
    monotonic seconds, `sleep` sleeps, `rand` returns a float in [0, 1).
    """

    def __init__(
        self,
        splay: float = 0.0,
        deadline: float = 0.0,
        backoff: Backoff = Backoff(),
        clock: Optional[Callable[[], float]] = None,
        sleep: Optional[Callable[[float], None]] = None,
        rand: Optional[Callable[[], float]] = None,
    ):
        import random
        import time

        if not (math.isfinite(splay) and splay >= 0):
            raise ValueError(f"splay must be a finite number >= 0, got {splay}")
        if not (math.isfinite(deadline) and deadline >= 0):
            raise ValueError(f"deadline must be a finite number >= 0, got {deadline}")
        self.splay = splay
        self.deadline = deadline
        self.backoff = backoff
        self.clock = clock or time.monotonic
        self.sleep = sleep or time.sleep
        self.rand = rand or random.random
        self._ends: Optional[float] = None
        # what the run did, for its log line, tests and the benchmark; `calls` counts this
        # loop's attempts (botocore's own retries inside one attempt are not seen here)
        self.calls = 0
        self.throttled = 0
        self.waited = 0.0  # seconds slept in backoff (the splay not included)
        self.splayed = 0.0

    def wait_splay(self) -> float:
        """Sleep a random 0..splay seconds (before the first call); return how long."""
        if self.splay > 0:
            self.splayed = self.rand() * self.splay
            log.info(
                "waiting %.1f s (random, at most %g s: splay) before the first SSM call, "
                "so that a fleet syncing at once spreads its calls",
                self.splayed,
                self.splay,
            )
            self.sleep(self.splayed)
        return self.splayed

    def begin(self) -> None:
        """A new fetch: its deadline starts at its first call (a pacer may serve several)."""
        self._ends = None

    def call(self, fn: Callable[[], T], what: str) -> T:
        """`fn()`, retried after a backoff while it is throttled and the deadline allows.

        The deadline starts at the run's first call. A non-throttling error is raised at once;
        a throttling error at the deadline raises ThrottledOut naming `what` and the key.
        """
        now = self.clock()
        if self._ends is None:
            self._ends = now + self.deadline
        retry = 0
        while True:
            self.calls += 1
            try:
                return fn()
            except Exception as exc:
                if not is_throttle(exc):
                    raise
                self.throttled += 1
                now = self.clock()
                left = self._ends - now
                if left <= 0:
                    raise ThrottledOut(self._gave_up(what, exc)) from None
                # never sleep past the deadline: the last attempt is made at the deadline
                delay = min(self.backoff.delay(retry, self.rand), left)
                log.debug("%s throttled; retry %d in %.2f s", what, retry + 1, delay)
                self.sleep(delay)
                self.waited += delay
                retry += 1

    def _gave_up(self, what: str, exc: Any) -> str:
        err = exc.response.get("Error", {})
        code = err.get("Code") or "HTTP 429"
        if self.deadline <= 0:
            why = "env.fetch_deadline is 0: no retries beyond aws.max_attempts"
        else:
            why = f"still throttled {self.deadline:g} s (env.fetch_deadline) after the first call"
        return f"{what} failed: {code}: {why}; {self.throttled} throttled calls in this run"

    def summary(self) -> str:
        return (
            f"{self.calls} SSM calls, {self.throttled} throttled, "
            f"{self.waited:.1f} s in backoff, splay {self.splayed:.1f} s"
        )
