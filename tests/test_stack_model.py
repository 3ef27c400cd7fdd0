"""The sandbox's model of the stack (sandbox/stack/model.py) on the real template: parameters
checked as CloudFormation checks them, Conditions, intrinsic functions, and the links from a
role to its group, launch template, configSet and instance role. Fast: no AWS involved."""

from __future__ import annotations

import json
import re

import pytest

from sandbox.stack.model import NO_VALUE, ROLES, StackError, StackModel
from sandbox.stack.parameters import SANDBOX_PARAMETERS, read_parameters


@pytest.fixture(scope="module")
def model() -> StackModel:
    return StackModel.load()


def test_the_example_values_and_only_the_listed_overrides(model):
    example = read_parameters(model.template_path.parent / "parameters.example.json")
    overrides = json.loads(SANDBOX_PARAMETERS.read_text())["overrides"]
    for name, value in example.items():
        if name in overrides:
            continue
        got = model.parameters[name]
        assert (",".join(got) if isinstance(got, list) else got) == value, name
    # every override says why, and is one of the kinds the sandbox knows
    for name, spec in overrides.items():
        assert spec.get("why"), name
        assert set(spec) & {"value", "from", "generate"}, name
    # the Fernet key is made per launch, valid for the parameter's pattern, never the same
    fernet = model.parameters["FernetKey"]
    assert re.fullmatch(model.template["Parameters"]["FernetKey"]["AllowedPattern"], fernet)
    assert StackModel.load().parameters["FernetKey"] != fernet
    # ... unless given (a rotation's new,old list): a stack update keeps only generated values
    assert model.generated_parameters == {"FernetKey"}
    new = StackModel.load().parameters["FernetKey"]
    rotated = StackModel.load(extra={"FernetKey": f"{new},{fernet}"})
    assert rotated.parameters["FernetKey"] == f"{new},{fernet}"
    assert rotated.generated_parameters == set()


@pytest.mark.parametrize(
    "change, refused",
    [
        ({"NoSuchParameter": "x"}, "NoSuchParameter is not declared"),
        ({"AirflowVersion": "2.10.0"}, "AirflowVersion: value does not match AllowedPattern"),
        ({"DbMultiAz": "maybe"}, "DbMultiAz: 'maybe' is not one of"),
        ({"WebserverCount": "11"}, "WebserverCount: 11 > MaxValue"),
        ({"DrainTimeout": "10"}, "DrainTimeout: 10 < MinValue"),
    ],
)
def test_parameters_cloudformation_refuses_are_refused(change, refused):
    with pytest.raises(StackError, match=re.escape(refused)):
        StackModel.load(overrides={**_overrides(), **change})


def test_a_parameter_without_value_or_default_is_refused(tmp_path):
    params = read_parameters(StackModel.load().template_path.parent / "parameters.example.json")
    del params["UiAllowedCidr"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(params))
    with pytest.raises(StackError, match="UiAllowedCidr has no value and no default"):
        StackModel.load(params=path)


def _overrides():
    data = json.loads(SANDBOX_PARAMETERS.read_text())["overrides"]
    return {k: v.get("value", v) for k, v in data.items()}


@pytest.mark.parametrize("count, min_in_service", [("1", 0), ("2", 1)])
def test_conditions_and_fn_if_follow_the_webserver_count(count, min_in_service):
    m = StackModel.load(overrides={**_overrides(), "WebserverCount": count})
    assert m.condition("OneWebserver") is (count == "1")
    policy = m.resolve(m.resources["WebserverGroup"]["UpdatePolicy"])
    rolling = policy["AutoScalingRollingUpdate"]
    assert int(rolling["MinInstancesInService"]) == min_in_service
    assert int(m.prop("WebserverGroup", "MaxSize")) == int(count)


def test_no_value_removes_the_key_or_item(model):
    value = {"A": {"Ref": "AWS::NoValue"}, "B": [1, {"Ref": "AWS::NoValue"}, 2], "C": "c"}
    assert model.resolve(value) == {"B": [1, 2], "C": "c"}
    assert model.ref("AWS::NoValue") is NO_VALUE


def test_workers_sets_the_worker_groups_desired_capacity():
    m = StackModel.load(workers=5)
    assert m.prop("WorkerGroup", "DesiredCapacity") == "5"
    assert int(m.prop("WorkerGroup", "MaxSize")) >= 5


def test_each_role_is_found_through_the_templates_own_links(model):
    roles = {}
    for role in ROLES:
        group = model.group_for(role)
        lt = model.launch_template_for(role)
        assert model.resources[group]["Type"] == "AWS::AutoScaling::AutoScalingGroup"
        # the configSet the launch template's UserData runs at first boot
        assert f"--configsets {model.configset_for(role)} " in model.user_data(lt)
        assert model.configset_for(role) == role
        assert model.init_resource(role) == "InstanceConfig"
        roles[role] = model.instance_role_for(role)
    assert len(set(roles.values())) == 3
    assert "configSets" in model.init_metadata("worker")


def test_creation_order_puts_every_dependency_first(model):
    order = model.creation_order()
    # every resource whose condition holds (the example's WorkerMinSize 1: no wake-up alarm)
    assert sorted(order) == sorted(r for r in model.resources if model.active(r))
    assert "WorkerWakeAlarm" in model.resources and "WorkerWakeAlarm" not in order
    position = {rid: i for i, rid in enumerate(order)}
    for rid in order:
        for dep in model.dependencies(rid):
            assert position[dep] < position[rid], f"{rid} before its dependency {dep}"


def test_endpoints_are_the_names_the_template_hands_to_instances(model):
    hosts = model.endpoints()
    assert set(hosts) == {"Database", "Broker", "LoadBalancer"}
    broker_url = model.prop("BrokerUrlSecret", "SecretString")
    assert f"@{hosts['Broker']}:6379/" in broker_url
    assert hosts["LoadBalancer"] in model.prop("ParamExecutionApi", "Value")
    # before the secrets exist, the dynamic reference is left as written
    assert "{{resolve:secretsmanager:" in broker_url
