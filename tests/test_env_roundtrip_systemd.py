"""Product-level EnvironmentFile round trip: SSM (moto) -> `env sync` inside a real systemd host ->
a real unit's `EnvironmentFile=` -> the environment that unit's process got, byte for byte.

(tests/test_envfile_systemd.py probes systemd's parser with the encoder directly; this one goes
through the whole product path.) Hypothesis generates 250 values first: any Unicode but NUL and
lone surrogates, biased towards quotes, backslashes, `$`, backticks, newlines/CR, leading and
trailing blanks and `#`/`;` at a line start. They are stored as 250 SSM parameters and synced
in one go: values systemd cannot carry (Unicode noncharacters, measured by the probe test) must
make the sync refuse, naming exactly those parameters and writing nothing; after they are
removed the sync succeeds and the stand-in airflow-scheduler sees every value unchanged.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import agent_host as ah
from sandbox.systemd_host import SystemdHost

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

N_VALUES = 250
UNIT = "airflow-scheduler"

_tricky = st.sampled_from(list("\"'\\$`\n\r\t #;= ") + ["\r\n", "\\\n", "${X}", '\\"', "'\""])
_any = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
_core = st.lists(st.one_of(_tricky, _any), max_size=30).map("".join)
_prefix = st.sampled_from(["", " ", "  ", "\t", "#", ";", "\n#", "\n;", "\n", "'", '"'])
_suffix = st.sampled_from(["", " ", "  ", "\t", "\n", "\\", "\r", "'", '"'])
VALUES = st.builds(lambda a, b, c: a + b + c, _prefix, _core, _suffix).filter(bool)


def systemd_cannot_carry(value: str) -> bool:
    """Independent of agent.platform.envfile: what the probe test measured systemd 252 refusing."""
    return any(0xFDD0 <= ord(c) <= 0xFDEF or (ord(c) & 0xFFFE) == 0xFFFE for c in value)


def generate_values() -> list:
    out: list = []

    @settings(
        max_examples=N_VALUES, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @given(VALUES)
    def collect(value):
        out.append(value)

    collect()
    # always include the named cases, whatever hypothesis drew
    out += [
        'say "hi"',
        "it's",
        "a\\b\\",
        "$HOME ${X} `id`",
        "l1\nl2\r\nl3",
        "  both  ",
        "#hash",
        ";semi",
        "x\n#y\n;z",
        "\ufdd0bad",
        "ok\uffff",
    ]
    return out


@pytest.fixture(scope="module")
def host(tmp_path_factory, aws_server, imds_server):
    aws_server.reset()
    imds_server.reset()
    with SystemdHost(tmp_path_factory.mktemp("roundtrip-host"), name="aea-roundtrip") as h:
        ah.prepare(h, aws_server, imds_server)
        yield h


def test_values_from_ssm_reach_a_real_unit_byte_for_byte(host, aws_server, imds_server):
    values = generate_values()
    assert len(values) >= N_VALUES
    ssm = aws_server.client("ssm")
    names = {f"V{i:04d}": v for i, v in enumerate(values)}
    for name, value in names.items():
        ssm.put_parameter(
            Name=f"{ah.SSM_PATH}env/{name}", Value=value, Type="SecureString", Overwrite=True
        )

    bad = {n for n, v in names.items() if systemd_cannot_carry(v)}
    assert bad  # the fixed cases guarantee the refusal path is exercised
    proc = ah.agent(host, aws_server, imds_server, "env", "sync", check=False)
    assert proc.returncode == 3, proc.stderr
    refused = set(re.findall(r"/env/(V\d{4}) \(", proc.stderr))
    assert refused == bad, (refused ^ bad, proc.stderr[-2000:])
    assert host.run(["test", "-e", "/etc/sysconfig/airflow.env"], check=False).returncode == 1

    for name in bad:
        ssm.delete_parameter(Name=f"{ah.SSM_PATH}env/{name}")
        del names[name]
    ah.agent(host, aws_server, imds_server, "env", "sync")
    host.systemctl("restart", UNIT)
    host.wait_active(UNIT)
    got = ah.standin_env(host, UNIT)
    wrong = {
        n: (v, got.get(n.encode(), b"<absent>").decode("utf-8", "replace"))
        for n, v in names.items()
        if got.get(n.encode()) != v.encode("utf-8")
    }
    assert not wrong, wrong
    assert len(names) >= N_VALUES - len(bad)
