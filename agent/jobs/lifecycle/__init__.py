"""`airflow-agent lifecycle watch`: ASG termination and Spot notices -> drain."""
