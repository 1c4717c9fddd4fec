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


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message as its first non-blank line (at most ``limit`` characters), or
    its class name when it says nothing: the part of a library's error a one-line reason quotes.
    The line is kept as the library wrote it from its first character on (a trailing space
    too), as the modules' own copies of this quoted it."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else error.__class__.__name__


def one_line(error: BaseException | None) -> str:
    """An exception as the single line a user sees (never a traceback)."""
    if isinstance(error, UserError):
        return error.message
    if error is None:
        return "failed"
    lines = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {lines[0][:300]}" if lines else error.__class__.__name__


def os_reason(exc: OSError) -> str:
    """An OSError in a few words: the disk being full said as such."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({exc.strerror or 'no space left'}); free some space"
    return exc.strerror or exc.__class__.__name__


def file_error(path: object, exc: BaseException, what: str = "file", fix: str = "") -> UserError:
    """The one translation of an exception met reading or writing a user's file into a
    UserError: the file, what went wrong in words, the position where known, and the fix."""
    import errno

    where = f"{path}: "
    fix = f"; {fix}" if fix else ""
    if isinstance(exc, UnicodeDecodeError):
        data = exc.object if isinstance(exc.object, bytes) else b""
        line = data[: exc.start].count(b"\n") + 1
        return UserError(f"{where}not UTF-8 text (line {line}, byte {exc.start}); save it as UTF-8{fix}")
    if isinstance(exc, RecursionError):
        return UserError(f"{where}nested too deeply to read (a value inside thousands of brackets){fix}")
    if isinstance(exc, MemoryError):
        return UserError(f"{where}too large to read into memory{fix}")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return UserError(f"{where}{os_reason(exc)}{fix}")
        if exc.errno == errno.ENOENT:
            return UserError(f"{where}no such {what}{fix}")
        if exc.errno == errno.EISDIR:
            return UserError(f"{where}is a folder, not a {what}{fix}")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return UserError(f"{where}permission denied{fix}")
        return UserError(f"{where}cannot read or write it ({os_reason(exc)}){fix}")
    return UserError(f"{where}not a valid {what} ({one_line(exc)}){fix}")
