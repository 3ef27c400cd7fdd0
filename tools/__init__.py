"""Release tooling run from the repository, never installed: `python -m tools.release`."""
