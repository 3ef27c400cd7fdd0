"""The EnvironmentFile encoder and our model of systemd's parser (pure; no systemd here).

The real-systemd round trip lives in tests/test_envfile_systemd.py; these pin the parser to
systemd 252's documented rules and prove encode -> parse is exact for any value it accepts.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.platform import envfile
from agent.platform.envfile import encode_env, parse_env, roundtrip_failures, unrepresentable_reason

# any unicode except NUL (the alphabet), biased towards the characters that matter
TRICKY = st.sampled_from(list("\"'\\$`#; \t\n\r=") + ["\\n", "${X}", "$(id)", "é", "😀"])
VALUES = st.lists(
    st.one_of(TRICKY, st.text(st.characters(blacklist_characters="\x00"), max_size=8)), max_size=12
).map("".join)


@settings(max_examples=600, deadline=None)
@given(VALUES)
def test_encode_then_parse_returns_the_exact_value_or_names_it(value):
    failures = roundtrip_failures({"V": value})
    if failures:
        assert set(failures) == {"V"}
        assert unrepresentable_reason(value) is not None
    else:
        assert parse_env(encode_env({"V": value})) == {"V": value}


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), VALUES, max_size=6
    )
)
def test_many_values_in_one_file_do_not_bleed_into_each_other(variables):
    failures = roundtrip_failures(variables)
    ok = {k: v for k, v in variables.items() if k not in failures}
    assert parse_env(encode_env(ok)) == ok


def test_systemd_rules_for_unquoted_and_quoted_values():
    text = (
        b"# comment=ignored\n"
        b"; also=ignored\n"
        b"no equals sign\n"
        b"PLAIN=  spaced value  \n"
        b"ESC=a\\ b\\$c\n"
        b"SQ='it''s \\n literal'\n"
        b'DQ="keep \\n unknown, unescape \\" \\\\ \\$ \\`"\n'
        b'MULTI="line1\nline2"\n'
        b"CONT=one\\\ntwo\n"
        b" KEY_WS =x\n"
        b"DOLLAR=$HOME\n"
        b"MIXED=\"a\"b'c'\n"
        b"LAST=1\n"
        b"LAST=2\n"
    )
    assert parse_env(text) == {
        "PLAIN": "spaced value",
        "ESC": "a b$c",
        "SQ": "its \\n literal",
        "DQ": 'keep \\n unknown, unescape " \\ $ `',
        "MULTI": "line1\nline2",
        "CONT": "onetwo",
        "KEY_WS": "x",
        "DOLLAR": "$HOME",
        "MIXED": "ab'c'",  # after a closing quote the rest is unquoted: ' is literal
        "LAST": "2",
    }


def test_comment_markers_only_count_at_line_start():
    assert parse_env(b'A="#not a comment"\n#B=1\nC=x;y\n') == {"A": "#not a comment", "C": "x;y"}


def test_value_starting_a_line_with_hash_survives_inside_quotes():
    value = "first\n# looks like a comment\n; and this\n  B=injected"
    assert parse_env(encode_env({"A": value})) == {"A": value}


def test_unrepresentable_values_are_named():
    assert "NUL" in roundtrip_failures({"A": "x\x00y"})["A"]
    assert "surrogate" in roundtrip_failures({"A": "\udc80"})["A"]
    assert "noncharacter" in roundtrip_failures({"A": "a\ufffe"})["A"]
    assert "noncharacter" in roundtrip_failures({"A": "\ufdd0"})["A"]
    assert roundtrip_failures({"A": "plain"}) == {}


def test_encoding_is_sorted_and_stable():
    a = encode_env({"B": "2", "A": "1"}, header="h")
    b = encode_env({"A": "1", "B": "2"}, header="h")
    assert a == b == b'# h\nA="1"\nB="2"\n'


def test_assignment_longer_than_linux_allows_is_refused():
    limit = 131071
    assert roundtrip_failures({"LV": "x" * (limit - len("LV="))}) == {}
    assert "131071" in roundtrip_failures({"LV": "x" * (limit - len("LV=") + 1)})["LV"]
    # the limit is in bytes, not characters
    assert roundtrip_failures({"LV": "é" * 65535})


def test_invalid_names_are_dropped_like_systemd_does():
    assert parse_env(b"export B=3\nGOOD=1\n") == {"GOOD": "1"}


# -- systemd 252's state machine, one transition at a time ------------------------------------
# Each case pins a path through src/basic/env-file.c (v252) that the tests above do not reach;
# `make mutate` found each one unguarded (docs/mutation.md).


# (tests/test_envfile_transitions_systemd.py holds these to a real systemd 252)
PARSER_CASES = [
    # the end of the file ends the assignment in every value state, no newline needed
    (b"A=x", {"A": "x"}),
    (b"A=x  ", {"A": "x"}),  # unquoted: trailing whitespace trimmed at the end too
    (b"A =x", {"A": "x"}),  # the key's trailing whitespace too
    (b"A=", {"A": ""}),
    (b"A =", {"A": ""}),
    (b"A='x ", {"A": "x "}),  # an unterminated quote keeps what it has
    (b'A="x ', {"A": "x "}),
    (b'A="x\\', {"A": "x"}),  # ... also when the file ends inside an escape
    (b"A=x\\", {"A": "x"}),
    (b"A=\\", {"A": ""}),
    (b"A=''  ", {"A": ""}),  # quoted then whitespace: nothing to trim
    # a key without "=" at the end of the file is not an assignment
    (b"A", {}),
    (b"A=1\nB", {"A": "1"}),
    # key whitespace before "=" then an empty value ending the line
    (b"A =\nB=2\n", {"A": "", "B": "2"}),
    # a backslash first in the value escapes the next character, whitespace included
    (b"A=\\ x\n", {"A": " x"}),
    (b"A=\\\\x\n", {"A": "\\x"}),
    # an escaped character is never trimmed as trailing whitespace
    (b"A=a\\ \n", {"A": "a "}),
    (b"A=a \\ \n", {"A": "a  "}),
    (b"A=a\\b c\n", {"A": "ab c"}),
    # backslash-newline first in the value: the value continues on the next line, where
    # leading whitespace is value (and trailing whitespace is still trimmed)
    (b"A=\\\n  x  \n", {"A": "  x"}),
    (b"A=\\\n  \n", {"A": ""}),
    (b"A=\\\n  ", {"A": ""}),
    # after a closing quote the value goes on unquoted; its trailing whitespace is trimmed
    (b"A='ab'c \n", {"A": "abc"}),
    (b"A='ab'c  d \n", {"A": "abc  d"}),
    (b'A="ab"c \n', {"A": "abc"}),
    # backslash-newline inside double quotes is removed, both characters
    (b'A="a\\\nb"\n', {"A": "ab"}),
    (b'A="a\\\rb"\n', {"A": "a\\\rb"}),
    # a comment ending in a backslash swallows the next line too (systemd < 254)
    (b"#c\\\nB=1\nC=2\n", {"C": "2"}),
    (b";c\\\nB=1\nC=2\n", {"C": "2"}),
    (b"#c\\x\nB=1\n", {"B": "1"}),
    (b"#\\", {}),
    # a key line without "=" is dropped, and the next line starts afresh
    (b"AAAAAA =1\nB =2\n", {"AAAAAA": "1", "B": "2"}),
    (b"NOPE\nB=2\n", {"B": "2"}),
    (b"X Y=1\n", {}),  # whitespace inside a key: not a valid name
    (b"\r\nA=1\r\n", {"A": "1"}),  # CR ends a line like LF
]


@pytest.mark.parametrize("text, parsed", PARSER_CASES)
def test_parser_transitions(text, parsed):
    assert parse_env(text) == parsed


def test_bytes_that_are_not_utf8_come_back_as_surrogate_escapes():
    # the model must not raise on a file it did not write; roundtrip_failures refuses such values
    assert parse_env(b"A=\xff\nB=1\n") == {"A": "\udcff", "B": "1"}


@pytest.mark.parametrize(
    "value, representable",
    [
        ("\ud7ff", True),
        ("\ud800", False),
        ("\ud801", False),
        ("\udffe", False),
        ("\udfff", False),
        ("\ue000", True),
        ("\ufdcf", True),
        ("\ufdd0", False),
        ("\ufdee", False),
        ("\ufdef", False),
        ("\ufdf0", True),
        ("\ufffd", True),
        ("\ufffe", False),
        ("\uffff", False),
        ("\U0001fffe", False),
        ("\U0001ffff", False),
        ("\U0010ffff", False),
        ("\U00010000", True),
    ],
)
def test_unrepresentable_boundaries(value, representable):
    assert (unrepresentable_reason("x" + value) is None) == representable


def test_unrepresentable_reasons_are_exact():
    assert unrepresentable_reason("a\x00") == "contains a NUL character"
    assert unrepresentable_reason("\udc80") == "is not valid UTF-8 (lone surrogate)"
    assert unrepresentable_reason("\ufffe") == (
        "contains the Unicode noncharacter U+FFFE, which systemd rejects"
    )
    assert unrepresentable_reason("\U0010ffff") == (
        "contains the Unicode noncharacter U+10FFFF, which systemd rejects"
    )


def test_every_unrepresentable_value_is_named_at_once():
    assert roundtrip_failures({"A": "\x00", "B": "ok", "C": "\udc80"}) == {
        "A": "contains a NUL character",
        "C": "is not valid UTF-8 (lone surrogate)",
    }


def test_an_invalid_name_is_refused_naming_it():
    with pytest.raises(ValueError) as err:
        encode_env({"OK": "1", "NOT-OK": "2"})
    assert str(err.value) == "invalid environment variable name 'NOT-OK'"


def test_no_header_means_no_comment_lines():
    assert encode_env({"A": "1"}) == b'A="1"\n'
    assert encode_env({}) == b""
    assert encode_env({}, header="one\ntwo") == b"# one\n# two\n"


def test_the_final_check_names_what_the_model_would_not_return(monkeypatch):
    # Unreachable while encoder and model agree (the properties above); this is the safety
    # net for a future bug in either, so prove it with a model that disagrees on purpose.
    monkeypatch.setattr(envfile, "parse_env", lambda data: {"A": "other", "B": "2", "C": "3"})
    assert roundtrip_failures({"A": "1", "B": "2"}) == {
        "A": "does not survive systemd's EnvironmentFile parsing",
        "C": "appears in the file without being set",
    }
