"""The agent's persistent state: one typed document per job, small JSON files in the state dir.

Each job declares its document as a dataclass with a `name` (the file is `<name>.json` in the
state dir, root 0700, files 0600) and a `version`, and registers it here with `register`.
Loading and saving go through `StateStore`, which checks every document it reads:

- a missing file is "no document" (`None`);
- a field that is missing, or that an older agent wrote under an older `version`, takes its
  default (`StateDoc.migrate` renames old fields);
- anything else that makes no sense (not a JSON object, a field of the wrong type, a version
  newer than this agent knows) is a `StateDocError` naming the document, file and field.
  `StateStore.load` treats such a document as absent, with a warning (a record must never stop
  a job; the next save replaces it); `StateStore.read` raises it.

Writes are atomic (agent.platform.fsutil.atomic_write), so a crash leaves the previous
document. `status` lists the documents from the registry (`registered()`), never by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from agent.errors import AgentError
from agent.platform.fsutil import atomic_write

log = logging.getLogger(__name__)

# The modules that declare (register) a document. `registered()` imports them, so `status`
# sees every document without naming one; tests/test_layout.py checks that every module that
# calls `register` is listed here. They are light: dataclasses, no boto3/celery.
DOCUMENT_MODULES = (
    "agent.jobs.role_state",
    "agent.jobs.confapply.state",
    "agent.jobs.env_sync.state",
    "agent.jobs.variables.state",
    "agent.jobs.drain.state",
    "agent.jobs.lifecycle.state",
    "agent.jobs.task_credentials.state",
    "agent.jobs.deploy.state",
    "agent.jobs.metrics.state",
    "agent.platform.target_group_state",
    "agent.worker.state",
)

VERSION_KEY = "version"

D = TypeVar("D")


class StateDocError(AgentError):
    """A state document that makes no sense: names the document, its file and the field."""


class StateDoc:
    """Base of a typed document: a dataclass whose every field has a default.

    Subclasses set `name` and `version` (class attributes), and may set `failure_fields`,
    the names of their (when, result, reason) fields, so the job runner can record a failed
    run in them. `from_dict`/`to_dict` are derived from the field annotations; a subclass
    overrides `migrate` to read fields an older version wrote differently.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    failure_fields: ClassVar[Optional[Tuple[str, str, str]]] = None

    @classmethod
    def migrate(cls, data: Dict[str, Any], version: int) -> Dict[str, Any]:
        """`data` as written by `version` (0: before documents had versions) -> this version."""
        return data

    @classmethod
    def from_dict(cls: Type[D], data: Any) -> D:
        doc = _require_mapping(cls.name, data)  # type: ignore[attr-defined]
        version = doc_version(cls.name, doc, cls.version)  # type: ignore[attr-defined]
        doc = cls.migrate(dict(doc), version)  # type: ignore[attr-defined]
        hints = typing.get_type_hints(cls)
        values: Dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in doc:
                values[f.name] = check_value(cls.name, f.name, hints[f.name], doc[f.name])  # type: ignore[attr-defined]
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _require_mapping(name: str, data: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise StateDocError(f"state document {name}: not a JSON object ({type(data).__name__})")
    return data


def doc_version(name: str, data: Mapping[str, Any], known: int) -> int:
    """The version `data` was written with (0 when unversioned); refuses a newer one."""
    version = data.get(VERSION_KEY, 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise StateDocError(f"state document {name}: field 'version' is {version!r}")
    if version > known:
        raise StateDocError(
            f"state document {name}: version {version} was written by a newer agent "
            f"(this one reads up to {known})"
        )
    return version


_SCALARS = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}


def check_value(doc: str, path: str, hint: Any, value: Any) -> Any:
    """`value` if it fits the annotation `hint`, else StateDocError naming doc and field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check_value(doc, path, options[0], value)
        for option in options:
            with contextlib.suppress(StateDocError):
                return check_value(doc, path, option, value)
        raise _wrong(doc, path, "one of " + ", ".join(map(_type_name, options)), value)
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, list):
            raise _wrong(doc, path, "a list", value)
        item = args[0] if args else Any
        return [check_value(doc, f"{path}[{i}]", item, v) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise _wrong(doc, path, "an object", value)
        item = args[1] if len(args) == 2 else Any
        return {str(k): check_value(doc, f"{path}.{k}", item, v) for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(doc, path, "a number", value)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(doc, path, "an integer", value)
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise _wrong(doc, path, _SCALARS[hint], value)
        return value
    raise TypeError(f"state document {doc}: field {path}: unsupported annotation {hint!r}")


def _type_name(hint: Any) -> str:
    return _SCALARS.get(hint, getattr(hint, "__name__", str(hint)))


def _wrong(doc: str, path: str, expected: str, value: Any) -> StateDocError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return StateDocError(f"state document {doc}: field '{path}' must be {expected}, got {shown}")


# -- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    """A registered document type, its file name and version, and how `status` presents it."""

    doc_type: type
    name: str
    version: int
    # key in `status --json`; None: status does not list it (or presents it its own way)
    status_key: Optional[str]
    # label of its line in the human view
    title: str
    # fields the human line shows, in this order; () shows every field
    shown: Tuple[str, ...] = ()
    # detail text appended to the human line, from the raw document
    detail: Optional[Callable[[Dict[str, Any]], str]] = None
    # the human view shows the line only when the document exists
    optional: bool = False
    # the module that registered it (orders `registered()` as DOCUMENT_MODULES does)
    module: str = ""


_REGISTRY: Dict[str, Registered] = {}
_BY_TYPE: Dict[type, Registered] = {}


def register(
    doc_type: Type[D],
    *,
    name: Optional[str] = None,
    version: Optional[int] = None,
    status_key: Optional[str] = None,
    title: Optional[str] = None,
    shown: Tuple[str, ...] = (),
    detail: Optional[Callable[[Dict[str, Any]], str]] = None,
    optional: bool = False,
) -> Type[D]:
    """Declare `doc_type` (with `from_dict`, `to_dict`) as the state document `name`.

    `name` and `version` default to the class's own (a StateDoc declares them); a type from a
    pure module (drain's plan.DrainState) is registered with them given here. `from_dict(data)`
    returns the document or raises StateDocError; returning None for "not a document of mine"
    is allowed too (the store reports it as a StateDocError).
    """
    name = name if name is not None else getattr(doc_type, "name", "")
    version = version if version is not None else getattr(doc_type, "version", None)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise TypeError(f"{doc_type.__name__}: a state document needs a file name, got {name!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise TypeError(f"{doc_type.__name__}: version must be an integer >= 1, got {version!r}")
    for method in ("from_dict", "to_dict"):
        if not callable(getattr(doc_type, method, None)):
            raise TypeError(f"{doc_type.__name__}: a state document needs {method}")
    old = _REGISTRY.get(name)
    if old is not None and old.doc_type.__qualname__ != doc_type.__qualname__:
        raise TypeError(f"state document {name!r} registered twice: {old.doc_type.__qualname__}")
    caller = inspect.currentframe()
    module = caller.f_back.f_globals.get("__name__", "") if caller and caller.f_back else ""
    entry = Registered(
        doc_type,
        name,
        version,
        status_key,
        title or status_key or name,
        tuple(shown),
        detail,
        optional,
        module,
    )
    if old is not None:  # the same class again (a module reloaded): replace it
        _BY_TYPE.pop(old.doc_type, None)
    _REGISTRY[name] = entry
    _BY_TYPE[doc_type] = entry
    return doc_type


def registered() -> List[Registered]:
    """Every registered document, in DOCUMENT_MODULES order (importing those modules), then
    any other (a test's), in registration order."""
    for module in DOCUMENT_MODULES:
        importlib.import_module(module)
    order = {m: i for i, m in enumerate(DOCUMENT_MODULES)}
    entries = list(_REGISTRY.values())
    return sorted(entries, key=lambda e: order.get(e.module, len(order)))


def registration(doc_type: type) -> Registered:
    entry = _BY_TYPE.get(doc_type)
    if entry is None:  # a type from a pure module is registered by its job's state module
        registered()
        entry = _BY_TYPE.get(doc_type)
    if entry is None:
        raise TypeError(f"{doc_type.__name__} is not a registered state document")
    return entry


def parse(doc_type: Type[D], data: Any) -> D:
    """`doc_type.from_dict(data)`, with a None answer turned into a named StateDocError."""
    entry = registration(doc_type)
    _require_mapping(entry.name, data)
    doc_version(entry.name, data, entry.version)
    doc = doc_type.from_dict(data)  # type: ignore[attr-defined]
    if doc is None:
        raise StateDocError(
            f"state document {entry.name}: not a {entry.name} document this agent wrote"
        )
    return doc  # type: ignore[no-any-return]


# -- the store -------------------------------------------------------------------------------

DocKey = Union[str, type]


class StateStore:
    """The state dir. read/load_doc/update_doc/delete take a registered document type,
    save_doc an instance. `load_raw`/`save_raw` are for `status`, which shows documents as they
    are on disk, and for tests that write one as it could be found there."""

    def __init__(self, state_dir: Union[str, Path]):
        self.dir = Path(state_dir)

    def ensure(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def path(self, key: DocKey) -> Path:
        name = key if isinstance(key, str) else registration(key).name
        return self.dir / f"{name}.json"

    # -- raw JSON

    def load_raw(self, name: str) -> Dict[str, Any]:
        """The document as on disk, or {} when absent or not JSON. OSError propagates."""
        try:
            data = json.loads(self.path(name).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_raw(self, name: str, data: Mapping[str, Any]) -> None:
        self.ensure()
        body = json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"
        atomic_write(self.path(name), body, mode=0o600)

    # -- typed

    def read(self, doc_type: Type[D]) -> Optional[D]:
        """The document; None when absent; StateDocError when it makes no sense."""
        path = self.path(doc_type)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateDocError(f"state document {path}: not JSON ({exc})") from None
        try:
            return parse(doc_type, data)
        except StateDocError as exc:
            raise StateDocError(f"{exc} (in {path})") from None

    def load_doc(self, doc_type: Type[D]) -> Optional[D]:
        """Like read, but a document that makes no sense is logged and treated as absent."""
        try:
            return self.read(doc_type)
        except StateDocError as exc:
            log.warning("%s; treating it as absent (the next save replaces it)", exc)
            return None

    def save_doc(self, doc: Any) -> None:
        entry = registration(type(doc))
        data = dict(doc.to_dict())
        data[VERSION_KEY] = entry.version
        self.save_raw(entry.name, data)

    def update_doc(self, doc_type: Type[D], **changes: Any) -> D:
        """Load (or start from the defaults), change fields, check, save; the new document."""
        current = self.load_doc(doc_type)
        data = current.to_dict() if current is not None else {}  # type: ignore[attr-defined]
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(doc_type)})  # type: ignore[arg-type]
        if unknown:
            raise TypeError(f"{doc_type.__name__} has no field(s) {', '.join(unknown)}")
        data.update(changes)
        data[VERSION_KEY] = registration(doc_type).version
        doc = parse(doc_type, data)
        self.save_doc(doc)
        return doc

    def delete(self, key: DocKey) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()
