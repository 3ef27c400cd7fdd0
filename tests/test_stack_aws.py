"""The template created in the embedded AWS (sandbox/stack/aws_resources.py) and its IAM enforced
(sandbox/aws_server.py with sandbox/stack/iam_policy.py): issue 11 Build 1 and 2.

- Everything an instance reads exists with the template's own values: every SSM parameter,
  every secret (GenerateSecretString honoured; dynamic references resolved to the generated
  values), the roles with their policies, profiles, launch templates, groups with instances at
  the desired capacity (`--workers`), the lifecycle hook, CodeDeploy; the types not created are
  named with a reason.
- Credentials issued for an instance role (served by the strict IMDS) are held to that role's
  policies: an allowed call passes, a resource outside them is refused with AccessDenied naming
  action and resource in the service's own error shape; the rig's admin key passes.
- A copy of the template without the worker's read of the broker secret: the worker role's
  read of it is refused, naming the action and the secret's ARN.
"""

from __future__ import annotations

import json
import re

import boto3
import botocore.exceptions
import pytest
import yaml

from sandbox.aws_server import AwsServer
from sandbox.cfn_template import load_template
from sandbox.imds_server import ImdsServer
from sandbox.stack.aws_resources import NOT_CREATED, create_in_aws, update_in_aws
from sandbox.stack.model import TEMPLATE, StackModel
from sandbox.stack.scenario import updated_template

REGION = "us-east-1"


@pytest.fixture(scope="module")
def stack(aws_server):
    aws_server.reset()
    model = StackModel.load(workers=3)
    report = create_in_aws(model, aws_server)
    yield model, report, aws_server
    aws_server.reset()


def role_client(aws: AwsServer, model: StackModel, role: str, service: str, session="i-test"):
    creds = aws.issue_credentials(model.instance_role_for(role), session)
    return boto3.client(
        service,
        endpoint_url=aws.url,
        region_name=REGION,
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["Token"],
    )


def task_role_of(model: StackModel, role: str) -> str:
    """The logical id of the role the instance role may sts:AssumeRole (its policy says)."""
    rid = next(r for r in model.resources if model.physical.get(r) == model.instance_role_for(role))
    for policy in model.resources[rid]["Properties"]["Policies"]:
        for stmt in policy["PolicyDocument"]["Statement"]:
            if stmt.get("Action") == "sts:AssumeRole":
                return stmt["Resource"]["Fn::GetAtt"][0]
    raise AssertionError(f"{role} may assume no role")


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as err:
        call(*args, **kwargs)
    return err.value


# -- Build 1: the template's resources -------------------------------------------------------


def test_every_ssm_parameter_with_the_templates_value(stack):
    model, _report, aws = stack
    ssm = aws.client("ssm")
    params = [r for r, res in model.resources.items() if res["Type"] == "AWS::SSM::Parameter"]
    assert len(params) >= 10
    for rid in params:
        got = ssm.get_parameter(Name=model.prop(rid, "Name"))["Parameter"]
        assert got["Value"] == str(model.prop(rid, "Value")), rid
        assert got["Type"] == model.prop(rid, "Type")
    execution_api = model.prop("ParamExecutionApi", "Value")
    assert model.endpoints()["LoadBalancer"] in execution_api


def test_every_secret_with_generated_strings_honoured(stack):
    model, _report, aws = stack
    sm = aws.client("secretsmanager")
    secrets = [
        r for r, res in model.resources.items() if res["Type"] == "AWS::SecretsManager::Secret"
    ]
    values = {}
    for rid in secrets:
        got = sm.get_secret_value(SecretId=model.prop(rid, "Name"))
        assert got["ARN"] == model.ref(rid)
        values[rid] = got["SecretString"]
        described = sm.describe_secret(SecretId=got["ARN"])
        assert described["KmsKeyId"] == model.ref("SecretsKey")
    master = json.loads(values["DbMasterSecret"])
    assert master["username"] == "airflow"  # SecretStringTemplate kept
    assert re.fullmatch(r"[A-Za-z0-9]{32}", master["password"])  # length, no punctuation
    # the target attachment added the database stand-in's connection fields, as CloudFormation does
    assert master["host"] == model.endpoints()["Database"] and master["port"] == 5432
    token = json.loads(values["BrokerAuthSecret"])["token"]
    assert re.fullmatch(r"[A-Za-z0-9]{64}", token)
    assert re.fullmatch(r"[A-Za-z0-9]{64}", values["JwtSecret"])
    assert values["JwtSecret"] != values["ApiSecretKeySecret"]
    # dynamic references resolved to the generated values, endpoints to the stand-ins' names
    broker = model.endpoints()["Broker"]
    assert values["BrokerUrlSecret"] == f"rediss://:{token}@{broker}:6379/0?ssl_cert_reqs=required"
    assert (
        f"airflow:{master['password']}@{model.endpoints()['Database']}:5432/"
        in values["DbConnSecret"]
    )
    assert values["FernetKeySecret"] == model.parameters["FernetKey"]


