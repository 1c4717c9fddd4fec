"""The one exception type that reaches users as a single line.

Everything a user can get wrong (a broken TOML file, a missing dataset, a target
module that matches nothing) is raised as :class:`UserError`. The CLI prints its
message and exits with code 2; the UI shows it as a notification. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: one line that says what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ProjectError(UserError):
    """A project file or a ``--set`` override that does not validate."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        prefix = f"{source}: " if source else ""
        where = f"{key}: " if key else ""
        super().__init__(f"{prefix}{where}{message}")
