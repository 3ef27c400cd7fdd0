"""One package or module per `airflow-agent` command: a pure plan and its I/O shell."""