def test_roles_profiles_and_their_policies_are_the_templates(stack):
    model, _report, aws = stack
    iam = aws.client("iam")
    for role in ("scheduler", "webserver", "worker"):
        name = model.instance_role_for(role)
        role_rid = next(r for r in model.resources if model.physical.get(r) == name)
        for policy in model.prop(role_rid, "Policies"):
            got = iam.get_role_policy(RoleName=name, PolicyName=policy["PolicyName"])
            assert got["PolicyDocument"] == policy["PolicyDocument"]
        profile = model.physical[model.instance_profile_for(role)]
        roles = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]
        assert [r["RoleName"] for r in roles] == [name]


def test_groups_launch_their_instances_with_the_launch_templates(stack):
    model, _report, aws = stack
    asg, ec2 = aws.client("autoscaling"), aws.client("ec2")
    expected = {"scheduler": 1, "webserver": 2, "worker": 3}  # --workers 3
    for role, count in expected.items():
        name = model.ref(model.group_for(role))
        group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][
            0
        ]
        assert len(group["Instances"]) == count, role
        assert group["LaunchTemplate"]["LaunchTemplateId"] == model.ref(
            model.launch_template_for(role)
        )
        tags = {t["Key"]: t["Value"] for t in group["Tags"]}
        assert tags["airflow:role"] == role
        lt = ec2.describe_launch_template_versions(
            LaunchTemplateId=group["LaunchTemplate"]["LaunchTemplateId"]
        )["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        assert lt["IamInstanceProfile"]["Arn"] == model.get_att(
            model.instance_profile_for(role), "Arn"
        )
    hooks = asg.describe_lifecycle_hooks(AutoScalingGroupName=model.ref("WorkerGroup"))
    (hook,) = hooks["LifecycleHooks"]
    assert hook["LifecycleHookName"] == model.prop("WorkerTerminationHook", "LifecycleHookName")
    assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    cd = aws.client("codedeploy")
    for rid in ("WorkerDeploymentGroup", "SchedulerDeploymentGroup", "WebserverDeploymentGroup"):
        dg = cd.get_deployment_group(
            applicationName=model.ref("CodeDeployApplication"),
            deploymentGroupName=model.ref(rid),
        )["deploymentGroupInfo"]
        # moto answers each group as a bare name, which botocore cannot parse into {"name":
        # ...}: the count, the role and the configuration are what can be read back
        assert len(dg["autoScalingGroups"]) == 1
        assert dg["serviceRoleArn"] == model.get_att("CodeDeployServiceRole", "Arn")
        assert dg["deploymentConfigName"] == model.prop(rid, "DeploymentConfigName")


def test_the_worker_scaling_policy_is_the_templates_and_the_group_collects_its_metric(stack):
    model, _report, aws = stack
    asg = aws.client("autoscaling")
    name = model.ref("WorkerGroup")
    (policy,) = asg.describe_policies(AutoScalingGroupName=name)["ScalingPolicies"]
    assert policy["PolicyARN"] == model.ref("WorkerScalingPolicy")
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert "EstimatedInstanceWarmup" not in policy  # the group's DefaultInstanceWarmup applies
    tt = model.prop("WorkerScalingPolicy", "TargetTrackingConfiguration")
    assert policy["TargetTrackingConfiguration"]["TargetValue"] == tt["TargetValue"]
    stored = policy["TargetTrackingConfiguration"]["CustomizedMetricSpecification"]["Metrics"]
    assert stored == tt["CustomizedMetricSpecification"]["Metrics"]
    (group,) = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    assert {m["Metric"] for m in group["EnabledMetrics"]} == {
        "GroupInServiceInstances",
        "GroupDesiredCapacity",
    }
    # WorkerMinSize 1 in the example: the wake-up alarm and its policy are not created
    assert not model.active("WorkerWakeAlarm") and not model.active("WorkerWakePolicy")


