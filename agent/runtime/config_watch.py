"""Has agent.yaml changed since this daemon loaded it? The daemon runtime asks every pass.

The daemons read agent.yaml once, at start; a stack update rewrites it (cfn-init's `update`
configSet) or an operator edits it, and until the daemon restarts the new settings lie unused.
So the runtime (agent/runtime/daemon.py) hashes the file's *content* (following the
agent.yaml -> roles/<role>.yaml link, so a re-pointed link counts too) before each pass and
every few seconds while it sleeps, and compares it with the hash of what was loaded.

- Unchanged (a `touch`, an identical rewrite): nothing happens.
- Changed to something that loads: once the same new content has been seen twice, `SETTLE`
  seconds apart (a file caught half-written by an in-place rewrite is not acted on), `check()`
  says so and the runtime ends the daemon cleanly with `EXIT_CONFIG_CHANGED`; systemd's
  `Restart=` starts it again on the new file.
- Changed to something that does not load (bad YAML, a bad key, a named file gone): the daemon
  keeps running on what it loaded, logs the reason once per distinct content, and `problem`
  holds it for STATUS=, so a typo never turns a working daemon into a crash loop.

Exiting rather than re-reading in place: every object a daemon built from its config (clients,
watches, timers, state paths) is rebuilt by the same code that built it at boot, and systemd
stays the only supervisor (no re-exec with inherited notify sockets and threads).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple

from agent.config import parse_config
from agent.config_file import ConfigFile, config_sha256, read_config_file
from agent.errors import ConfigError

log = logging.getLogger(__name__)

# EX_TEMPFAIL: "try again" — any Restart= but `no` restarts on it, and no other exit of the
# agent uses it
EXIT_CONFIG_CHANGED = 75
SETTLE = 1.0
# the runtime looks at the file this often while a daemon sleeps between passes
CHECK_INTERVAL = 2.0
_NOTHING = object()


def config_file_change(loaded: ConfigFile) -> Optional[Tuple[Optional[str], str]]:
    """None while the file holds what was loaded; else (its sha256, None when absent; why it
    cannot be loaded, or "" when it can)."""
    try:
        data = read_config_file(loaded.path, loaded.named)
    except ConfigError as exc:
        return None if loaded.sha256 is None else (None, str(exc))
    sha = config_sha256(data)
    if sha == loaded.sha256:
        return None
    if data is not None:
        try:
            parse_config(data, loaded.path)
        except ConfigError as exc:
            return sha, str(exc)
    return sha, ""


class ConfigWatch:
    """The runtime's question, with the settle rule and the once-per-content log."""

    def __init__(self, loaded: ConfigFile, now: Callable[[], float], settle: float = SETTLE):
        self.loaded = loaded
        self.now = now
        self.settle = settle
        self.problem = ""
        self._seen: Optional[Tuple[Optional[str], float]] = None
        self._reported: object = _NOTHING

    def check(self) -> bool:
        """True when the file changed to content that loads, seen twice `settle` s apart."""
        try:
            change = config_file_change(self.loaded)
        except Exception as exc:  # never let the watch itself end a working daemon
            change = (self._seen[0] if self._seen else None, f"{type(exc).__name__}: {exc}")
        if change is None:
            self._seen = None
            self.problem = ""
            return False
        sha, problem = change
        if problem:
            self.problem = f"{self.loaded.path} changed but cannot be loaded; still on the old one"
            if self._reported != sha:
                self._reported = sha
                log.error("%s (%s): keeping the configuration loaded at start", problem, sha)
            self._seen = None
            return False
        self.problem = ""
        now = self.now()
        if self._seen is None or self._seen[0] != sha:
            self._seen = (sha, now)
            return False
        return now - self._seen[1] >= self.settle
