"""The three IMDS facts `lifecycle watch` polls, each read on its own.

One fact that cannot be read (IMDS answered garbage for it, or the exchange broke) must not
hide the others: a malformed `spot/instance-action` must not keep a termination hook wait
(`target-lifecycle-state` = Terminated) from being acted on, and the other way round. So each
reader runs by itself; its failure becomes a named error (`{path: message}`) and its fact is
unknown for this poll, while the facts that did read are classified as usual.

`report()` is the pure part: which failures to log (each distinct answer once per path while
that path keeps failing, so a daemon polling every few seconds does not repeat one line
forever) and which paths recovered.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Tuple

from agent.platform.imds import ImdsError, ImdsNoToken

log = logging.getLogger(__name__)

TARGET = "meta-data/autoscaling/target-lifecycle-state"
SPOT = "meta-data/spot/instance-action"
REBALANCE = "meta-data/events/recommendations/rebalance"
PATHS = (TARGET, SPOT, REBALANCE)

# distinct failures remembered per path (a path answering ever-changing garbage is logged this
# many times, then quietly until it recovers)
SEEN_KEEP = 10


def read_facts(
    readers: Mapping[str, Callable[[], Any]],
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """({path: value} of the facts read, {path: why not} of the others).

    Every exception is caught here, one reader at a time: the IMDS client turns transport and
    protocol failures into ImdsError, and anything else (a bug) is named by its type so the
    daemon still carries on with the other facts.
    """
    values: Dict[str, Any] = {}
    errors: Dict[str, str] = {}
    no_token = ""
    for path, read in readers.items():
        if no_token:
            # without a session token every read fails alike: not worth its retries (the
            # loop also sends heartbeats)
            errors[path] = no_token
            continue
        try:
            values[path] = read()
        except Exception as exc:  # noqa: BLE001 - one fact's failure must not stop the others
            text = str(exc) or "no detail"
            errors[path] = text if isinstance(exc, ImdsError) else f"{type(exc).__name__}: {text}"
            if isinstance(exc, ImdsNoToken):
                no_token = errors[path]
    return values, errors


def report(
    seen: Mapping[str, List[str]], errors: Mapping[str, str]
) -> Tuple[Dict[str, str], Dict[str, List[str]], List[str]]:
    """(failures to log now, the new `seen`, paths that recovered).

    `seen` maps each failing path to the distinct messages already logged for it; a path that
    reads again leaves it (and is reported as recovered), so its next failure is logged anew.
    """
    to_log: Dict[str, str] = {}
    after: Dict[str, List[str]] = {}
    for path, message in errors.items():
        known = list(seen.get(path, []))
        if message not in known and len(known) < SEEN_KEEP:
            to_log[path] = message
            known.append(message)
        after[path] = known
    recovered = [path for path in seen if path not in errors]
    return to_log, after, recovered


class FactReader:
    """`read_facts` plus its log lines: each distinct failure once, each recovery once."""

    def __init__(self, poll_interval: float):
        self.poll_interval = poll_interval
        self.seen: Dict[str, List[str]] = {}

    def read(
        self, readers: Mapping[str, Callable[[], Any]]
    ) -> Tuple[Dict[str, Any], Dict[str, str]]:
        values, errors = read_facts(readers)
        to_log, self.seen, recovered = report(self.seen, errors)
        for path, message in to_log.items():
            log.warning(
                "IMDS %s unreadable; ignored this poll (the other facts still act), "
                "read again every %gs: %s",
                path,
                self.poll_interval,
                message,
            )
        for path in recovered:
            log.info("IMDS %s readable again", path)
        return values, errors
