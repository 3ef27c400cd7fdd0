"""`airflow-agent deploy-hook`: the CodeDeploy lifecycle events for this role."""
