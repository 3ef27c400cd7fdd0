"""The local stand-in for an AWS account and its EC2 instances.

systemd test hosts, embedded AWS (moto behind a wrapper), a strict IMDSv2 server, Redis,
PostgreSQL, the Airflow cluster and the demo. Used by the pytest fixtures, `make demo` and
`bench/`. Every server binds 127.0.0.1 (or an address inside a network namespace the sandbox
made) on a free port and is ended by its PID.
"""