def test_with_no_minimum_worker_the_wake_up_alarm_invokes_its_step_policy():
    with AwsServer() as aws:
        model = StackModel.load(extra={"WorkerMinSize": "0"})
        report = create_in_aws(model, aws)
        assert report.count("AWS::AutoScaling::ScalingPolicy") == 2
        (alarm,) = aws.client("cloudwatch").describe_alarms(
            AlarmNames=[model.ref("WorkerWakeAlarm")]
        )["MetricAlarms"]
        assert alarm["AlarmActions"] == [model.ref("WorkerWakePolicy")]
        queries = {m["Id"]: m for m in alarm["Metrics"]}
        assert (
            queries["e1"]["Expression"] == model.prop("WorkerWakeAlarm", "Metrics")[2]["Expression"]
        )


def test_types_not_created_are_named_with_the_reason(stack):
    model, report, _aws = stack
    skipped = {rid: (rtype, why) for rid, rtype, why in report.skipped}
    for rid, res in model.resources.items():
        if res["Type"] in NOT_CREATED:
            assert skipped[rid] == (res["Type"], NOT_CREATED[res["Type"]])
        else:
            assert rid not in skipped, f"{rid} ({res['Type']}) skipped: {skipped.get(rid)}"
    lines = "\n".join(report.lines())
    assert "Database: PostgreSQL 15 stand-in" in lines and "HAProxy" in lines


def test_the_alarms_exist_on_their_metrics_without_actions_when_no_topic(stack):
    model, report, aws = stack
    rids = [
        rid
        for rid, res in model.resources.items()
        if res["Type"] == "AWS::CloudWatch::Alarm" and model.active(rid)  # no wake-up alarm
    ]
    assert report.count("AWS::CloudWatch::Alarm") == len(rids) >= 10
    got = {a["AlarmName"]: a for a in aws.client("cloudwatch").describe_alarms()["MetricAlarms"]}
    drain = got[f"{model.stack_name}-drain-past-deadline"]
    assert (drain["Namespace"], drain["MetricName"]) == ("AirflowEC2Agent", "DrainsPastDeadline")
    assert {d["Name"]: d["Value"] for d in drain["Dimensions"]} == {
        "Cluster": model.stack_name,
        "Role": "worker",
    }
    env = got[f"{model.stack_name}-env-sync-failures"]
    assert len(env["Metrics"]) == 7 and env["Threshold"] == 1.0
    assert all(not a.get("AlarmActions") for a in got.values())  # AlarmTopicArn is empty


def test_log_groups_with_the_templates_names_and_retention(stack):
    """AWS::Logs::LogGroup (sandbox/stack/aws_logs.py): each group the template declares exists
    with CloudWatchLogRetentionDays applied, and its Arn is the one the roles' policies name."""
    model, report, aws = stack
    groups = [rid for rid, res in model.resources.items() if res["Type"] == "AWS::Logs::LogGroup"]
    assert groups
    prefix = f"/airflow/{model.stack_name}/"
    found = aws.client("logs").describe_log_groups(logGroupNamePrefix=prefix)
    retention = {g["logGroupName"]: g.get("retentionInDays") for g in found["logGroups"]}
    days = int(model.ref("CloudWatchLogRetentionDays"))
    assert retention == {model.ref(rid): days for rid in groups}
    for rid in groups:
        assert model.get_att(rid, "Arn") == (
            f"arn:aws:logs:{REGION}:{model.pseudo['AWS::AccountId']}:log-group:{model.ref(rid)}:*"
        )
    notes = dict(report.notes)
    assert all("no CloudWatch agent" in notes[rid] for rid in groups)


