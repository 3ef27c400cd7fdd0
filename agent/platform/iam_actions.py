"""The AWS actions each instance role may need, as data: the allow-list for the IAM policies.

`cloudformation/airflow-cluster.yaml` grants each instance role (scheduler, webserver, worker)
an IAM policy; `tests/test_cloudformation.py` checks every statement of it against this module,
and checks this module against the agent's code (every AWS operation an `agent/` module calls
must be listed under some job here). So a new AWS call in the agent fails a test until it is
listed here *and* granted in the template, and a grant that no code path needs fails too.

- AGENT_ACTIONS: job -> the IAM actions that job of the agent calls (its code paths).
- OTHER_ACTIONS: the other programs on the instance that use the role's credentials
  (Airflow itself, the CodeDeploy agent, cfn-init, the CloudWatch agent, the SSM agent) ->
  their actions.
- ROLE_CONSUMERS: instance role -> the jobs/programs that run on it.
- TASK_ROLE_CONSUMERS: the programs that act as the stack's task role (Airflow and its tasks).
- UNSCOPED_ACTIONS: actions whose service supports no resource-level permission, so the only
  honest Resource is "*". Everything else must be granted on this stack's ARNs only.

Plain data, no AWS calls: importing it is cheap and safe anywhere.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Tuple

AGENT_ACTIONS: Dict[str, Tuple[str, ...]] = {
    # agent/jobs/env_sync/sync.py: GetParametersByPath over env.ssm_paths (recursive, decrypted)
    "env sync": ("ssm:GetParametersByPath",),
    # jobs/variables/sync.py: GetSecretValue of the variables secret (its VersionId is the change
    # marker, so no DescribeSecret); the secret is encrypted with the stack's KMS key, which
    # Secrets Manager uses with the caller's kms:Decrypt (granted only via secretsmanager)
    "variables sync": ("secretsmanager:GetSecretValue", "kms:Decrypt"),
    # agent/jobs/role.py: the airflow:role tag (and the group name / logical-id tags for the
    # role.groups map) when IMDS instance tags are unavailable
    "role": ("ec2:DescribeTags",),
    # agent/jobs/lifecycle/watch.py: its group (when lifecycle.group_name and the IMDS tag are both
    # missing), the group's termination hook, heartbeats/completion, scale-in protection
    "lifecycle watch": (
        "autoscaling:DescribeAutoScalingInstances",
        "autoscaling:DescribeLifecycleHooks",
        "autoscaling:RecordLifecycleActionHeartbeat",
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:SetInstanceProtection",
    ),
    # agent/jobs/bootstrap.py runs env sync and role detection: nothing of its own
    "bootstrap": (),
    # agent/jobs/task_credentials/job.py: AssumeRole on the stack's task role (the only role
    # Airflow's processes get; they cannot reach IMDS), on every role
    "task credentials": ("sts:AssumeRole",),
    # agent/jobs/drain/broker.py via agent/airflow/option_sources.py: the worker's
    # AIRFLOW__CELERY__BROKER_URL_SECRET through Airflow's Secrets Manager backend settings
    # (drain, ValidateService ping, lifecycle busy counts), with the instance role
    "drain broker settings": ("secretsmanager:GetSecretValue", "kms:Decrypt"),
    # agent/platform/target_group.py: an api-server leaves its target group around a restart
    # (deployment, config push) when another target is healthy, and registers again
    "target group rotation": (
        "elasticloadbalancing:DescribeTargetHealth",
        "elasticloadbalancing:DeregisterTargets",
        "elasticloadbalancing:RegisterTargets",
    ),
    # agent/jobs/metrics/daemon.py (scheduler): one PutMetricData per interval from the elected
    # publisher (no resource-level permissions: restrict it with the cloudwatch:namespace
    # condition key to metrics.namespace), and the metadata database's URL through Airflow's
    # sql_alchemy_conn_secret
    "metrics": ("cloudwatch:PutMetricData", "secretsmanager:GetSecretValue", "kms:Decrypt"),
    # agent/events/publish.py (every role): the agent's own events (drains, lifecycle holds,
    # confapply restarts, env sync failures) at the end of a job or daemon pass; held to
    # metrics.namespace by the same cloudwatch:namespace condition
    "events": ("cloudwatch:PutMetricData",),
    # agent/jobs/worker_db/job.py (scheduler, after db migrate): the worker user's secret and the
    # master URL through Airflow's sql_alchemy_conn_secret
    "worker db user": ("secretsmanager:GetSecretValue", "kms:Decrypt"),
}

OTHER_ACTIONS: Dict[str, Tuple[str, ...]] = {
    # Airflow's S3 task handler: write task logs, read them back (the UI), list a task's logs
    "airflow remote logs": ("s3:PutObject", "s3:GetObject", "s3:ListBucket"),
    # the API server only reads logs
    "airflow remote logs (read)": ("s3:GetObject", "s3:ListBucket"),
    # Airflow's `*_secret` config options through the amazon provider's SecretsManagerBackend
    # (sql_alchemy_conn, broker_url, fernet_key, jwt_secret, secret_key): GetSecretValue only
    "airflow config secrets": ("secretsmanager:GetSecretValue", "kms:Decrypt"),
    # the CodeDeploy agent downloads revisions (S3 revisions may name an object version)
    "codedeploy agent": ("s3:GetObject", "s3:GetObjectVersion"),
    # cfn-init's install commands fetch the agent's package (`aws s3 cp`, the instance role)
    "cfn-init agent package": ("s3:GetObject",),
    # the CloudWatch agent ships the instance's service logs (units' journals, cfn-init,
    # cfn-hup, CodeDeploy agent) to the stack's log groups, which the template creates with
    # their retention: streams and events only (no CreateLogGroup, no PutRetentionPolicy)
    "cloudwatch agent": ("logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"),
    # the SSM agent: Run Command (e.g. `airflow-agent env sync` on demand) and Session Manager,
    # which replace SSH; the minimum it needs to register and take commands
    "ssm agent": (
        "ssm:UpdateInstanceInformation",
        "ssmmessages:CreateControlChannel",
        "ssmmessages:CreateDataChannel",
        "ssmmessages:OpenControlChannel",
        "ssmmessages:OpenDataChannel",
        "ec2messages:AcknowledgeMessage",
        "ec2messages:DeleteMessage",
        "ec2messages:FailMessage",
        "ec2messages:GetEndpoint",
        "ec2messages:GetMessages",
        "ec2messages:SendReply",
    ),
}

ROLE_CONSUMERS: Dict[str, Tuple[str, ...]] = {
    "scheduler": (
        "env sync",
        "events",
        "role",
        "bootstrap",
        "task credentials",
        "worker db user",
        "variables sync",
        "metrics",
        "airflow remote logs",
        "airflow config secrets",
        "codedeploy agent",
        "cfn-init agent package",
        "cloudwatch agent",
        "ssm agent",
    ),
    "webserver": (
        "env sync",
        "events",
        "role",
        "bootstrap",
        "task credentials",
        "target group rotation",
        "airflow remote logs (read)",
        "airflow config secrets",
        "codedeploy agent",
        "cfn-init agent package",
        "cloudwatch agent",
        "ssm agent",
    ),
    "worker": (
        "env sync",
        "events",
        "role",
        "bootstrap",
        "task credentials",
        "drain broker settings",
        "lifecycle watch",
        "airflow remote logs",
        "airflow config secrets",
        "codedeploy agent",
        "cfn-init agent package",
        "cloudwatch agent",
        "ssm agent",
    ),
}

# What Airflow's own processes and their tasks do with AWS, on every role: granted to the task
# role (agent/jobs/task_credentials), which they act as through the agent-written AWS config.
TASK_ROLE_CONSUMERS: Tuple[str, ...] = ("airflow remote logs", "airflow config secrets")

# No resource-level permissions in these services' authorization (Service Authorization
# Reference): the Resource must be "*".
UNSCOPED_ACTIONS: FrozenSet[str] = frozenset(
    {
        "ec2:DescribeTags",
        "autoscaling:DescribeAutoScalingInstances",
        "autoscaling:DescribeLifecycleHooks",
        "elasticloadbalancing:DescribeTargetHealth",
        "cloudwatch:PutMetricData",  # the cloudwatch:namespace condition key scopes it
    }
    # the SSM agent's message channels (its ssm:UpdateInstanceInformation is scoped)
    | {a for a in OTHER_ACTIONS["ssm agent"] if a.startswith(("ssmmessages:", "ec2messages:"))}
)


def consumer_actions(name: str) -> Tuple[str, ...]:
    """The actions of one agent job or other program."""
    if name in AGENT_ACTIONS:
        return AGENT_ACTIONS[name]
    return OTHER_ACTIONS[name]


def allowed_actions(role: str) -> FrozenSet[str]:
    """Every action an instance of `role` may be granted."""
    return frozenset(a for c in ROLE_CONSUMERS[role] for a in consumer_actions(c))


def task_role_actions() -> FrozenSet[str]:
    """Every action the task role may be granted (never an Auto Scaling or SSM one)."""
    return frozenset(a for c in TASK_ROLE_CONSUMERS for a in consumer_actions(c))


def agent_actions() -> FrozenSet[str]:
    """Every action some job of the agent calls."""
    return frozenset(a for actions in AGENT_ACTIONS.values() for a in actions)
