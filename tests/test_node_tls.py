"""DICOM TLS on the SCP with dcmtk echoscu/storescu: verified server certificate, client
certificate required, and a client without one refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest_node import need_tool, storescu
from tests.dicom_samples import make_cr_dataset, write
from tests.test_node_scp import Scp


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([need_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, cn in (("server", "127.0.0.1"), ("client", "PACS1")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    return d


def test_tls_with_client_certificates(tmp_path, pki):
    node = Scp(tmp_path / "data", tls={"enabled": True, "certificate": pki / "server.pem",
                                       "private_key": pki / "server.key", "ca_certificates": pki / "ca.pem",
                                       "require_client_certificate": True})
    try:
        ds = make_cr_dataset()
        ok = storescu(node.port, [write(ds, tmp_path / "a.dcm")],
                      options=["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")])
        assert "(Success)" in ok.stdout + ok.stderr, ok.stdout + ok.stderr
        assert node.jobs.study(ds.StudyInstanceUID)["state"] == "received"
        anonymous = subprocess.run([need_tool("echoscu"), "-aec", "RADVLM", "+tla", "+cf", str(pki / "ca.pem"),
                                    "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=30)
        assert anonymous.returncode != 0
        plain = subprocess.run([need_tool("echoscu"), "-aec", "RADVLM", "127.0.0.1", str(node.port)],
                               capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0
    finally:
        node.close()