@pytest.mark.parametrize("role", ["scheduler", "webserver", "worker"])
def test_each_role_writes_its_streams_to_the_stacks_log_groups_and_no_other(stack, role):
    """The ServiceLogs statement, enforced: what the CloudWatch agent calls with the instance's
    credentials passes on the stack's log groups and is refused on any other group."""
    model, _report, aws = stack
    logs = role_client(aws, model, role, "logs", session=f"i-logs-{role}")
    for rid in ("AirflowLogGroup", "ProvisioningLogGroup"):
        group = model.ref(rid)
        stream = f"i-logs-{role}/{rid}"
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
        logs.put_log_events(
            logGroupName=group,
            logStreamName=stream,
            logEvents=[{"timestamp": 1_700_000_000_000, "message": "hello"}],
        )
        logs.describe_log_streams(logGroupName=group, logStreamNamePrefix=stream)
    aws.client("logs").create_log_group(logGroupName=f"/other/{role}")
    err = refused(logs.create_log_stream, logGroupName=f"/other/{role}", logStreamName="s")
    assert err.response["Error"]["Code"] == "AccessDeniedException"
    assert f"log-group:/other/{role}:log-stream:s" in str(err)
    # the template owns the groups and their retention
    err = refused(
        logs.put_retention_policy, logGroupName=model.ref("AgentLogGroup"), retentionInDays=1
    )
    assert "logs:PutRetentionPolicy" in str(err)


# -- Build 2: IAM enforced -------------------------------------------------------------------


def test_a_roles_allowed_calls_pass(stack):
    model, _report, aws = stack
    path = f"/airflow/{model.stack_name}/"
    ssm = role_client(aws, model, "worker", "ssm")
    got = ssm.get_parameters_by_path(Path=path, Recursive=True, WithDecryption=True)
    assert got["Parameters"]
    sm = role_client(aws, model, "worker", "secretsmanager")
    # GetSecretValue, and the kms:Decrypt it needs through Secrets Manager (kms:ViaService)
    assert sm.get_secret_value(SecretId=model.ref("BrokerUrlSecret"))["SecretString"].startswith(
        "rediss://"
    )
    asg = role_client(aws, model, "worker", "autoscaling")
    admin = aws.client("autoscaling")  # the worker may not describe groups: the harness looks
    instance = admin.describe_auto_scaling_groups(AutoScalingGroupNames=[model.ref("WorkerGroup")])[
        "AutoScalingGroups"
    ][0]["Instances"][0]["InstanceId"]
    asg.complete_lifecycle_action(
        AutoScalingGroupName=model.ref("WorkerGroup"),
        LifecycleHookName=model.prop("WorkerTerminationHook", "LifecycleHookName"),
        InstanceId=instance,
        LifecycleActionResult="CONTINUE",
    )
    s3 = role_client(aws, model, "worker", "s3")
    s3.put_object(Bucket=model.ref("LogsBucket"), Key="logs/dag/run/task/1.log", Body=b"x")
    assert (
        s3.get_object(Bucket=model.ref("LogsBucket"), Key="logs/dag/run/task/1.log")["Body"].read()
        == b"x"
    )
    assert role_client(aws, model, "worker", "ec2").describe_tags()["Tags"] is not None
    assert not [d for d in aws.denials() if d["session"] == "i-test"]


