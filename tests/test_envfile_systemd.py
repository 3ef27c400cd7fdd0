"""EnvironmentFile round trip through a real systemd 252: the product's encoder and parser model.

`envfile.encode_env` writes the file; a transient unit with `EnvironmentFile=` dumps the
environment it was given (as bytes, hex-encoded JSON); every value must come back byte-exact.
`agent.platform.envfile.parse_env` (the model the agent checks before writing) must agree with what
systemd actually did, for the encoder's output and for hand-written files in other syntaxes.
The values `unrepresentable_reason` refuses are probed too: systemd must indeed fail to carry
them, so the refusal is neither missing nor over-cautious.

Findings on systemd 252 (Debian 12) and Linux, each asserted below:
- inside double quotes, with only \\ " $ and backtick escaped, every character but NUL comes
  back byte-exact: newlines, CR, CRLF, tabs, leading/trailing blanks, '#'/';' at a line start
  inside the value, an embedded `"\nOTHER=x\n"`, every other C0 control and DEL, non-ASCII,
  U+00A0, U+2028, a BOM, 100 kB values;
- a value that is not valid UTF-8, or holds a Unicode noncharacter (U+FDD0..U+FDEF,
  U+xxFFFE/U+xxFFFF): systemd logs "invalid UTF-8 value for key K ... ignoring" and then the
  unit FAILS TO START ("Failed to load environment files: Invalid argument") - one bad value
  takes every Airflow unit down;
- a NUL byte anywhere in the file: the unit fails to start ("Bad message");
- a `NAME=VALUE` longer than 131071 bytes (the kernel's MAX_ARG_STRLEN, 128 KiB with the NUL):
  systemd passes it, execve fails with E2BIG, the unit fails (status 203/EXEC);
- an invalid variable name (e.g. `export B=3`): the assignment is ignored, the unit starts.
"""

from __future__ import annotations

import json
import uuid
from typing import Dict, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.platform.envfile import encode_env, parse_env, unrepresentable_reason
from sandbox.systemd_host import SystemdHost

pytestmark = pytest.mark.systemd

DUMP = """#!/usr/bin/python3
# Writes the environment this process got, as bytes (hex), to argv[1].
import json, os, sys
env = {k.hex(): v.hex() for k, v in os.environb.items()}
with open(sys.argv[1], "w") as f:
    json.dump(env, f)
"""

CONTROL = {f"CTRL_{i:02X}": f"a{chr(i)}b" for i in list(range(1, 32)) + [127]}

TRICKY: Dict[str, str] = {
    "DQUOTE": 'he said "hi"',
    "SQUOTE": "'single'",
    "APOS": "it's",
    "BACKSLASH": "a\\b",
    "BACKSLASH2": "\\\\",
    "BACKSLASH_END": "C:\\path\\",
    "BACKSLASH_N": "\\n",
    "BACKSLASH_NEWLINE": "a\\\nb",
    "DOLLAR": "$HOME",
    "DOLLAR_BRACE": "${HOME}x",
    "DOLLAR_ALONE": "$",
    "DOLLARS": "$$",
    "BACKTICK": "`id`",
    "NEWLINE": "line1\nline2",
    "NEWLINE_ONLY": "\n",
    "NEWLINE_TRAIL": "x\n",
    "NEWLINE_LEAD": "\nx",
    "CR": "a\rb",
    "CRLF": "a\r\nb",
    "CR_TRAIL": "x\r",
    "TAB": "a\tb",
    "TAB_ONLY": "\t",
    "SPACES": "  padded  ",
    "SPACE_ONLY": " ",
    "EMPTY": "",
    "HASH_START": "#not a comment",
    "SEMI_START": ";not a comment",
    "HASH_LINE": "a\n#not a comment",
    "SEMI_LINE": "a\n;not a comment",
    "EQUALS": "x=y",
    "EQUALS_ONLY": "=",
    "INJECT": 'v"\nOTHER=injected\n"',
    "INJECT2": "v\nOTHER2=injected",
    "SINGLE_QUOTE_SPAN": "'\nX=1\n'",
    "NON_ASCII": "héllo wörld",
    "CJK": "日本語",
    "EMOJI": "🙂",
    "NBSP": "\u00a0x\u00a0",
    "LINE_SEP": "a\u2028b",
    "BOM": "\ufeffx",
    "JSON": '{"a": [1, "b\\\\c"], "d": null}',
    "URL": "postgresql+psycopg2://user:p%40ss@db:5432/airflow?sslmode=require",
    "LONG": "x" * 100_000,
    **CONTROL,
}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with SystemdHost(tmp_path_factory.mktemp("envfile-shared"), name="aea-envfile") as h:
        h.write_file("/usr/local/bin/aea-envdump", DUMP, mode=0o755)
        yield h


def systemd_reads(host: SystemdHost, data: bytes) -> Optional[Dict[bytes, bytes]]:
    """What a unit gets from EnvironmentFile=<data>; None if the unit could not start."""
    tag = uuid.uuid4().hex
    path, out = f"/etc/aea-envprobe/{tag}.env", f"/run/aea-envprobe-{tag}.json"
    host.write_file(path, data, mode=0o640)
    proc = host.run(
        [
            "systemd-run",
            "--wait",
            "-q",
            "--collect",
            "-p",
            f"EnvironmentFile={path}",
            "/usr/local/bin/aea-envdump",
            out,
        ],
        check=False,
    )
    if proc.returncode != 0:
        return None
    dumped = json.loads(host.read_file(out))
    host.run(["rm", "-f", path, out])
    return {bytes.fromhex(k): bytes.fromhex(v) for k, v in dumped.items()}


