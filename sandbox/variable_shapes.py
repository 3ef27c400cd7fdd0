"""Secret values of every shape the variables tests import (CLI and API method alike).

`BASIC` are the first shapes a secret may hold; `EXPORT_DIFFERS` are the ones whose
`airflow variables export` differs from what was imported, so verification must model how
Airflow stores them.
"""

BASIC = {
    "json_value": {"nested": [1, 2, "x"]},
    "number": 42,
    "described": {"value": "with-desc-value", "description": "a description"},
    "-dash": "dash-value",
}

EXPORT_DIFFERS = {
    "num_str": "123",
    "bool": True,
    "null": None,
    "float": 1.5,
    "list": [1, "a", None],
    "json_str": '{"value": 1}',
    "empty": "",
    "unicode": "ünïcödé ✓ 日本",
    "wrapped_null": {"value": None, "description": None},
    "wrapped_obj": {"value": {"value": 2}, "description": ""},
}