def test_resources_outside_the_roles_policy_are_refused_naming_action_and_resource(stack):
    model, _report, aws = stack
    account_region = f"{REGION}:123456789012"
    ssm = role_client(aws, model, "worker", "ssm", "i-refused")
    err = refused(ssm.get_parameters_by_path, Path="/airflow/other-stack/")
    arn = f"arn:aws:ssm:{account_region}:parameter/airflow/other-stack/"
    assert err.response["Error"]["Code"] == "AccessDeniedException"
    assert f"not authorized to perform: ssm:GetParametersByPath on resource: {arn}" in str(err)
    # the worker does not read the admin password nor the variables (scheduler/webserver only)
    sm = role_client(aws, model, "worker", "secretsmanager", "i-refused")
    err = refused(sm.get_secret_value, SecretId=model.prop("VariablesSecret", "Name"))
    assert f"secretsmanager:GetSecretValue on resource: {model.ref('VariablesSecret')}" in str(err)
    # a lifecycle action on another group: the query protocol's shape (AccessDenied)
    asg = role_client(aws, model, "worker", "autoscaling", "i-refused")
    err = refused(
        asg.complete_lifecycle_action,
        AutoScalingGroupName=model.ref("SchedulerGroup"),
        LifecycleHookName="x",
        InstanceId="i-0",
        LifecycleActionResult="CONTINUE",
    )
    assert err.response["Error"]["Code"] == "AccessDenied"
    assert "autoscaling:CompleteLifecycleAction on resource: arn:aws:autoscaling:" in str(err)
    assert f"autoScalingGroupName/{model.ref('SchedulerGroup')}" in str(err)
    # the webserver only reads logs: S3's own error shape
    s3 = role_client(aws, model, "webserver", "s3", "i-refused")
    err = refused(s3.put_object, Bucket=model.ref("LogsBucket"), Key="logs/x", Body=b"x")
    assert err.response["Error"]["Code"] == "AccessDenied"
    assert f"s3:PutObject on resource: arn:aws:s3:::{model.ref('LogsBucket')}/logs/x" in str(err)
    denials = [(d["action"], d["role"]) for d in aws.denials() if d["session"] == "i-refused"]
    assert denials == [
        ("ssm:GetParametersByPath", model.instance_role_for("worker")),
        ("secretsmanager:GetSecretValue", model.instance_role_for("worker")),
        ("autoscaling:CompleteLifecycleAction", model.instance_role_for("worker")),
        ("s3:PutObject", model.instance_role_for("webserver")),
    ]
    # the rig's own admin key is not held to any role
    aws.client("ssm").get_parameters_by_path(Path="/airflow/other-stack/")


def test_instance_credentials_come_from_the_imds_role_path(stack, monkeypatch):
    model, _report, aws = stack
    role = model.instance_role_for("webserver")
    with ImdsServer() as imds:
        imds.set_role_credentials(role, aws.issue_credentials(role, "i-imds"))
        for key in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        ):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url + "/")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        session = boto3.Session(region_name=REGION)
        sm = session.client("secretsmanager", endpoint_url=aws.url)
        admin = sm.get_secret_value(SecretId=model.ref("AdminPasswordSecret"))
        assert json.loads(admin["SecretString"])["username"] == "admin"
        err = refused(sm.get_secret_value, SecretId=model.ref("VariablesSecret"))
        assert f"assumed-role/{role}/i-imds is not authorized" in str(err)


