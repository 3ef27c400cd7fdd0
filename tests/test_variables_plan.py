"""Unit tests of the pure core of `variables sync`: secret shape, plan, export verification."""

from __future__ import annotations

import json

import pytest

from agent.jobs.variables.plan import (
    SecretShapeError,
    check_key,
    entry_digest,
    expected_export,
    import_document,
    name_list,
    parse_secret,
    plan_variables,
    secrets_backend,
    shadowed_by_env,
    verify_deleted,
    verify_import,
)

KEY = b"k" * 32
SECRET_VALUE = "s3cr3t-do-not-print"


@pytest.mark.parametrize(
    "text, problem",
    [
        (None, "no SecretString"),
        ("", "not valid JSON"),
        ('{"a": ', "not valid JSON"),
        ("[1, 2]", "got an array"),
        ('"just a string"', "got a string"),
        ("42", "got a number"),
        ("null", "got null"),
        ('{"a": 1, "a": 2}', 'duplicate key "a"'),
        ('{"a": {"x": 1, "x": 2}}', 'duplicate key "x"'),
        ('{"": "v"}', "empty key"),
        ('{"  ": "v"}', "blank key"),
        ('{"a\\nb": "v"}', "control character"),
        ('{"a": NaN}', "NaN is not a JSON value"),
        ('{"a": Infinity}', "Infinity is not a JSON value"),
        ('{"' + "k" * 251 + '": "v"}', "251 characters; Airflow allows 250"),
        ('{"a": {"value": 1, "other": 2}}', 'may only also have "description", found "other"'),
        ('{"a": {"value": 1, "description": 5}}', '"description" must be a string or null'),
        ('{"a": "\\ud800"}', "not valid Unicode"),
    ],
)
def test_bad_shapes_are_refused_naming_the_problem(text, problem):
    with pytest.raises(SecretShapeError) as err:
        parse_secret(text)
    assert problem in str(err.value)


def test_error_messages_never_quote_values():
    v = json.dumps(SECRET_VALUE)
    bad = '{"a": ' + v + ', "b": {"value": ' + v + ', "description": 7}}'
    for text in (bad, '{"a": ' + v + ' "b"}', "[" + v + "]"):
        with pytest.raises(SecretShapeError) as err:
            parse_secret(text)
        assert SECRET_VALUE not in str(err.value)


def test_good_shapes_parse():
    secret = parse_secret(
        '{"s": "x", "n": 1, "b": true, "z": null, "l": [1], "o": {"p": 1},'
        ' "w": {"value": "v", "description": "d"}, "w2": {"value": {"q": 1}}}'
    )
    assert set(secret) == {"s", "n", "b", "z", "l", "o", "w", "w2"}
    assert parse_secret("{}") == {}


def test_plan_new_changed_unchanged_removed():
    old = {"same": "1", "chg": "old", "gone": "x"}
    hashes = {k: entry_digest(KEY, v) for k, v in old.items()}
    plan = plan_variables({"same": "1", "chg": "new", "add": "a"}, hashes, KEY)
    assert plan.new == ["add"]
    assert plan.changed == ["chg"]
    assert plan.unchanged == ["same"]
    assert plan.removed == ["gone"]
    assert plan.to_import == ["add", "chg"]


def test_digest_follows_what_airflow_stores():
    # Airflow stores 1 and "1" as the same string: no re-import for a type-only edit
    assert entry_digest(KEY, 1) == entry_digest(KEY, "1")
    assert entry_digest(KEY, {"value": "v"}) == entry_digest(KEY, "v")
    # a description change is a change
    assert entry_digest(KEY, {"value": "v", "description": "d"}) != entry_digest(KEY, "v")
    # keyed: another instance's key gives other hashes, and no value is recoverable
    assert entry_digest(KEY, "v") != entry_digest(b"o" * 32, "v")
    assert SECRET_VALUE not in entry_digest(KEY, SECRET_VALUE)


