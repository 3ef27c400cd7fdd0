"""Logging for journald: one line per event on stderr, level first, secrets scrubbed.

Values we know to be secret (SSM parameter values, variable values) are registered with
`register_secret`; a filter replaces any of them that slips into a message with `***`.
It is a safety net: the code never formats values into log lines in the first place.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Iterable, Set

_secrets: Set[str] = set()
_lock = threading.Lock()
# short strings would redact ordinary words ("true", "1"); they are not worth hiding
_MIN_SECRET_LEN = 6


def register_secrets(values: Iterable[str]) -> None:
    with _lock:
        _secrets.update(v for v in values if isinstance(v, str) and len(v) >= _MIN_SECRET_LEN)


def scrub(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


class _OneLineScrubbingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = scrub(super().format(record))
        # journald keeps one entry per line; a multi-line message would split into several
        return text.replace("\r", "\\r").replace("\n", "\\n")


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineScrubbingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # botocore at DEBUG prints request bodies, which can hold secret values
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
