"""The typed state registry (agent/state.py): documents load with defaults for missing fields,
refuse nonsense with a named error, are written atomically 0600 in a 0700 dir, and `status`
finds every document through the registry."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

import pytest

from agent import state as st
from agent.jobs.drain.plan import DrainState
from agent.jobs.env_sync.state import EnvDoc
from agent.jobs.role_state import RoleDoc
from agent.jobs.variables.state import VariablesDoc
from agent.state import StateDoc, StateDocError, StateStore, register, registered, registration


@dataclass
class SampleDoc(StateDoc):
    name: ClassVar[str] = "test-sample"
    version: ClassVar[int] = 2

    count: int = 0
    ratio: Optional[float] = None
    tags: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)
    flag: bool = False

    @classmethod
    def migrate(cls, data: Dict[str, Any], version: int) -> Dict[str, Any]:
        if version < 2 and "n" in data:  # version 1 called it "n"
            data["count"] = data.pop("n")
        return data


register(SampleDoc)


@pytest.fixture
def store(tmp_path):
    return StateStore(tmp_path / "state")


def write(store: StateStore, name: str, body: Any) -> None:
    store.dir.mkdir(parents=True, exist_ok=True)
    (store.dir / f"{name}.json").write_text(body if isinstance(body, str) else json.dumps(body))


def test_absent_document_is_none(store):
    assert store.read(SampleDoc) is None and store.load_doc(SampleDoc) is None


def test_save_is_0600_in_a_0700_dir_and_carries_the_version(store):
    store.save_doc(SampleDoc(count=3, tags=["a"]))
    path = store.dir / "test-sample.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.dir).st_mode) == 0o700
    assert json.loads(path.read_text()) == {
        "version": 2,
        "count": 3,
        "ratio": None,
        "tags": ["a"],
        "extra": {},
        "flag": False,
    }
    assert store.read(SampleDoc) == SampleDoc(count=3, tags=["a"])
    # no temp file left beside it
    assert sorted(p.name for p in store.dir.iterdir()) == ["test-sample.json"]


def test_missing_fields_take_defaults_and_unknown_fields_are_ignored(store):
    write(store, "test-sample", {"version": 2, "ratio": 1, "from_the_future": [1]})
    doc = store.read(SampleDoc)
    assert doc == SampleDoc(ratio=1.0)
    assert isinstance(doc.ratio, float)


def test_an_unversioned_old_document_is_migrated(store):
    write(store, "test-sample", {"n": 7})
    assert store.read(SampleDoc) == SampleDoc(count=7)


@pytest.mark.parametrize(
    "body, named",
    [
        ({"count": "7"}, "field 'count' must be an integer, got '7'"),
        ({"count": True}, "field 'count' must be an integer"),
        ({"count": 1.5}, "field 'count' must be an integer"),
        ({"ratio": "x"}, "field 'ratio' must be a number"),
        ({"ratio": False}, "field 'ratio' must be a number"),
        ({"tags": "a"}, "field 'tags' must be a list"),
        ({"tags": ["a", 2]}, "field 'tags[1]' must be a string, got 2"),
        ({"extra": []}, "field 'extra' must be an object"),
        ({"flag": 1}, "field 'flag' must be true or false"),
        ({"version": 3}, "version 3 was written by a newer agent (this one reads up to 2)"),
        ({"version": "2"}, "field 'version' is '2'"),
        ({"version": -1}, "field 'version' is -1"),
        ([1, 2], "not a JSON object (list)"),
        ("{not json", "not JSON"),
    ],
)
def test_nonsense_is_refused_with_a_named_error(store, body, named):
    write(store, "test-sample", body)
    with pytest.raises(StateDocError) as err:
        store.read(SampleDoc)
    message = str(err.value)
    assert named in message
    assert "test-sample" in message  # the document (and for content errors, its file)
    # load treats it as absent: a record must not stop a job
    assert store.load_doc(SampleDoc) is None


def test_update_keeps_other_fields_and_checks_types(store):
    store.update_doc(SampleDoc, count=1, tags=["x"])
    store.update_doc(SampleDoc, ratio=0.5)
    assert store.read(SampleDoc) == SampleDoc(count=1, ratio=0.5, tags=["x"])
    with pytest.raises(StateDocError, match="field 'count' must be an integer"):
        store.update_doc(SampleDoc, count="many")
    with pytest.raises(TypeError, match="no field"):
        store.update_doc(SampleDoc, nope=1)
    assert store.read(SampleDoc) == SampleDoc(count=1, ratio=0.5, tags=["x"])


def test_update_replaces_a_nonsense_document(store):
    write(store, "test-sample", {"count": "x", "tags": ["kept?"]})
    store.update_doc(SampleDoc, flag=True)
    assert store.read(SampleDoc) == SampleDoc(flag=True)


def test_delete(store):
    store.save_doc(SampleDoc())
    store.delete(SampleDoc)
    store.delete(SampleDoc)  # absent: fine
    assert store.read(SampleDoc) is None


def test_drain_state_is_registered_without_touching_the_pure_plan(store):
    entry = registration(DrainState)
    assert (entry.name, entry.version, entry.status_key) == ("drain", 1, "drain")
    doc = DrainState(phase="waiting", node="celery@h", started=1.0, deadline=9.0)
    store.save_doc(doc)
    assert json.loads((store.dir / "drain.json").read_text())["version"] == 1
    assert store.read(DrainState) == doc
    # DrainState.from_dict answers None for a foreign document: the store names it
    write(store, "drain", {"state": "draining"})
    with pytest.raises(StateDocError, match="drain: not a drain document this agent wrote"):
        store.read(DrainState)
    assert store.load_doc(DrainState) is None


def test_role_document_refuses_a_role_that_is_not_one(store):
    write(store, "role", {"role": "gardener"})
    with pytest.raises(StateDocError, match="field 'role' must be one of scheduler"):
        store.read(RoleDoc)
    write(store, "role", {"role": "worker", "decided_at": 5})
    assert store.read(RoleDoc) == RoleDoc(role="worker", decided_at=5.0)


def test_the_registry_knows_every_job_document():
    names = [r.name for r in registered()]
    for name in (
        "role",
        "confapply",
        "env",
        "variables",
        "variables-hashes",
        "variables-watch",
        "drain",
        "lifecycle",
        "task-credentials",
        "deploy",
        "worker",
    ):
        assert name in names
    keys = [r.status_key for r in registered() if r.status_key]
    assert keys == [
        "env",
        "variables",
        "variables_watch",
        "drain",
        "lifecycle",
        "task_credentials",
        "deploy",
        "metrics",
        "target_group",
        "worker",
    ]
    for entry in registered():
        if entry.doc_type is not SampleDoc and entry.name != "drain":
            # every field has a default: an absent field never stops a load
            assert entry.doc_type.from_dict({}) == entry.doc_type()


def test_failure_fields_name_real_fields():
    for entry in registered():
        fields = getattr(entry.doc_type, "failure_fields", None)
        if fields:
            names = {f for f in entry.doc_type.__dataclass_fields__}
            assert set(fields) <= names, entry.name
    assert EnvDoc.failure_fields == ("last_failure", "last_sync_result", "last_failure_reason")
    assert VariablesDoc.failure_fields == ("last_run_at", "last_result", "last_error")


def test_register_refuses_bad_declarations():
    @dataclass
    class NoName(StateDoc):
        x: int = 0

    with pytest.raises(TypeError, match="needs a file name"):
        register(NoName)
    with pytest.raises(TypeError, match="version must be an integer"):
        register(NoName, name="x-bad", version=0)
    with pytest.raises(TypeError, match="needs a file name"):
        register(NoName, name="../escape")

    @dataclass
    class Clash(StateDoc):
        name: ClassVar[str] = "env"

    with pytest.raises(TypeError, match="registered twice"):
        register(Clash)
    with pytest.raises(TypeError, match="not a registered state document"):
        registration(NoName)
    assert registration(EnvDoc).doc_type is EnvDoc  # the clash changed nothing


def test_every_document_module_is_light():
    # status imports them all: none may pull in boto3 or celery
    import subprocess
    import sys

    code = (
        "import sys; from agent.state import registered; registered(); "
        "print(sorted(m for m in ('boto3', 'botocore', 'celery', 'kombu') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
    assert st.DOCUMENT_MODULES  # and each was imported by registered()