def test_verify_against_airflow_export_reconstruction():
    secret = {
        "s": "plain",
        "num_str": "123",
        "num": 123,
        "obj": {"a": [1, 2]},
        "desc": {"value": "v", "description": "d"},
        "wrapped_obj": {"value": {"value": 1}},
        "empty_desc": {"value": "v", "description": ""},
    }
    # what airflow variables export writes for these after an import (see variable_command.py)
    exported = {
        "s": "plain",
        "num_str": 123,
        "num": 123,
        "obj": {"a": [1, 2]},
        "desc": {"value": "v", "description": "d"},
        "wrapped_obj": {"value": {"value": 1}, "description": None},
        "empty_desc": "v",
        "unmanaged": "whatever",
    }
    landed, failed = verify_import(secret, sorted(secret), exported)
    assert failed == []
    assert sorted(landed) == sorted(secret)
    exported["num"] = 124
    del exported["s"]
    landed, failed = verify_import(secret, sorted(secret), exported)
    assert failed == ["num", "s"]
    assert verify_deleted(["unmanaged", "x"], exported) == (["x"], ["unmanaged"])


def test_expected_export_keeps_type_distinctions():
    assert expected_export(True) != expected_export(1)
    assert expected_export("true") == expected_export(True)  # Airflow cannot tell them apart


def test_import_document_holds_only_the_keys_asked():
    doc = json.loads(import_document({"a": 1, "b": {"value": "x"}, "c": 3}, ["b"]))
    assert doc == {"b": {"value": "x"}}


def test_shadowing():
    env = {"AIRFLOW_VAR_MY_KEY": "x", "AIRFLOW__SECRETS__BACKEND": ""}
    assert shadowed_by_env(["my_key", "other"], env) == ["my_key"]
    assert secrets_backend(env) is None
    env["AIRFLOW__SECRETS__BACKEND"] = "airflow.providers.amazon.SecretsManagerBackend"
    assert secrets_backend(env) == "AIRFLOW__SECRETS__BACKEND"


@pytest.mark.parametrize(
    "kwargs, shadows",
    [
        # the template's: Variables stay in the database, the backend is never asked for one
        (
            '{"config_prefix": "airflow/s/config", "connections_prefix": null, '
            '"variables_prefix": null}',
            False,
        ),
        ('{"variables_path": null}', False),  # HashiCorp Vault's name for it
        ('{"variables_prefix": "airflow/variables"}', True),
        ('{"connections_prefix": null}', True),  # variables_prefix left at its default
        ("", True),
        ("not json", True),  # cannot tell: warn
    ],
)
def test_a_backend_whose_variables_prefix_is_null_shadows_nothing(kwargs, shadows):
    env = {
        "AIRFLOW__SECRETS__BACKEND": "airflow.providers.amazon.aws.secrets.secrets_manager."
        "SecretsManagerBackend",
        "AIRFLOW__SECRETS__BACKEND_KWARGS": kwargs,
    }
    assert (secrets_backend(env) is not None) is shadows


def test_name_list_truncates():
    assert name_list(["a", "b"]) == "a, b"
    assert name_list([str(i) for i in range(25)], limit=3) == "0, 1, 2 and 22 more"


def test_api_items_and_digest_verification():
    from agent.airflow.bridge_server import digest
    from agent.jobs.variables.plan import bridge_item, verify_absent, verify_digests

    secret = {
        "s": "text",
        "n": 42,
        "obj": {"a": [1, 2]},
        "wrapped": {"value": {"x": 1}, "description": "d"},
        "null": None,
    }
    items = {k: bridge_item(v) for k, v in secret.items()}
    # what `airflow variables import` stores: strings as is, the rest as indented JSON
    assert items["s"] == {"value": "text", "description": None}
    assert items["n"] == {"value": "42", "description": None}
    assert items["wrapped"] == {"value": json.dumps({"x": 1}, indent=2), "description": "d"}
    assert items["null"]["value"] == "null"
    key = b"k" * 32
    # the bridge's digest of what Airflow stores, for each stored row
    digests = {k: digest(key, i["value"], i["description"]) for k, i in items.items()}
    assert verify_digests(secret, sorted(secret), digests, key) == (sorted(secret), [])
    # a different stored value, a different description, a missing row, an unreadable row
    digests["s"] = digest(key, "other", None)
    digests["wrapped"] = digest(key, items["wrapped"]["value"], "changed")
    digests["n"] = None
    digests["obj"] = "error:InvalidToken"
    landed, failed = verify_digests(secret, sorted(secret), digests, key)
    assert landed == ["null"] and failed == ["n", "obj", "s", "wrapped"]
    # another key (another bridge) never matches
    assert verify_digests({"s": "text"}, ["s"], {"s": digest(b"x" * 32, "text", None)}, key)[1]
    # deletes: absent is gone; present or unreadable is still there
    assert verify_absent(["n", "obj", "s"], digests) == (["n"], ["obj", "s"])