def test_encoder_round_trips_every_tricky_value(host: SystemdHost) -> None:
    assert not {
        k: unrepresentable_reason(v) for k, v in TRICKY.items() if unrepresentable_reason(v)
    }
    got = systemd_reads(host, encode_env(TRICKY))
    assert got is not None
    wrong = {
        k: (v, got.get(k.encode(), b"<absent>").decode("utf-8", "replace"))
        for k, v in TRICKY.items()
        if got.get(k.encode()) != v.encode()
    }
    assert not wrong, wrong
    assert b"OTHER" not in got and b"OTHER2" not in got and b"X" not in got


def test_parse_model_agrees_with_systemd_on_encoder_output(host: SystemdHost) -> None:
    data = encode_env(TRICKY)
    got = systemd_reads(host, data)
    assert got is not None
    model = {k.encode(): v.encode() for k, v in parse_env(data).items()}
    assert {k: v for k, v in got.items() if k in model} == model


# Hand-written files in the other syntaxes systemd accepts, to hold the parser model to reality.
HANDWRITTEN = [
    b"A=plain\nB= spaced value  \nC=with\\ escaped\\ spaces\nD=back\\\\slash\n",
    b"A='single $quoted \\n'\nB='multi\nline'\nC=\"dq \\n \\t \\$ \\` \\\\ \\\"\"\n",
    b"# comment\n; comment\n  # indented comment\nA=1 # not a comment\nnoequals\nB=2\n",
    b"A=first\nA=second\n C = 4\n",
    b'A="unterminated\nB=2\n',
    b'A=x\\\ny\nB="x\\\ny"\n',
    b"A=1\r\nB=2\r\n",
    b"A=\"q\"unquoted' s'\n",
]


@pytest.mark.parametrize("data", HANDWRITTEN, ids=range(len(HANDWRITTEN)))
def test_parse_model_agrees_with_systemd_on_handwritten_files(
    host: SystemdHost, data: bytes
) -> None:
    got = systemd_reads(host, data)
    assert got is not None
    model = {k.encode(): v.encode() for k, v in parse_env(data).items()}
    ours = {k: v for k, v in got.items() if k in model or k in (b"A", b"B", b"C", b"D")}
    assert ours == model


# What systemd 252 cannot carry; the encoder's refusal list must cover exactly these kinds.
@pytest.mark.parametrize(
    "value", ["a\ufdd0b", "a\ufffeb", "a\uffffb", "a\U0001fffeb", "a\U0010ffffb"]
)
def test_noncharacters_fail_the_unit_and_are_refused(host: SystemdHost, value: str) -> None:
    assert unrepresentable_reason(value)
    assert systemd_reads(host, b'BAD="' + value.encode() + b'"\nGOOD="1"\n') is None


@pytest.mark.parametrize("raw", [b'BAD="a\xffb"\n', b"BAD=a\xffb\n", b"BAD='a\xffb'\n"])
def test_invalid_utf8_fails_the_unit(host: SystemdHost, raw: bytes) -> None:
    # Text from SSM is str, so this can only arise from a lone surrogate, which
    # unrepresentable_reason refuses (and encode_env cannot even encode).
    assert unrepresentable_reason("a\udcffb")
    assert systemd_reads(host, raw + b'GOOD="1"\n') is None


def test_nul_fails_the_unit(host: SystemdHost) -> None:
    assert unrepresentable_reason("a\0b")
    assert systemd_reads(host, b'BAD="a\0b"\nGOOD="1"\n') is None


def test_assignment_longer_than_max_arg_strlen_fails_the_unit(host: SystemdHost) -> None:
    limit = 131072 - 1  # MAX_ARG_STRLEN counts the terminating NUL of "NAME=VALUE"
    fits = "x" * (limit - len("LV="))
    got = systemd_reads(host, encode_env({"LV": fits}))
    assert got is not None and got[b"LV"] == fits.encode()
    assert systemd_reads(host, encode_env({"LV": fits + "x"})) is None


def test_encoder_refuses_assignment_longer_than_max_arg_strlen() -> None:
    from agent.platform.envfile import roundtrip_failures

    assert roundtrip_failures({"LV": "x" * (131072 - len("LV="))})


def test_invalid_names_are_ignored_by_systemd(host: SystemdHost) -> None:
    got = systemd_reads(host, b"export B=3\nGOOD=1\n")
    assert got is not None and got[b"GOOD"] == b"1" and b"export B" not in got


def test_parse_model_ignores_invalid_names() -> None:
    assert "export B" not in parse_env(b"export B=3\nGOOD=1\n")


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_text, min_size=1, max_size=20))
def test_random_values_round_trip(host: SystemdHost, values) -> None:
    env = {f"V{i}": v for i, v in enumerate(values) if not unrepresentable_reason(v)}
    if not env:
        return
    got = systemd_reads(host, encode_env(env))
    assert got is not None
    assert {k: got.get(k.encode()) for k in env} == {k: v.encode() for k, v in env.items()}
