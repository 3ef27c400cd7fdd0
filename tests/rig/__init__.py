"""The test rig: moto behind our own wrapper, a strict IMDSv2 server, and the systemd test host.

Used by the pytest fixtures, `make demo` and `bench/`. Every server binds 127.0.0.1 on a free
port and is ended by its PID.
"""
