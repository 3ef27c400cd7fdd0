"""airflow-ec2-agent: the on-instance agent that configures, restarts, deploys, scales Airflow."""

__version__ = "0.1.0"
