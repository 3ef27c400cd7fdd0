"""tests/test_envfile.py's parser cases, held to a real systemd 252.

The fast tests pin `parse_env` (the agent's model of systemd's EnvironmentFile parser) on one
file per path through the state machine, so `make mutate` can prove the model; this checks
that each of those expectations is what systemd itself does, so the fast tier pins reality
and not only the transcription.
"""

from __future__ import annotations

import pytest

from sandbox.systemd_host import SystemdHost
from tests.test_envfile import PARSER_CASES
from tests.test_envfile_systemd import DUMP, systemd_reads

pytestmark = pytest.mark.systemd

NAMES = {b"A", b"B", b"C", b"AAAAAA", b"NOPE", b"X", b"Y", b"X Y"}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with SystemdHost(tmp_path_factory.mktemp("envfile-cases"), name="aea-envcases") as h:
        h.write_file("/usr/local/bin/aea-envdump", DUMP, mode=0o755)
        yield h


@pytest.mark.parametrize("text, parsed", PARSER_CASES, ids=range(len(PARSER_CASES)))
def test_systemd_reads_each_case_as_the_model_expects(host: SystemdHost, text, parsed) -> None:
    got = systemd_reads(host, text)
    assert got is not None, "the unit did not start"
    ours = {k.decode(): v.decode() for k, v in got.items() if k in NAMES}
    assert ours == parsed
