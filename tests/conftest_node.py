"""Helpers for the node tests (imported by tests/test_node_*.py; not a pytest conftest)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package listed in scripts/apt-packages.txt)")
    return path


def storescu(port: int, files: Sequence[Path], *, called: str = "RADVLM", calling: str = "STORESCU",
             options: Sequence[str] = (), timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk storescu (verbose, so statuses appear in the output)."""
    cmd = [need_tool("storescu"), "-v", "-aet", calling, "-aec", called, *options, "127.0.0.1", str(port),
           *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, *, called: str = "RADVLM", calling: str = "ECHOSCU",
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = [need_tool("echoscu"), "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.1,
             what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def dcmtk_convert(tool: str, src: Path, dst: Path, *options: str) -> Path:
    """Re-encode with a dcmtk codec tool (dcmcjpls, dcmcrle, dcmcjpeg)."""
    subprocess.run([need_tool(tool), *options, str(src), str(dst)], check=True, capture_output=True)
    return dst
