"""Running Airflow code for the agent: the CLI as the airflow user and the bridge."""
