"""Garbage in a numeric window attribute (WindowCenter / WindowWidth that is no number, NaN, not
finite, zero or mismatched) made highdicom's GSPS builder raise, so the whole study failed and no
SR was written. The GSPS is optional: it is skipped with a reason that names the attribute (never
its value), and the SR and FHIR bundle are still written and delivered."""

from __future__ import annotations

import json
import logging

import pytest
from pydicom import dcmread

from config.settings import SRSettings
from dicom_node.service import Node
from sr_writer import write_outputs
from tests.conftest_node import wait_for
from tests.dicom_samples import DEFAULT_PATIENT_ID
from tests.reliability.harness import node_settings, send, with_raw_value
from tests.test_sr_support import Box, full_result, make_cr, make_result

SETTINGS = SRSettings(fhir_patient_identifier_system="urn:oid:1.2.3")


def _source(keyword: str | None = None, raw: bytes | None = None):
    source = make_cr(64, 48)
    source.WindowCenter, source.WindowWidth = 2048, 4096
    if keyword is None:
        return source
    del source[keyword]
    return with_raw_value(source, keyword, "DS", raw)


@pytest.mark.parametrize("keyword, raw", [
    ("WindowCenter", b"Zq9"), ("WindowWidth", b"Zq9"), ("WindowWidth", b"NaN"), ("WindowWidth", b"1e400"),
    ("WindowWidth", b"0"), ("WindowWidth", b"-5"), ("WindowCenter", b"1\\2"),
])
def test_garbage_window_skips_the_gsps_and_still_writes_sr_and_fhir(tmp_path, caplog, keyword, raw):
    source = _source(keyword, raw)
    (tmp_path / "gsps.dcm").write_bytes(b"stale gsps of an earlier run")
    with caplog.at_level(logging.INFO):
        written = write_outputs(full_result(source), source, SETTINGS, sr_path=tmp_path / "sr.dcm",
                                gsps_path=tmp_path / "gsps.dcm", fhir_path=tmp_path / "bundle.json")
    assert written.sr_path is not None and dcmread(written.sr_path).StudyInstanceUID == source.StudyInstanceUID
    assert written.fhir_path is not None and json.loads(written.fhir_path.read_text())["resourceType"] == "Bundle"
    assert written.gsps_path is None and not (tmp_path / "gsps.dcm").exists()
    reason = written.gsps_skipped_reason
    assert reason is not None and keyword in reason and raw.decode() not in reason
    if len(raw) > 2:  # short values ("0") occur in UIDs
        assert not [r for r in caplog.records if raw.decode() in r.getMessage()]


def test_a_usable_window_still_gets_its_gsps(tmp_path):
    source = _source()
    written = write_outputs(full_result(source), source, SETTINGS, sr_path=tmp_path / "sr.dcm",
                            gsps_path=tmp_path / "gsps.dcm", fhir_path=tmp_path / "bundle.json")
    assert written.gsps_path is not None and written.gsps_skipped_reason is None
    gsps = dcmread(written.gsps_path)
    assert float(gsps.SoftcopyVOILUTSequence[0].WindowWidth) == 4096


def test_node_delivers_sr_and_fhir_of_a_study_with_a_garbage_window(tmp_path, tiny_model_dir, caplog):
    settings = node_settings(tmp_path, tiny_model_dir)
    settings = settings.model_copy(update={"sr": settings.sr.model_copy(
        update={"gsps_enabled": True, "fhir_patient_identifier_system": "urn:oid:1.2.3"})})
    source = _source("WindowWidth", b"Zq9")

    def analyze(image):  # a result with boxes, so that a GSPS is asked for
        return make_result(source, boxes={"cardiomegaly": [Box(x1=0.3, y1=0.4, x2=0.75, y2=0.8)]})

    node = Node(settings, analyze=analyze).start()
    try:
        with caplog.at_level(logging.INFO):
            assert send(node.scp_port, [source])[0].status == 0
            study = str(source.StudyInstanceUID)
            wait_for(lambda: node.jobs.study(study) is not None
                     and node.jobs.study(study)["state"] in ("delivered", "failed", "skipped"), 60, 0.1, "terminal")
        assert node.jobs.study(study)["state"] == "delivered", node.jobs.study(study)["reason"]
    finally:
        node.stop(grace_seconds=5)
    out = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert any(name.endswith(".json") for name in out), out  # the FHIR bundle
    sr_files = [p for p in (tmp_path / "out").rglob("*.dcm") if dcmread(p).Modality == "SR"]
    assert len(sr_files) == 1
    assert not [p for p in (tmp_path / "out").rglob("*.dcm") if dcmread(p).Modality == "PR"]
    audit = [json.loads(line) for line in (settings.node.data_dir / "audit.jsonl").read_text().splitlines()]
    skipped = [e for e in audit if e["event"] == "gsps_skipped"]
    assert len(skipped) == 1 and "WindowWidth" in skipped[0]["reason"] and "Zq9" not in skipped[0]["reason"]
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Zq9" in m or DEFAULT_PATIENT_ID in m]
