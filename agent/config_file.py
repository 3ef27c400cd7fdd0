"""agent.yaml as a file: where a config came from, its bytes, their hash, their YAML.

agent.config builds and checks the typed config from what `parse_yaml` returns; the daemon
runtime (agent/runtime/config_watch.py) compares `config_sha256` of the file now with the
`ConfigFile` recorded when the config was loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from agent.errors import ConfigError


@dataclass(frozen=True)
class ConfigFile:
    """The file a config was loaded from; sha256 of its bytes (None: absent, so defaults);
    named by --config or $AIRFLOW_AGENT_CONFIG (then an absent file is an error)."""

    path: str
    sha256: Optional[str]
    named: bool


def config_sha256(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else hashlib.sha256(data).hexdigest()


def read_config_file(path: str, named: bool) -> Optional[bytes]:
    """The file's bytes; None when it is absent and was not named."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        if named:
            raise ConfigError(f"{path}: config file not found") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None


def parse_yaml(data: bytes, path: str) -> Any:
    """The file's YAML document (ConfigError naming the file and line when it is not one)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