# -- exact messages, limits and persisted forms (each kills a mutant `make mutate` found
# surviving; see docs/mutation.md) ------------------------------------------------------------


def _refusal(text):
    with pytest.raises(SecretShapeError) as err:
        parse_secret(text)
    return str(err.value)


def test_refusal_messages_are_exact():
    assert _refusal(None) == "the secret has no SecretString (a binary secret is not supported)"
    assert _refusal("true") == "must be a JSON object of variable names to values, got a boolean"
    assert _refusal("[" * 100_000) == "not valid JSON: nested too deeply"
    assert _refusal('{"": 1}') == "has an empty key"
    assert _refusal('{" ": 1}') == "has a blank key"
    assert _refusal('{"\\udc80": 1}') == "a key is not valid Unicode (lone surrogate escape)"
    assert _refusal('{"a": {"value": 1, "zz": 2, "aa": 3}}') == (
        'key "a": an object with "value" may only also have "description", found "aa", "zz"'
    )
    assert _refusal('{"a": {"value": 1, "description": false}}') == (
        'key "a": "description" must be a string or null, got a boolean'
    )
    assert _refusal('{"a": {"value": 1, "description": {}}}') == (
        'key "a": "description" must be a string or null, got dict'
    )
    with pytest.raises(SecretShapeError) as err:
        check_key(7)
    assert str(err.value) == "key 7 is not a string"


def test_keys_are_shown_whole_up_to_60_characters():
    k60, k61 = "k" * 60, "k" * 61
    assert _refusal('{"' + k60 + '\\u007f": 1}') == (
        'key "' + "k" * 57 + '..." contains a control character'
    )
    assert _refusal('{"' + k60 + '": {"value": 1, "x": 2}}').startswith('key "' + k60 + '":')
    assert _refusal('{"' + k61 + '": {"value": 1, "x": 2}}').startswith(
        'key "' + "k" * 57 + '...":'
    )


def test_key_limits():
    assert parse_secret('{"' + "k" * 250 + '": 1}')  # Airflow's column holds 250
    assert "251 characters" in _refusal('{"' + "k" * 251 + '": 1}')
    assert parse_secret('{"a b~": 1}')  # space and ~ are printable
    for control in ("\\u0000", "\\u001f", "\\u007f"):
        # the message shows the key JSON-escaped, so the control character is visible
        assert _refusal('{"a' + control + '": 1}') == (
            'key "a' + control + '" contains a control character'
        )


def test_digests_are_pinned_because_they_are_persisted():
    # variables.json keeps these: a change would re-import every variable after an upgrade
    assert entry_digest(KEY, {"value": "\u00e9", "description": "\u00fc"}) == (
        "ff2635fc97a044977916b600b2328d13e00a2fb035c0b6594bd7acafa94b47e0"
    )
    plan = plan_variables({"a": "1", "b": {"value": "\u00e9"}}, {}, KEY)
    assert plan.digests == {"a": entry_digest(KEY, "1"), "b": entry_digest(KEY, "\u00e9")}


def test_documents_are_ascii_json():
    assert import_document({"\u00e9": "\u00fc", "x": 1}, ["\u00e9"]) == (b'{"\\u00e9": "\\u00fc"}')
    assert expected_export({"value": {"b": 1, "a": "\u00e9"}, "description": "d"}) == (
        '{"description": "d", "value": {"a": "\\u00e9", "b": 1}}'
    )


def test_verification_ignores_key_order():
    secret = {"o": {"b": 1, "a": 2}}
    assert verify_import(secret, ["o"], {"o": {"a": 2, "b": 1}}) == (["o"], [])


def test_name_list_limit_is_inclusive():
    twenty = [str(i) for i in range(20)]
    assert name_list(twenty) == ", ".join(twenty)
    assert name_list(twenty + ["x"]) == ", ".join(twenty) + " and 1 more"
    assert name_list(["a", "b", "c"], limit=3) == "a, b, c"


def test_why_airflow_did_not_load_names_the_os_error_not_only_its_class():
    from agent.airflow.bridge_server import _load_err

    no_tmp = FileNotFoundError(2, "No usable temporary directory found in ['/tmp']")
    assert _load_err(no_tmp) == (
        "FileNotFoundError: No usable temporary directory found in ['/tmp']"
    )
    assert _load_err(ImportError("secret-looking text")) == "ImportError"
