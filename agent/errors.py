"""Exit codes and the error types that carry them to the CLI.

Every command maps its outcome to one of these codes; the README documents them.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # an operation failed (AWS, IMDS, systemd, file I/O); last good state kept
EXIT_USAGE = 2  # bad command line or bad agent.yaml
EXIT_REFUSED = 3  # input was read but refused as bad or suspicious; last good state kept
EXIT_TIMEOUT = 4  # a deadline passed (drain, validation)
EXIT_INTERRUPTED = 130  # Ctrl-C (KeyboardInterrupt), as a shell reports SIGINT


class AgentError(Exception):
    """An error with a one-line, secret-free message and the exit code the CLI returns."""

    exit_code = EXIT_FAILURE


class ConfigError(AgentError):
    """agent.yaml or the command line is wrong; the message names the key and the file."""

    exit_code = EXIT_USAGE


class RefusedError(AgentError):
    """Input was fetched but refused (empty, malformed, suspicious); nothing was changed."""

    exit_code = EXIT_REFUSED


class DeadlineError(AgentError):
    """A bounded wait ran out of time."""

    exit_code = EXIT_TIMEOUT
