"""The one durable-write helper of the project, with a fault-injection seam for tests.

Protocol: write a temp file in the target's folder (or a given temp folder on the same file
system) → fsync(file) → rename (or link, when an existing file must never be replaced) to the final
name → fsync(folder). A crash at any point leaves either no final file (or the old one) or the
complete new one; never a partial file under the final name.

Every step passes a checkpoint (``write``, ``fsync``, ``rename``, ``fsync-dir``). Tests use
:func:`inject` to make a step fail the way a disk does (``errno.ENOSPC``, ``errno.EIO``) or to stop
there as if the process had died (``crash=True``: :class:`SimulatedCrash`, temp file left in place
like a real crash), and :func:`observe` to record the steps in order. Outside tests nothing is
registered and a checkpoint costs one list check.

Used by the spool, results (``sr_writer``), the folder destination, the installation key and the
training caches; it lives in ``inference`` so every package may import it (design §2).
"""

from __future__ import annotations

import errno as errno_module
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STEPS = ("write", "fsync", "rename", "fsync-dir")


class SimulatedCrash(BaseException):
    """Raised by an injected crash point: like ``kill -9`` at that step (not an ``Exception``,
    so ordinary error handlers do not swallow it)."""


@dataclass
class _Fault:
    step: str
    errno: int | None
    match: str
    times: int | None
    crash: bool
    hits: int = 0


@dataclass
class _Registry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    faults: list[_Fault] = field(default_factory=list)
    observers: list[list[tuple[str, str]]] = field(default_factory=list)


_registry = _Registry()


def checkpoint(step: str, path: str | os.PathLike) -> None:
    """Called before each step of a durable write; raises an injected fault when one matches."""
    if not _registry.faults and not _registry.observers:
        return
    target = str(path)
    with _registry.lock:
        for seen in _registry.observers:
            seen.append((step, target))
        for fault in _registry.faults:
            if fault.step != step or fault.match not in target:
                continue
            if fault.times is not None and fault.hits >= fault.times:
                continue
            fault.hits += 1
            if fault.crash:
                raise SimulatedCrash(f"simulated crash before {step} of {target}")
            code = fault.errno or errno_module.EIO
            raise OSError(code, f"{os.strerror(code)} (injected)", target)


@contextmanager
def inject(step: str, errno: int | None = errno_module.ENOSPC, *, match: str = "", times: int | None = None,
           crash: bool = False) -> Iterator[_Fault]:
    """Make ``step`` of every durable write whose path contains ``match`` fail with ``errno``
    (or stop with :class:`SimulatedCrash`), at most ``times`` times, while the block runs."""
    if step not in STEPS:
        raise ValueError(f"unknown durable-write step {step!r}; one of {STEPS}")
    fault = _Fault(step, errno, match, times, crash)
    with _registry.lock:
        _registry.faults.append(fault)
    try:
        yield fault
    finally:
        with _registry.lock:
            _registry.faults.remove(fault)


@contextmanager
def observe() -> Iterator[list[tuple[str, str]]]:
    """Record ``(step, path)`` of every durable-write step while the block runs."""
    seen: list[tuple[str, str]] = []
    with _registry.lock:
        _registry.observers.append(seen)
    try:
        yield seen
    finally:
        with _registry.lock:
            _registry.observers.remove(seen)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that a rename or a new entry in it survives a power loss."""
    checkpoint("fsync-dir", path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_temp(folder: Path, content: bytes | Callable[[Path], object], *, mode: int = 0o600,
               name: str = "") -> Path:
    """Write ``content`` (bytes, or ``writer(temp_path)``) to a new temp file in ``folder`` and
    fsync it. The caller places it with :func:`place`; on any error the temp file is removed."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, raw = tempfile.mkstemp(prefix=f".{name}." if name else ".", suffix=".part", dir=folder)
    tmp = Path(raw)
    try:
        os.fchmod(fd, mode)
        checkpoint("write", tmp)
        if callable(content):
            os.close(fd)
            fd = -1
            content(tmp)
            fd = os.open(tmp, os.O_RDWR)
        else:
            _write_all(fd, content)
        checkpoint("fsync", tmp)
        os.fsync(fd)
    except SimulatedCrash:
        if fd >= 0:
            os.close(fd)
        raise  # a crash leaves its temp file, like a real one (start-up sweeps remove them)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def place(tmp: Path, final: Path, *, replace: bool = True, sync_parent_of_folder: bool = False) -> bool:
    """Move a written temp file to its final name and fsync the folder.

    ``replace=False`` never replaces an existing file (link + unlink: atomic no-replace); then
    False is returned and the temp file removed when ``final`` exists. ``sync_parent_of_folder``
    also fsyncs the folder above (when ``final``'s folder was just created)."""
    try:
        checkpoint("rename", final)
        if replace:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError:
                tmp.unlink(missing_ok=True)
                return False
            tmp.unlink()
    except SimulatedCrash:
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    if sync_parent_of_folder:
        fsync_dir(final.parent.parent)
    return True


def durable_write(path: str | os.PathLike, content: bytes | Callable[[Path], object], *, mode: int = 0o600,
                  temp_dir: Path | None = None, replace: bool = True) -> Path:
    """Write ``content`` (bytes, or ``writer(temp_path)`` that writes the file) durably to ``path``.

    Files are created with ``mode`` (default owner-only: results are patient data). With
    ``replace=False`` an existing file is kept and :class:`FileExistsError` raised."""
    path = Path(path)
    new_folder = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(temp_dir or path.parent, content, mode=mode, name=path.name)
    if not place(tmp, path, replace=replace, sync_parent_of_folder=new_folder):
        raise FileExistsError(errno_module.EEXIST, "file exists; not replaced", str(path))
    return path


__all__ = ["STEPS", "SimulatedCrash", "checkpoint", "durable_write", "fsync_dir", "inject", "observe", "place",
           "write_temp"]
