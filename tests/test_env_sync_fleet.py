"""env sync at fleet scale (issue 13, item 4): the splay and the throttling backoff.

The pacing core (agent.jobs.env_sync.pacing) runs here on virtual time: a clock that only the
injected sleep advances, and a scripted random source. The last test runs real `airflow-agent
env sync --splay` processes at once against the embedded AWS (moto server over HTTP) behind the
throttling proxy (sandbox.throttle_proxy), and every one of them converges.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import botocore.exceptions
import pytest
import yaml

from agent.config import config_from_dict
from agent.errors import AgentError, ConfigError
from agent.jobs.env_sync import sync as sync_mod
from agent.jobs.env_sync.pacing import Backoff, Pacer, is_throttle
from agent.jobs.env_sync.sync import EnvSync, fetch_parameters, splay_of
from agent.platform.envfile import parse_env

REPO = Path(__file__).resolve().parents[1]


class VirtualTime:
    """A monotonic clock that only `sleep` moves; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: List[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def throttle(code: str = "ThrottlingException", status: int = 400) -> Exception:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": "Rate exceeded"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetParametersByPath",
    )


class ScriptedSsm:
    """get_parameters_by_path answering from `pages`, raising the next of `faults` first.

    `faults` maps a call number (0-based, counting every call) to the exception it raises;
    `fail_from` makes every call from that number on throttled."""

    def __init__(
        self,
        pages: List[List[str]],
        faults: Optional[Dict[int, Exception]] = None,
        fail_from: Optional[int] = None,
        time: Optional[VirtualTime] = None,
    ):
        self.pages = pages
        self.faults = faults or {}
        self.fail_from = fail_from
        self.time = time
        self.calls: List[Dict[str, Any]] = []

    def get_parameters_by_path(self, **kwargs: Any) -> Dict[str, Any]:
        n = len(self.calls)
        self.calls.append(dict(kwargs, at=self.time.now if self.time else None))
        if n in self.faults:
            raise self.faults[n]
        if self.fail_from is not None and n >= self.fail_from:
            raise throttle()
        index = int(kwargs.get("NextToken", "0"))
        page: Dict[str, Any] = {
            "Parameters": [
                {"Name": f"{kwargs['Path']}core/{name}", "Value": name, "Type": "String"}
                for name in self.pages[index]
            ]
        }
        if index + 1 < len(self.pages):
            page["NextToken"] = str(index + 1)
        return page


def pacer(t: VirtualTime, deadline: float = 60.0, splay: float = 0.0, rand=lambda: 1.0):
    return Pacer(splay, deadline, Backoff(base=0.5, cap=8.0), t.clock, t.sleep, rand)


# -- the backoff ---------------------------------------------------------------------------------


