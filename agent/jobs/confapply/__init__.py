"""`airflow-agent confapply`: restart the role's units when the env file changes."""
