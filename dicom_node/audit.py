"""Append-only audit log (JSON lines): who sent what, what was decided, what was delivered.

Each line carries a UTC timestamp, an event name and UIDs; patients appear only as the keyed
pseudonym from :mod:`dicom_node.identity` — never names or raw IDs. Lines are flushed and
fsynced one by one so the log is as durable as the job store it describes.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FORBIDDEN_KEYS = frozenset({"patient_name", "patient_id", "PatientName", "PatientID"})


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, event: str, **fields: Any) -> None:
        leaked = FORBIDDEN_KEYS.intersection(fields)
        if leaked:
            raise ValueError(f"audit fields {sorted(leaked)} would carry patient identifiers")
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_audit(path: Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
