"""`airflow-agent variables`: a Secrets Manager secret -> Airflow Variables."""