def test_full_jitter_waits_up_to_an_exponential_ceiling_capped():
    b = Backoff(base=0.5, cap=8.0)
    assert [b.delay(n, lambda: 1.0) for n in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    assert b.delay(3, lambda: 0.25) == 1.0  # uniform in 0..ceiling: the random part scales it
    assert b.delay(5, lambda: 0.0) == 0.0
    assert b.delay(10_000, lambda: 1.0) == 8.0  # no overflow after many retries


def test_only_throttling_counts_as_throttling():
    assert is_throttle(throttle())
    assert is_throttle(throttle("Throttling"))
    assert is_throttle(throttle("SomethingNew", status=429))
    assert not is_throttle(throttle("AccessDeniedException"))
    assert not is_throttle(throttle("InternalServerError", status=500))
    assert not is_throttle(ValueError("ThrottlingException"))


# -- retries within the deadline ------------------------------------------------------------------


def test_a_throttled_page_is_retried_with_growing_waits_until_it_answers():
    t = VirtualTime()
    ssm = ScriptedSsm([["a", "b"]], faults={i: throttle() for i in range(5)})
    p = pacer(t)
    params = fetch_parameters(ssm, ["/x/"], p)
    assert [x.value for x in params] == ["a", "b"]
    assert t.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert (p.calls, p.throttled, p.waited) == (6, 5, 15.5)


def test_a_retry_asks_for_the_same_page_and_no_page_is_read_twice():
    t = VirtualTime()
    # pages 0, 1, 2; the calls for page 1 (call 1) and page 2 (calls 3, 4) are throttled
    ssm = ScriptedSsm(
        [["a"], ["b"], ["c"]], faults={1: throttle(), 3: throttle(), 4: throttle()}, time=t
    )
    params = fetch_parameters(ssm, ["/x/"], pacer(t))
    assert [x.value for x in params] == ["a", "b", "c"]
    tokens = [c.get("NextToken") for c in ssm.calls]
    assert tokens == [None, "1", "1", "2", "2", "2"]
    # each page starts its own backoff over: a page that answered is no reason to wait longer
    assert t.sleeps == [0.5, 0.5, 1.0]


def test_still_throttled_at_the_deadline_fails_naming_the_key_and_never_sleeps_past_it():
    t = VirtualTime()
    start = t.now
    ssm = ScriptedSsm([["a"], ["b"]], fail_from=1, time=t)  # page 0 answers, then never again
    with pytest.raises(AgentError) as err:
        fetch_parameters(ssm, ["/airflow/prod/"], pacer(t, deadline=30.0))
    message = str(err.value)
    assert "GetParametersByPath /airflow/prod/" in message
    assert "ThrottlingException" in message and "env.fetch_deadline" in message
    # the deadline runs from the run's first call; the last attempt is made at the deadline
    assert t.now == start + 30.0
    assert ssm.calls[-1]["at"] == start + 30.0
    assert all(c["at"] <= start + 30.0 for c in ssm.calls)


def test_the_deadline_covers_the_whole_fetch_not_each_page():
    t = VirtualTime()
    # every page's first call is throttled; the backoff of each page alone fits 10 s, the
    # sum of them does not
    pages = [[str(i)] for i in range(20)]
    faults = {}
    call = 0
    for _ in pages:
        faults[call] = throttle()
        call += 2
    ssm = ScriptedSsm(pages, faults=faults, time=t)
    with pytest.raises(AgentError, match="env.fetch_deadline"):
        fetch_parameters(ssm, ["/x/"], pacer(t, deadline=5.0))
    assert t.now - 1000.0 <= 5.0


def test_each_fetch_has_its_own_deadline():
    t = VirtualTime()
    p = pacer(t, deadline=10.0)
    fetch_parameters(ScriptedSsm([["a"]]), ["/x/"], p)
    t.sleep(60)  # a later fetch by the same run (or object): its deadline starts anew
    ssm = ScriptedSsm([["a"]], faults={0: throttle(), 1: throttle()})
    assert [x.value for x in fetch_parameters(ssm, ["/x/"], p)] == ["a"]


def test_deadline_zero_is_the_old_behaviour_a_throttle_fails_at_once():
    t = VirtualTime()
    ssm = ScriptedSsm([["a"]], faults={0: throttle()})
    with pytest.raises(AgentError) as err:
        fetch_parameters(ssm, ["/x/"], pacer(t, deadline=0.0))
    assert "env.fetch_deadline is 0" in str(err.value)
    assert t.sleeps == [] and len(ssm.calls) == 1
    # and without a pacer at all (bench/env_sync.py's bare fetch): the same
    with pytest.raises(AgentError, match="ThrottlingException"):
        fetch_parameters(ScriptedSsm([["a"]], faults={0: throttle()}), ["/x/"])


def test_any_other_error_fails_at_once_without_waiting():
    t = VirtualTime()
    denied = throttle("AccessDeniedException")
    ssm = ScriptedSsm([["a"]], faults={0: denied})
    with pytest.raises(AgentError, match="AccessDeniedException"):
        fetch_parameters(ssm, ["/x/"], pacer(t))
    assert t.sleeps == [] and len(ssm.calls) == 1


def test_pacer_refuses_nonsense():
    with pytest.raises(ValueError, match="splay"):
        Pacer(splay=-1)
    with pytest.raises(ValueError, match="deadline"):
        Pacer(deadline=float("nan"))


# -- the splay ---------------------------------------------------------------------------------


def make_cfg(tmp_path: Path, **env: Any):
    return config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "env": dict(
                {
                    "file": str(tmp_path / "airflow.env"),
                    "ssm_paths": ["/x/"],
                    "group": "root",
                    "max_drop_fraction": 1.0,
                },
                **env,
            ),
        }
    )


