"""Keep header values out of log lines, recorded reasons and API fields (issue 12 item 8).

A malformed attribute (a free-text PatientBirthDate, an unusual PatientName) reaches messages in
three ways: library warnings (pydicom logs *and* warns "Invalid value for VR DA: '…'"),
exception texts ("invalid literal for int() with base 10: '…'") and tracebacks. The node
therefore:

* records reasons built by :func:`error_reason`: the project's own exceptions keep their wording
  (they name attributes, not values) with quoted text removed; any other exception becomes its
  class name plus the attribute the caller was reading;
* installs :func:`install_log_redaction` once: pydicom's log records lose their quoted values,
  and pydicom's duplicate ``UserWarning`` copies are not printed;
* logs failures as one line with the code location (file:line) instead of a traceback.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
import warnings
from pathlib import Path

from inference.errors import RadVLMError

# a quoted value; a quoted two-letter VR name ('DA') is kept, it says what kind of value was wrong
_QUOTED = re.compile(r"""'(?![A-Z]{2}')[^'\n]*'|"[^"\n]*"|b'[^'\n]*'""")
_installed = threading.Lock()
_done = False


def redact(text: str) -> str:
    """``text`` with every quoted value replaced by '…'."""
    return _QUOTED.sub("'…'", text)


def code_location(exc: BaseException) -> str:
    """``file.py:line in function`` of the innermost frame (no values)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown location"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


def error_reason(exc: BaseException, attribute: str | None = None) -> str:
    """A reason fit for the job store, the audit log, ``/api/studies`` and log lines."""
    where = f" reading {attribute}" if attribute else ""
    if isinstance(exc, RadVLMError):
        return redact(" ".join(str(exc).split()))
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}{where}: {exc.strerror or 'I/O error'} (errno {exc.errno})"
    return f"{type(exc).__name__}{where} (the value is not shown: it may carry patient data)"


class _RedactValues(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep only the template
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info:
            record.msg += f" [{error_reason(record.exc_info[1]) if record.exc_info[1] else 'error'}]"
            record.exc_info, record.exc_text = None, None
        return True


def install_log_redaction() -> None:
    """Idempotent: redact pydicom/pynetdicom log records and silence pydicom's duplicate warnings."""
    global _done
    with _installed:
        if not _done:
            for name in ("pydicom", "highdicom", "py.warnings"):
                logging.getLogger(name).addFilter(_RedactValues())
        # the warning filters again on every call (an identical filter replaces itself): whoever
        # restored the filter list since (warnings.catch_warnings, pytest) gets them back
        # pydicom emits every validation message twice: as a log record (redacted above) and as a
        # UserWarning printed to stderr with the value; the warning copy adds nothing
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom(\..*)?$")
        # highdicom's person-name check quotes the name and is attributed to its caller's module
        warnings.filterwarnings("ignore", category=UserWarning, message=r"(?s)The string .* is unlikely to represent")  # (?s): names with line breaks too
        _done = True
