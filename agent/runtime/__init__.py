"""How jobs run: the daemon loop and the job runner every command goes through."""