def test_a_splayed_run_waits_a_random_share_of_the_splay_before_its_first_call(tmp_path):
    t = VirtualTime()
    cfg = make_cfg(tmp_path, splay=30)
    ssm = ScriptedSsm([["a"]], time=t)
    sync = EnvSync(cfg, ssm, clock=t.clock, sleep=t.sleep, splay=30.0, rand=lambda: 0.4)
    sync.run()
    assert t.sleeps[0] == pytest.approx(12.0)
    assert ssm.calls[0]["at"] == pytest.approx(1012.0)
    assert parse_env(Path(cfg.env.file).read_bytes())["AIRFLOW__CORE__A"] == "a"


def test_a_run_without_splay_calls_at_once(tmp_path):
    t = VirtualTime()
    cfg = make_cfg(tmp_path, splay=30)
    ssm = ScriptedSsm([["a"]], time=t)
    EnvSync(cfg, ssm, clock=t.clock, sleep=t.sleep).run()  # as bootstrap and the boot unit
    assert t.sleeps == [] and ssm.calls[0]["at"] == 1000.0


def test_an_interrupted_splay_records_nothing(tmp_path):
    """Interrupted while splaying, a run read and wrote nothing: like a run waiting for the
    lock, it must leave env.json to the runs that did something."""
    cfg = make_cfg(tmp_path)

    def interrupted(_seconds: float) -> None:
        raise KeyboardInterrupt

    sync = EnvSync(cfg, ScriptedSsm([["a"]]), sleep=interrupted, splay=5.0)
    with pytest.raises(KeyboardInterrupt):
        sync.run()
    assert sync.failure_handled
    assert not Path(cfg.env.file).exists()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    env = sub.add_parser("env")
    sync_mod.add_arguments(env, argparse.ArgumentParser(add_help=False))
    return parser.parse_args(["env", *argv])


def test_the_splay_is_opt_in_on_the_command_line(tmp_path):
    cfg = make_cfg(tmp_path, splay=45)
    assert splay_of(parse("sync"), cfg) == 0.0  # boot runs: no flag, no wait
    assert splay_of(parse("sync", "--splay"), cfg) == 45.0  # env.splay
    assert splay_of(parse("sync", "--splay", "7.5"), cfg) == 7.5
    assert splay_of(parse("sync", "--splay", "0"), cfg) == 0.0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            parse("sync", "--splay", bad)


# -- config ---------------------------------------------------------------------------------


def test_fleet_keys_defaults():
    env = config_from_dict({}).env
    assert (env.splay, env.fetch_deadline, env.backoff_cap) == (30.0, 150.0, 8.0)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"splay": -1}, "key 'env.splay' must be zero or more"),
        ({"splay": 3601}, "key 'env.splay' must be at most 3600 seconds"),
        ({"fetch_deadline": -5}, "key 'env.fetch_deadline' must be zero or more"),
        ({"backoff_cap": 0}, "key 'env.backoff_cap' must be positive"),
        ({"splay": "soon"}, "env.splay"),
    ],
)
def test_bad_fleet_keys_are_refused_naming_the_key(env, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"env": env}, source="agent.yaml")
    assert message in str(err.value)


def test_zero_splay_and_zero_deadline_are_allowed():
    env = config_from_dict({"env": {"splay": 0, "fetch_deadline": 0}}).env
    assert (env.splay, env.fetch_deadline) == (0.0, 0.0)


def test_the_boot_unit_budget_holds_the_lock_wait_and_the_fetch_deadline():
    # a boot run may wait for the lock, then retry throttling until the deadline; systemd must
    # not kill it before its own clear message (30 s left for botocore's last call and the rest)
    unit = (REPO / "systemd" / "airflow-agent-env.service").read_text()
    (start_timeout,) = re.findall(r"^TimeoutStartSec=(\d+)$", unit, re.M)
    env = config_from_dict({}).env
    assert env.lock_timeout + env.fetch_deadline <= int(start_timeout) - 30


