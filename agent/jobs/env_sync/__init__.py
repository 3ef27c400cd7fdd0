"""`airflow-agent env sync`: SSM Parameter Store -> the Airflow env file."""
