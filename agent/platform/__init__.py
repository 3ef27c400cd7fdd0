"""What the agent stands on: IMDS, AWS clients, systemd, files, the env-file format."""