def test_only_the_cfn_hup_hook_splays_and_every_boot_run_does_not():
    unit = (REPO / "systemd" / "airflow-agent-env.service").read_text()
    assert re.search(r"^ExecStart=\S+ env sync$", unit, re.M), "the boot unit must not splay"
    template = yaml.load(
        (REPO / "cloudformation" / "airflow-cluster.yaml").read_text(), Loader=_CfnLoader
    )
    init = template["Resources"]["InstanceConfig"]["Metadata"]["AWS::CloudFormation::Init"]
    hook = init["configure"]["files"]["/usr/local/sbin/airflow-agent-cfn-update"]["content"]
    hook_text = hook if isinstance(hook, str) else json.dumps(hook)
    assert "exec /usr/local/bin/airflow-agent env sync --splay" in hook_text
    # the first-boot commands (before bootstrap) sync without a splay
    boot_syncs = [
        cmd["command"]
        for role in ("scheduler", "webserver", "worker")
        for cmd in init[role].get("commands", {}).values()
        if "env sync" in str(cmd["command"])
    ]
    assert len(boot_syncs) == 3
    assert all("--splay" not in str(c) for c in boot_syncs)


class _CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation's short-form tags (!Sub, !Ref, ...) as plain values."""


def _tag(loader, _suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)


_CfnLoader.add_multi_constructor("!", _tag)


# -- real processes, the embedded AWS, the throttling proxy ---------------------------------------


def test_concurrent_syncs_all_converge_through_a_throttling_proxy(
    aws, make_config, agent_env, tmp_path
):
    """Five `env sync --splay` processes at once through a proxy of 3 requests per second with
    a burst of one: every process gets throttled (its next page comes faster than a token),
    botocore retries nothing (aws.max_attempts 1), and every one still writes the full file."""
    from sandbox.proc import end_process, wait_for
    from sandbox.throttle_proxy import ThrottleProxy

    seed = aws.client("ssm")
    secret = "s3cr3t-Zq8!v"
    for i in range(20):
        kind = "SecureString" if i == 0 else "String"
        value = secret if i == 0 else f"v{i}"
        seed.put_parameter(Name=f"/airflow/test/core/key_{i:02d}", Value=value, Type=kind)
    aws.clear_calls()
    with ThrottleProxy(aws.url, rate=3, burst=1) as proxy:
        env = dict(agent_env, AWS_ENDPOINT_URL_SSM=proxy.url)
        procs = []
        configs = []
        proxy.arm()
        for i in range(5):
            cfg = make_config(
                {
                    "state_dir": str(tmp_path / f"state{i}"),
                    "env": {
                        "file": str(tmp_path / f"i{i}" / "airflow.env"),
                        "splay": 0.5,
                        "fetch_deadline": 60,
                        "backoff_cap": 1,
                    },
                    "aws": {"max_attempts": 1},
                },
                name=f"agent{i}.yaml",
            )
            configs.append(cfg)
            argv = [sys.executable, "-m", "agent", "--config", str(cfg), "env", "sync", "--splay"]
            procs.append(
                subprocess.Popen(
                    argv, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
            )
        try:
            wait_for(lambda: all(p.poll() is not None for p in procs), 90, "the five syncs")
            outputs = [p.communicate()[1].decode() for p in procs]
        finally:
            for p in procs:
                end_process(p)
        counts = proxy.counts()
    for p, err in zip(procs, outputs):
        assert p.returncode == 0, err
        assert secret not in err  # no value in logs, SecureString or not
    for i, cfg in enumerate(configs):
        values = parse_env((tmp_path / f"i{i}" / "airflow.env").read_bytes())
        assert len(values) == 20 + 1  # AIRFLOW_HOME from env.static
        assert values["AIRFLOW__CORE__KEY_00"] == secret
    pages = len(aws.calls("GetParametersByPath")) // 5
    assert pages >= 2
    # throttling happened, and no page was read twice: the upstream saw each page once
    assert counts["throttled"] > 0
    assert counts["forwarded"] == 5 * pages == len(aws.calls("GetParametersByPath"))
    assert any("despite throttling" in err for err in outputs)
