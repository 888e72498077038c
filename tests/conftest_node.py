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


ROUTING_LUA = Path(__file__).resolve().parent.parent / "docs" / "orthanc-routing.lua"


class Orthanc:
    """A real Orthanc (Debian package) on loopback ports with its own config and storage in a temp dir."""

    def __init__(self, root: Path, *, node_port: int | None = None, node_aet: str = "RADVLM",
                 lua: str | None = None) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = "ORTHANC"
        self.node_port, self.node_aet, self.lua = node_port, node_aet, lua
        root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        import json

        config = {
            "Name": "radvlm-test", "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpBindAddress": "127.0.0.1",
            "DicomModalities": {}, "StableAge": 1, "DicomScuTimeout": 10, "ConcurrentJobs": 1,
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        if self.node_port is not None:
            config["DicomModalities"] = {"radvlm": [self.node_aet, "127.0.0.1", self.node_port]}
        if self.lua is not None:
            (self.root / "routing.lua").write_text(self.lua)
            config["LuaScripts"] = [str(self.root / "routing.lua")]
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self) -> "Orthanc":
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(exe).exists():
            pytest.skip("Orthanc not installed (Debian package 'orthanc')")
        config = self._write_config()
        self.log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen([exe, str(config)], stdout=self.log, stderr=self.log)
        wait_for(self._up, 60, 0.2, "Orthanc to start")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def instances_of_study(self, study_uid: str) -> list[dict]:
        found = self.get_post("/tools/lookup", study_uid)
        studies = [f["ID"] for f in found if f["Type"] == "Study"]
        if not studies:
            return []
        return self.get(f"/studies/{studies[0]}/instances")

    def get_post(self, path: str, body: str):
        import json
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body.encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
