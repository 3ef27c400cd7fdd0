"""The IMDSv2 client against the strict IMDSv2 server (real HTTP), and the AWS client factory."""

import time

import pytest

from agent.config import config_from_dict
from agent.platform.aws import AwsClients
from agent.platform.imds import ImdsClient, ImdsError, ImdsMalformed, ImdsUnavailable
from sandbox.imds_server import INSTANCE_ID


def gets(imds, path_part):
    return [r for r in imds.log() if r["method"] == "GET" and path_part in r["path"]]


def test_token_flow_reuses_one_token(imds):
    client = ImdsClient(endpoint=imds.url)
    assert client.instance_id() == INSTANCE_ID
    assert client.region() == "us-east-1"
    assert client.availability_zone() == "us-east-1a"
    puts = [r for r in imds.log() if r["method"] == "PUT"]
    assert len(puts) == 1 and client.token_fetches == 1
    assert all(r["status"] == 200 for r in imds.log())


def test_server_is_strict(imds):
    """The rig itself refuses IMDSv1-style access, so the client's token flow is really tested."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(imds.url + "/latest/meta-data/instance-id", timeout=2)
    assert err.value.code == 401
    req = urllib.request.Request(imds.url + "/latest/api/token", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=2)
    assert err.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(imds.url + "/latest/api/token", timeout=2)
    assert err.value.code == 405


def test_401_refreshes_the_token_once(imds):
    client = ImdsClient(endpoint=imds.url)
    client.instance_id()
    imds.expire_tokens()
    assert client.instance_id() == INSTANCE_ID
    assert client.token_fetches == 2
    assert [r["status"] for r in gets(imds, "instance-id")] == [200, 401, 200]


def test_token_is_renewed_before_its_ttl_ends(imds):
    now = [1000.0]
    client = ImdsClient(endpoint=imds.url, token_ttl=120, clock=lambda: now[0])
    client.instance_id()
    now[0] += 30
    client.instance_id()
    assert client.token_fetches == 1
    now[0] += 40  # 70 s: inside the 60 s margin before a 120 s TTL ends
    client.instance_id()
    assert client.token_fetches == 2


def test_tags_lifecycle_and_spot(imds):
    client = ImdsClient(endpoint=imds.url)
    assert client.tag("airflow:role") is None and client.tags() == {}
    imds.set_tags({"airflow:role": "worker", "aws:autoscaling:groupName": "prod-workers"})
    assert client.tag("airflow:role") == "worker"
    assert client.tags() == {"airflow:role": "worker", "aws:autoscaling:groupName": "prod-workers"}
    assert client.target_lifecycle_state() == "InService"
    assert client.spot_instance_action() is None
    imds.set_paths(
        {
            "meta-data/autoscaling/target-lifecycle-state": "Terminated",
            "meta-data/spot/instance-action": (
                '{"action": "terminate", "time": "2026-11-21T12:00:00Z"}'
            ),
        }
    )
    assert client.target_lifecycle_state() == "Terminated"
    assert client.spot_instance_action() == {"action": "terminate", "time": "2026-11-21T12:00:00Z"}


def test_unreachable_imds_fails_fast_with_a_clear_error():
    client = ImdsClient(
        endpoint="http://127.0.0.1:9/", timeout=0.5, attempts=3, sleep=lambda s: None
    )
    started = time.monotonic()
    with pytest.raises(
        ImdsUnavailable, match=r"IMDS at http://127.0.0.1:9/ unreachable .* after 3 attempts"
    ):
        client.instance_id()
    assert time.monotonic() - started < 5


def test_endpoint_from_environment(imds, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url + "/")
    assert ImdsClient().instance_id() == INSTANCE_ID


def test_factory_takes_region_from_imds_and_honours_endpoint(aws, imds, monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    imds.set_paths({"meta-data/placement/region": "eu-west-1"})
    clients = AwsClients(config_from_dict({}), imds=ImdsClient(endpoint=imds.url))
    ssm = clients.client("ssm")
    assert clients.region() == "eu-west-1" and ssm.meta.region_name == "eu-west-1"
    assert ssm.meta.endpoint_url == aws.url
    assert ssm.meta.config.retries["mode"] == "adaptive"
    ssm.put_parameter(Name="/x/y/z", Value="1", Type="String")
    assert aws.calls("PutParameter")


def test_factory_prefers_configured_region(imds, monkeypatch):
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    clients = AwsClients(
        config_from_dict({"aws": {"region": "us-west-2"}}), imds=ImdsClient(endpoint=imds.url)
    )
    assert clients.region() == "us-west-2"
    assert not [r for r in imds.log() if r["method"] == "GET"]


# -- malformed answers: every failure is an ImdsError naming the path -----------------------

SPOT = "meta-data/spot/instance-action"


@pytest.mark.parametrize(
    "fault, named",
    [
        ("truncated", "IncompleteRead"),
        ("bad-status-line", "BadStatusLine"),
        ("reset", "RemoteDisconnected"),
        ("raw", "BadStatusLine"),
    ],
)
def test_transport_faults_are_imds_unavailable_naming_path_and_cause(imds, fault, named):
    client = ImdsClient(endpoint=imds.url, attempts=2, sleep=lambda s: None)
    assert client.instance_id() == INSTANCE_ID  # a token first: the fault is on the GET
    imds.fault(SPOT, fault, raw="garbage\r\n\r\n")
    with pytest.raises(ImdsUnavailable) as err:
        client.spot_instance_action()
    assert SPOT in str(err.value) and named in str(err.value), err.value
    assert [r["status"] for r in gets(imds, "instance-action")] == [fault, fault]
    # the client is still usable, and other paths were never affected
    assert client.instance_id() == INSTANCE_ID
    imds.fault(SPOT, None)
    assert client.spot_instance_action() is None


@pytest.mark.parametrize(
    "body, what",
    [
        ('{"action": "terminate", "time": "2026-', "is not JSON"),
        ('["terminate"]', "is not a JSON object"),
        ('{"time": "2026-11-21T12:00:00Z"}', 'has no "action"'),
        ('{"action": "", "time": "2026-11-21T12:00:00Z"}', 'has no "action"'),
    ],
)
def test_malformed_spot_notice_is_imds_malformed_quoting_the_answer(imds, body, what):
    client = ImdsClient(endpoint=imds.url)
    imds.set_paths({SPOT: body})
    with pytest.raises(ImdsMalformed) as err:
        client.spot_instance_action()
    assert f"IMDS {SPOT} {what}" in str(err.value)
    assert isinstance(err.value, ImdsError) and not isinstance(err.value, ImdsUnavailable)
    assert body[:20] in str(err.value)  # the answer is quoted (short), so the log names it


def test_rig_refuses_an_unknown_fault(imds):
    with pytest.raises(Exception):
        imds.fault(SPOT, "no-such-fault")
