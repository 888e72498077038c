"""Reading the CSV and JSON files of the public datasets, with errors that name file and column.

CSV files are read with the standard library (no pandas): the MIMIC-CXR tables have ~377k rows,
which ``csv.DictReader`` reads in seconds. Each CSV name may also be found gzip-compressed
(``mimic-cxr-2.0.0-split.csv.gz`` is how PhysioNet ships MIMIC-CXR-JPG; upstream RadVLM reads the
unpacked ``.csv``).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from training.sources.errors import MissingSourceFileError, SourceFormatError


def find_table(root: Path, name: str, what: str) -> Path:
    """``root/name``, or ``root/name.gz`` when only the compressed copy is there."""
    path = Path(root) / name
    if path.is_file():
        return path
    packed = path.with_name(path.name + ".gz")
    if packed.is_file():
        return packed
    raise MissingSourceFileError(path, what)


def require_dir(path: Path, what: str) -> Path:
    if not Path(path).is_dir():
        raise MissingSourceFileError(path, what)
    return Path(path)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def read_csv(path: Path, required: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row; the header must hold every ``required`` column."""
    path = Path(path)
    try:
        handle = _open_text(path)
    except OSError as exc:
        raise MissingSourceFileError(path, "CSV file") from exc
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for column in required:
            if column not in header:
                raise SourceFormatError(path, f"missing column (header has {header[:12]}…)"
                                        if len(header) > 12 else
                                        f"missing column (header has {header})", column=column)
        try:
            for row in reader:
                yield reader.line_num, row
        except (csv.Error, UnicodeDecodeError, EOFError, OSError) as exc:
            raise SourceFormatError(path, f"unreadable CSV: {exc}", line=reader.line_num) from exc


def read_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MissingSourceFileError(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceFormatError(path, f"not valid JSON: {exc}") from exc


def float_cell(path: Path, line: int, row: dict[str, str], column: str) -> float:
    """A numeric cell that must be present."""
    raw = (row.get(column) or "").strip()
    try:
        value = float(raw)
    except ValueError:
        raise SourceFormatError(path, f"expected a number, got {raw!r}", column=column,
                                line=line) from None
    if not math.isfinite(value):
        raise SourceFormatError(path, f"expected a finite number, got {raw!r}", column=column,
                                line=line)
    return value


def label_cell(path: Path, line: int, row: dict[str, str], column: str) -> float | None:
    """A CheXpert-style label cell: 1 (present), 0 (absent), -1 (uncertain), blank (None)."""
    raw = (row.get(column) or "").strip()
    if raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if value not in (1.0, 0.0, -1.0):
        raise SourceFormatError(path, f"label must be 1, 0, -1 or blank, got {raw!r}",
                                column=column, line=line)
    return value


def int_id(path: Path, line: int, row: dict[str, str], column: str) -> int:
    """An integer identifier column (subject_id, study_id); tolerates "123.0"."""
    raw = (row.get(column) or "").strip()
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise SourceFormatError(path, f"expected a non-negative integer id, got {raw!r}",
                                column=column, line=line)
    return int(value)


def text_cell(path: Path, line: int, row: dict[str, str], column: str) -> str:
    raw = (row.get(column) or "").strip()
    if not raw:
        raise SourceFormatError(path, "empty value", column=column, line=line)
    return raw
