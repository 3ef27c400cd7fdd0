"""Which parts of the sandbox are heavy, and the test tier each one puts a test in.

A class decorated with `@heavy("systemd")` (or "airflow", "aws", "redis"; a part that needs
several names them all) is registered here by name, as are a few constants (`heavy_names`: the
Airflow venv). tests/conftest.py marks every test whose
fixtures or body name such a class with its tiers, and every other test `fast`. While a fast
test runs, `forbid(test_id)` is in force and a heavy part's `start()` raises
`HeavyPartInFastTest`: a test the marking got wrong fails at once, naming the part, instead of
quietly making the fast tier slow.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, Dict, Iterator, Optional, Set, Tuple, TypeVar

TIERS = ("systemd", "airflow", "aws", "redis")

# class name -> its tiers, filled by @heavy as the sandbox's modules are imported
HEAVY: Dict[str, Tuple[str, ...]] = {}

_forbidden_for: Optional[str] = None

C = TypeVar("C", bound=type)


class HeavyPartInFastTest(RuntimeError):
    pass


def heavy(*tiers: str) -> Callable[[C], C]:
    """Register a class as a heavy part of `tiers` and guard its `start()`."""
    unknown = [t for t in tiers if t not in TIERS]
    if not tiers or unknown:
        raise ValueError(f"tiers must be some of {', '.join(TIERS)}, not {unknown or 'none'}")

    def register(cls: C) -> C:
        HEAVY[cls.__name__] = tiers
        start = cls.start  # type: ignore[attr-defined]

        @functools.wraps(start)
        def guarded_start(self, *args, **kwargs):
            if _forbidden_for is not None:
                raise HeavyPartInFastTest(
                    f"{_forbidden_for} is in the fast tier but starts {cls.__name__} "
                    f"({', '.join(tiers)}): reach it through a fixture that names it, or mark "
                    f"the test @pytest.mark.{tiers[0]}"
                )
            return start(self, *args, **kwargs)

        cls.start = guarded_start  # type: ignore[attr-defined]
        return cls

    return register


def heavy_names(tier: str, *names: str) -> None:
    """Register module-level names (a venv's path, say) whose use puts a test in `tier`."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}")
    for name in names:
        HEAVY[name] = (tier,)


def _names_in(code: types.CodeType) -> Iterator[str]:
    """Every global and attribute name a code object (and the code nested in it) refers to."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names_in(const)


def tiers_named_by(func: Callable, seen: Optional[Set[int]] = None) -> Set[str]:
    """Tiers of the heavy parts `func` names, directly or through the functions and classes of
    its own module that it names (a fixture calling its module's helper that builds a host).
    Imports inside `func` count too: their names are in its code."""
    seen = set() if seen is None else seen
    code = getattr(func, "__code__", None)
    if code is None or id(func) in seen:
        return set()
    seen.add(id(func))
    found: Set[str] = set()
    for name in set(_names_in(code)):
        found.update(HEAVY.get(name, ()))
        obj = getattr(func, "__globals__", {}).get(name)
        if getattr(obj, "__module__", None) != func.__module__:
            continue
        if inspect.isfunction(obj):
            found |= tiers_named_by(obj, seen)
        elif inspect.isclass(obj):
            for member in vars(obj).values():
                if inspect.isfunction(member):
                    found |= tiers_named_by(member, seen)
    return found


def forbid(test_id: Optional[str]) -> None:
    """While `test_id` (a fast test) runs, heavy parts refuse to start; None lifts the ban."""
    global _forbidden_for
    _forbidden_for = test_id
