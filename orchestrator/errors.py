"""Domain errors: each becomes one line on stderr and an exit code at the CLI edge."""

from __future__ import annotations


class SatrlError(Exception):
    """An error the user can act on; `exit_code` is what the process returns."""

    exit_code: int = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(SatrlError):
    """Bad input on the command line or in a file: nothing was changed."""

    exit_code = 2


class NotFoundError(UsageError):
    """A run, experiment or file that does not exist."""


class ConflictError(SatrlError):
    """The request contradicts what the registry already holds."""

    exit_code = 3


class SchedulerError(SatrlError):
    """A scheduler command failed or printed something unreadable."""

    exit_code = 4

    def __init__(self, message: str, *, command: list[str] | None = None, stderr: str = "",
                 script: str | None = None) -> None:
        detail = message
        if command:
            detail += f" [command: {' '.join(command)}]"
        if stderr.strip():
            detail += f" [stderr: {stderr.strip().splitlines()[-1][:300]}]"
        if script:
            detail += f" [script: {script}]"
        super().__init__(detail)
        self.command = command
        self.stderr = stderr
        self.script = script
