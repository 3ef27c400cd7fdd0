"""`airflow-agent drain` / `undrain`: the one drain procedure for every trigger."""
