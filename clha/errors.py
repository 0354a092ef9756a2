"""Errors that point a user at the exact place in their input that is wrong."""

from __future__ import annotations

from typing import Optional


class InputError(ValueError):
    """Bad user input: names the file, the line (1-based) and the field when they are known."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None,
                 field: Optional[str] = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.detail = message
        where = ""
        if self.path is not None:
            where = self.path
            if line is not None:
                where += f":{line}"
            where += ": "
        if field is not None:
            where += f"field '{field}': "
        super().__init__(where + message)


class SaveError(RuntimeError):
    """A checkpoint or state could not be written (disk full, no permission): names the folder. What was saved
    before is intact, so the run can be resumed once the cause is fixed."""
