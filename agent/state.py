"""The agent's persistent state: small JSON documents in the state directory (root, 0700).

Each job keeps its own document (`role.json`, `confapply.json`, `env.json`, `drain.json`,
`variables.json`, ...). Writes are atomic, so a crash leaves the previous document.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict

from agent.platform.fsutil import atomic_write


class StateStore:
    def __init__(self, state_dir: str):
        self.dir = Path(state_dir)

    def ensure(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load(self, name: str) -> Dict[str, Any]:
        """The document, or {} when absent or unreadable (a corrupt document is not fatal)."""
        try:
            data = json.loads(self.path(name).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, name: str, data: Dict[str, Any]) -> None:
        self.ensure()
        body = json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"
        atomic_write(self.path(name), body, mode=0o600)

    def update(self, name: str, **changes: Any) -> Dict[str, Any]:
        data = self.load(name)
        data.update(changes)
        self.save(name, data)
        return data

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()
