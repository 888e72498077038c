"""Patient safety: results of two patients written concurrently never cross identifiers."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

from config.settings import SRSettings
from sr_writer import write_outputs
from sr_writer.readback import read_sr
from tests.test_sr_support import full_result, make_cr

SETTINGS = SRSettings()


def test_two_patients_written_concurrently_never_cross(tmp_path: Path) -> None:
    sources = {
        "A": make_cr(500, 400, patient_id="PAT-AAA", patient_name="ALPHA^ANN"),
        "B": make_cr(400, 500, patient_id="PAT-BBB", patient_name="BRAVO^BOB"),
    }
    results = {k: full_result(s) for k, s in sources.items()}

    def job(key: str, n: int):
        out = tmp_path / f"{key}{n}"
        return key, write_outputs(results[key], sources[key], SETTINGS, sr_path=out / "sr.dcm",
                                  gsps_path=out / "pr.dcm", fhir_path=out / "b.json")

    with ThreadPoolExecutor(max_workers=8) as pool:
        written = list(pool.map(lambda a: job(*a), [(k, n) for n in range(6) for k in "AB"]))
    for key, out in written:
        src = sources[key]
        sr = pydicom.dcmread(out.sr_path)
        contents = read_sr(sr)
        assert (contents.patient_id, str(sr.PatientName)) == (src.PatientID, str(src.PatientName))
        assert contents.study_instance_uid == src.StudyInstanceUID
        assert contents.referenced_sop_instance_uid == src.SOPInstanceUID
        assert {r.referenced_sop_instance_uid for r in contents.regions} == {src.SOPInstanceUID}
        pr = pydicom.dcmread(out.gsps_path)
        assert pr.PatientID == src.PatientID and pr.StudyInstanceUID == src.StudyInstanceUID
        assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID \
            == src.SOPInstanceUID
        bundle = json.loads(out.fhir_path.read_text())
        other = sources["B" if key == "A" else "A"]
        text = json.dumps(bundle)
        assert src.PatientID in text and other.PatientID not in text
        assert other.StudyInstanceUID not in text and other.SOPInstanceUID not in text
        assert str(other.PatientName).split("^")[0] not in text
