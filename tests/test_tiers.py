"""The test tiers themselves: which heavy parts a fixture or test names, and the fast-tier guard.

tests/conftest.py marks each test with the tiers `sandbox.tiers.tiers_named_by` finds in its
fixtures and body; these tests pin down what that scan sees, and that a heavy part refuses to
start while a fast test runs (this file is in the fast tier, so the guard is on here). The
scanned samples are compiled from text, so this file's own tests name no heavy part and stay
fast.
"""

from __future__ import annotations

import textwrap

import pytest

from sandbox import tiers


def _module(source: str) -> dict:
    """The namespace of a little test module made from `source`."""
    namespace = {"__name__": "tiers_sample"}
    exec(compile(textwrap.dedent(source), "<tiers sample>", "exec"), namespace)  # noqa: S102
    return namespace


def test_a_heavy_class_named_directly_gives_its_tier():
    m = _module(
        """
        from sandbox.systemd_host import SystemdHost

        def fixture(tmp_path):
            return SystemdHost(tmp_path)
        """
    )
    assert tiers.tiers_named_by(m["fixture"]) == {"systemd"}


def test_imports_inside_the_function_count():
    m = _module(
        """
        def fixture():
            from sandbox.imds_server import ImdsServer

            return ImdsServer()
        """
    )
    assert tiers.tiers_named_by(m["fixture"]) == {"aws"}


def test_helpers_and_classes_of_the_same_module_are_followed():
    m = _module(
        """
        from sandbox import systemd_host

        def _builds_a_host(tmp):
            return systemd_host.SystemdHost(tmp)

        def _builds_a_cluster(tmp, aws, imds):
            from sandbox.airflow_cluster import AirflowCluster

            return AirflowCluster(tmp, aws, imds)

        class Rig:
            def __init__(self):
                from sandbox.redis_server import RedisServer

                self.redis = RedisServer()

        def host(tmp_path):
            return _builds_a_host(tmp_path)

        def cluster(tmp_path):
            return _builds_a_cluster(tmp_path, None, None)

        def rig():
            yield Rig()
        """
    )
    assert tiers.tiers_named_by(m["host"]) == {"systemd"}
    # a part that needs several tiers carries them all
    assert tiers.tiers_named_by(m["cluster"]) == {"airflow", "systemd", "redis"}
    assert tiers.tiers_named_by(m["rig"]) == {"redis"}


def test_light_helpers_give_no_tier():
    m = _module(
        """
        from sandbox.proc import wait_for

        def fixture(tmp_path):
            return wait_for(lambda: tmp_path.exists(), 1, "tmp")
        """
    )
    assert tiers.tiers_named_by(m["fixture"]) == set()
    assert tiers.tiers_named_by(len) == set()  # no code object: nothing to scan


def test_the_airflow_venv_is_a_heavy_name():
    m = _module(
        """
        from sandbox.airflow_cluster import AIRFLOW

        def fixture(tmp_path):
            return [str(AIRFLOW), "db", "migrate"]
        """
    )
    assert tiers.tiers_named_by(m["fixture"]) == {"airflow"}


def test_this_test_is_fast_and_a_heavy_part_refuses_to_start_in_it(request):
    assert request.node.get_closest_marker("fast") is not None
    started = []

    @tiers.heavy("redis")
    class TiersTestPart:
        def start(self):
            started.append(True)
            return self

    assert tiers.HEAVY["TiersTestPart"] == ("redis",)
    with pytest.raises(tiers.HeavyPartInFastTest, match="TiersTestPart"):
        TiersTestPart().start()
    assert started == []
    tiers.forbid(None)  # as for a test of a heavy tier
    try:
        assert TiersTestPart().start() is not None and started == [True]
    finally:
        tiers.forbid(request.node.nodeid)


def test_unknown_tiers_are_refused():
    with pytest.raises(ValueError):
        tiers.heavy("postgres")
    with pytest.raises(ValueError):
        tiers.heavy()
    with pytest.raises(ValueError):
        tiers.heavy_names("nope", "X")
