"""The EnvironmentFile encoder and our model of systemd's parser (pure; no systemd here).

The real-systemd round trip lives in tests/test_envfile_systemd.py; these pin the parser to
systemd 252's documented rules and prove encode -> parse is exact for any value it accepts.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

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
