"""Task role credentials for Airflow: the agent (root) assumes the task role, Airflow reads it."""
