"""systemd EnvironmentFile encoding and parsing (systemd 252 rules), pure functions.

`encode_env` writes every value double-quoted, escaping only the four characters systemd
unescapes inside double quotes (backslash, double quote, dollar, backtick). `parse_env` is a
model of systemd's own parser (src/basic/env-file.c), used to prove before writing that every
value comes back byte-exact. Values systemd cannot carry (NUL, text that is not UTF-8) are
refused by `unrepresentable_reason`.

systemd's rules, as measured on 252: lines without `=` are ignored; `#`/`;` start a comment only
at the start of a line; unquoted values are trimmed and `\\x` becomes `x`; single quotes are
literal and may span lines; double quotes may span lines and unescape only `\\" \\\\ \\$` and
backtick (any other `\\x` stays as is; backslash-newline is removed); no `$VAR` expansion.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Optional, Tuple

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Linux's MAX_ARG_STRLEN (32 pages) less the terminating NUL: a longer NAME=VALUE is accepted
# by systemd but makes execve fail with E2BIG, so the unit would not start
MAX_ASSIGNMENT_BYTES = 131071

_NEEDS_ESCAPE = '"\\`$'
_NEWLINE = "\n\r"
_WHITESPACE = " \t\n\r"
_COMMENT = "#;"


def unrepresentable_reason(value: str) -> Optional[str]:
    """Why systemd could not hand `value` to a unit unchanged, or None if it can."""
    if "\x00" in value:
        return "contains a NUL character"
    for ch in value:
        cp = ord(ch)
        if 0xD800 <= cp <= 0xDFFF:
            return "is not valid UTF-8 (lone surrogate)"
        # systemd's utf8_is_valid() refuses Unicode noncharacters, and a file holding one
        # fails to load, so the unit would not start at all
        if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
            return f"contains the Unicode noncharacter U+{cp:04X}, which systemd rejects"
    return None


def encode_value(value: str) -> str:
    return '"' + "".join("\\" + c if c in _NEEDS_ESCAPE else c for c in value) + '"'


def encode_env(variables: Dict[str, str], header: str = "") -> bytes:
    """EnvironmentFile bytes for `variables`, sorted by name: equal input gives equal bytes."""
    lines = [f"# {line}\n" for line in header.splitlines()]
    for name in sorted(variables):
        if not NAME_RE.match(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        lines.append(f"{name}={encode_value(variables[name])}\n")
    return "".join(lines).encode("utf-8")


def parse_env(data: bytes) -> Dict[str, str]:
    """Parse EnvironmentFile bytes the way systemd 252 does; later assignments win.

    Like systemd, assignments whose name is not a valid variable name are dropped.
    """
    pairs = _parse_pairs(data.decode("utf-8", errors="surrogateescape"))
    return {k: v for k, v in pairs if NAME_RE.match(k)}


def _parse_pairs(text: str) -> Iterable[Tuple[str, str]]:
    # A direct transcription of systemd's state machine, so the round-trip check tests what
    # systemd will do, not what our encoder intends.
    state = "PRE_KEY"
    key: list = []
    value: list = []
    last_value_whitespace = -1
    last_key_whitespace = -1
    pairs = []

    def push() -> None:
        k = "".join(key)
        v = "".join(value)
        if k:
            pairs.append((k, v))

    for c in text:
        if state == "PRE_KEY":
            if c in _COMMENT:
                state = "COMMENT"
            elif c not in _WHITESPACE:
                state = "KEY"
                last_key_whitespace = -1
                key = [c]
        elif state == "KEY":
            if c in _NEWLINE:
                state = "PRE_KEY"
                key = []
            elif c == "=":
                state = "PRE_VALUE"
                last_value_whitespace = -1
            else:
                if c not in _WHITESPACE:
                    last_key_whitespace = -1
                elif last_key_whitespace < 0:
                    last_key_whitespace = len(key)
                key.append(c)
        elif state == "PRE_VALUE":
            if c in _NEWLINE:
                state = "PRE_KEY"
                _trim_key(key, last_key_whitespace)
                push()
                key, value = [], []
            elif c == "'":
                state = "SINGLE_QUOTE_VALUE"
            elif c == '"':
                state = "DOUBLE_QUOTE_VALUE"
            elif c == "\\":
                state = "VALUE_ESCAPE"
            elif c not in _WHITESPACE:
                state = "VALUE"
                value.append(c)
        elif state == "VALUE":
            if c in _NEWLINE:
                state = "PRE_KEY"
                _trim_key(key, last_key_whitespace)
                if last_value_whitespace >= 0:
                    del value[last_value_whitespace:]
                push()
                key, value = [], []
            elif c == "\\":
                state = "VALUE_ESCAPE"
                last_value_whitespace = -1
            else:
                if c not in _WHITESPACE:
                    last_value_whitespace = -1
                elif last_value_whitespace < 0:
                    last_value_whitespace = len(value)
                value.append(c)
        elif state == "VALUE_ESCAPE":
            state = "VALUE"
            if c not in _NEWLINE:
                value.append(c)
        elif state == "SINGLE_QUOTE_VALUE":
            if c == "'":
                state = "PRE_VALUE"
            else:
                value.append(c)
        elif state == "DOUBLE_QUOTE_VALUE":
            if c == '"':
                state = "PRE_VALUE"
            elif c == "\\":
                state = "DOUBLE_QUOTE_VALUE_ESCAPE"
            else:
                value.append(c)
        elif state == "DOUBLE_QUOTE_VALUE_ESCAPE":
            state = "DOUBLE_QUOTE_VALUE"
            if c in _NEEDS_ESCAPE:
                value.append(c)
            elif c != "\n":
                value.append("\\")
                value.append(c)
        elif state == "COMMENT":
            if c == "\\":
                state = "COMMENT_ESCAPE"
            elif c in _NEWLINE:
                state = "PRE_KEY"
        elif state == "COMMENT_ESCAPE":
            state = "COMMENT"

    if state in (
        "PRE_VALUE",
        "VALUE",
        "VALUE_ESCAPE",
        "SINGLE_QUOTE_VALUE",
        "DOUBLE_QUOTE_VALUE",
        "DOUBLE_QUOTE_VALUE_ESCAPE",
    ):
        _trim_key(key, last_key_whitespace)
        if state == "VALUE" and last_value_whitespace >= 0:
            del value[last_value_whitespace:]
        push()
    return pairs


def _trim_key(key: list, last_key_whitespace: int) -> None:
    if last_key_whitespace >= 0:
        del key[last_key_whitespace:]


def roundtrip_failures(variables: Dict[str, str]) -> Dict[str, str]:
    """Names whose value would not come back byte-exact from systemd, with the reason."""
    failures = {}
    for name, value in variables.items():
        reason = unrepresentable_reason(value)
        if reason:
            failures[name] = reason
            continue
        size = len(name.encode()) + 1 + len(value.encode("utf-8"))
        if size > MAX_ASSIGNMENT_BYTES:
            failures[name] = (
                f"makes {name}=VALUE {size} bytes; Linux passes at most "
                f"{MAX_ASSIGNMENT_BYTES} bytes per variable to a process"
            )
    if failures:
        return failures
    parsed = parse_env(encode_env(variables))
    for name, value in variables.items():
        if parsed.get(name) != value:
            failures[name] = "does not survive systemd's EnvironmentFile parsing"
    for name in parsed.keys() - variables.keys():
        failures[name] = "appears in the file without being set"
    return failures
