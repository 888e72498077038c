"""Errors of the dataset source readers.

Every message names the file (and, where it applies, the column or key) so that a research team
with a credentialed copy of a dataset sees at once which download or extraction step went wrong.
"""

from __future__ import annotations

from pathlib import Path

from inference.errors import RadVLMError


class SourceError(RadVLMError):
    """A dataset source cannot be read as the dataset ships it."""


class MissingSourceFileError(SourceError, FileNotFoundError):
    """A file or folder the dataset ships (or upstream derives) is not where it should be."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        super().__init__(f"{what}: {self.path} does not exist")


class SourceFormatError(SourceError, ValueError):
    """A source file exists but does not have the expected columns, keys or values."""

    def __init__(self, path: Path, message: str, *, column: str | None = None,
                 line: int | None = None) -> None:
        self.path = Path(path)
        self.column = column
        self.line = line
        where = str(self.path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