def test_a_template_copy_without_the_workers_broker_secret_grant(tmp_path):
    template = load_template(TEMPLATE)
    policy = template["Resources"]["WorkerRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    stmt = next(s for s in policy["Statement"] if s["Sid"] == "AirflowConfigSecrets")
    stmt["Resource"] = [r for r in stmt["Resource"] if r != {"Ref": "BrokerUrlSecret"}]
    kept = stmt["Resource"][0]["Ref"]
    copy = tmp_path / "airflow-cluster.yaml"
    copy.write_text(yaml.safe_dump(template, sort_keys=False))
    with AwsServer() as aws:
        model = StackModel.load(copy)
        create_in_aws(model, aws)
        sm = role_client(aws, model, "worker", "secretsmanager", "i-worker")
        err = refused(sm.get_secret_value, SecretId=model.prop("BrokerUrlSecret", "Name"))
        assert err.response["Error"]["Code"] == "AccessDeniedException"
        assert (
            f"not authorized to perform: secretsmanager:GetSecretValue on resource: "
            f"{model.ref('BrokerUrlSecret')}"
        ) in str(err)
        # the grants left in place still work
        assert sm.get_secret_value(SecretId=model.ref(kept))["SecretString"]


def test_task_role_credentials_from_assume_role_are_held_to_the_task_role(stack):
    model, _report, aws = stack
    sts = role_client(aws, model, "worker", "sts", "i-task")
    task_rid = task_role_of(model, "worker")
    got = sts.assume_role(RoleArn=model.get_att(task_rid, "Arn"), RoleSessionName="airflow-tasks")
    creds = got["Credentials"]
    task = boto3.Session(
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        region_name=REGION,
    )
    s3 = task.client("s3", endpoint_url=aws.url)
    s3.put_object(Bucket=model.ref("LogsBucket"), Key="logs/task.log", Body=b"x")
    ssm = task.client("ssm", endpoint_url=aws.url)
    err = refused(ssm.get_parameters_by_path, Path=f"/airflow/{model.stack_name}/")
    task_role = model.ref(task_rid)
    assert f"assumed-role/{task_role}/airflow-tasks is not authorized" in str(err)
    # an instance role may assume only the task role
    err = refused(
        sts.assume_role, RoleArn=model.get_att("SchedulerRole", "Arn"), RoleSessionName="xx"
    )
    assert "sts:AssumeRole on resource: " + model.get_att("SchedulerRole", "Arn") in str(err)


def test_a_stack_update_writes_what_changed_and_keeps_the_rest(stack, tmp_path):
    model, _report, aws = stack
    new = StackModel.load(updated_template(tmp_path), workers=3)
    changed = update_in_aws(model, new, aws)
    path = f"/airflow/{model.stack_name}/core/dagbag_import_timeout"
    assert changed == [("ParamDagbagImportTimeout", f"created {path}")]
    assert aws.client("ssm").get_parameter(Name=path)["Parameter"]["Value"] == "45"
    # the generated values and physical ids are the same stack's
    assert new.parameters["FernetKey"] == model.parameters["FernetKey"]
    assert new.ref("BrokerUrlSecret") == model.ref("BrokerUrlSecret")
    text = new.init_metadata("worker")["configure"]["files"]["/etc/airflow-agent/roles/worker.yaml"]
    assert "# config revision: sandbox-2" in text["content"]


def test_the_api_servers_target_group_and_the_webserver_role_in_it(stack):
    """The template's target group is in moto, the webserver group's instances registered in it
    (moto's Auto Scaling group does it, as AWS's does); the webserver role may take its own
    instances out and back (agent.platform.target_group), no other role may."""
    model, _report, aws = stack
    arn = model.ref("ApiServerTargetGroup")
    assert arn.startswith("arn:aws:elasticloadbalancing:") and ":targetgroup/" in arn
    admin = aws.client("elbv2")
    (tg,) = admin.describe_target_groups(TargetGroupArns=[arn])["TargetGroups"]
    props = model.properties("ApiServerTargetGroup")
    assert (tg["Port"], tg["Protocol"], tg["HealthCheckPath"]) == (
        int(props["Port"]), props["Protocol"], props["HealthCheckPath"]
    )  # fmt: skip
    attrs = admin.describe_target_group_attributes(TargetGroupArn=arn)["Attributes"]
    assert {"Key": "deregistration_delay.timeout_seconds", "Value": "30"} in attrs
    group = aws.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[model.ref("WebserverGroup")]
    )["AutoScalingGroups"][0]
    ids = sorted(i["InstanceId"] for i in group["Instances"])
    health = admin.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
    assert sorted(d["Target"]["Id"] for d in health) == ids and ids
    assert {d["TargetHealth"]["State"] for d in health} == {"healthy"}

    elb = role_client(aws, model, "webserver", "elbv2", "i-rotation")
    target = [{"Id": ids[0], "Port": tg["Port"]}]
    elb.describe_target_health(TargetGroupArn=arn)
    elb.deregister_targets(TargetGroupArn=arn, Targets=target)
    elb.register_targets(TargetGroupArn=arn, Targets=target)
    assert not [d for d in aws.denials() if d["session"] == "i-rotation"]
    other = admin.create_target_group(
        Name="not-this-stacks", Protocol="HTTP", Port=80, VpcId=tg["VpcId"]
    )["TargetGroups"][0]["TargetGroupArn"]
    err = refused(elb.register_targets, TargetGroupArn=other, Targets=target)
    assert f"elasticloadbalancing:RegisterTargets on resource: {other}" in str(err)
    scheduler = role_client(aws, model, "scheduler", "elbv2", "i-not-webserver")
    err = refused(scheduler.deregister_targets, TargetGroupArn=arn, Targets=target)
    assert f"elasticloadbalancing:DeregisterTargets on resource: {arn}" in str(err)
    admin.delete_target_group(TargetGroupArn=other)
