"""The launched stack: `cloudformation/airflow-cluster.yaml` run locally (issue 11).

model.py resolves the template; aws_resources.py creates what instances read in the embedded
AWS; iam_policy.py evaluates the instance roles' policies; launch.py brings the stack up.
network/standins/instance/cfn_init_apply/substitutions build the hosts and their network.
"""
