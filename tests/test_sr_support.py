"""Shared fixtures of the result-writer tests: a synthetic CR image with a bright rectangle and
StudyResults built directly from the pydantic types (no model). Also the UID/code-table tests."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.labels import LABELS
from inference.result import Box, ModelInfo, Region, SourceImage, StudyResult
from sr_writer import codes
from sr_writer.uids import derived_uid, fhir_id

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def make_cr(rows: int, columns: int, *, rect: tuple[int, int, int, int] | None = None,
            patient_id: str = "PAT-001", patient_name: str = "DOE^JANE",
            study_uid: str | None = None, monochrome1: bool = False) -> Dataset:
    """A valid single-frame CR chest image; ``rect`` = (col1, row1, col2, row2) exclusive end,
    pixels inside set to 4000 on a 200 background."""
    pixels = np.full((rows, columns), 200, dtype=np.uint16)
    if rect is not None:
        c1, r1, c2, r2 = rect
        pixels[r1:r2, c1:c2] = 4000
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "HOSP-A"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.StudyDate = "20250102"
    ds.StudyTime = "103000"
    ds.AccessionNumber = "ACC" + patient_id[-3:]
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "TEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    return ds


def make_result(source: Dataset, *, boxes: dict[str, list[Box]] | None = None,
                labels: dict[str, bool] | None = None,
                findings: str | None = "Heart size is enlarged. Small right pleural effusion.",
                phrase_boxes: dict[str, list[Box]] | None = None,
                version: str = "1.0.0") -> StudyResult:
    """A StudyResult for ``source`` built from the pydantic types."""
    regions = [Region(task="abnormality_grounding", query=label, label=label, boxes=tuple(bs))
               for label, bs in (boxes or {}).items()]
    regions += [Region(task="phrase_grounding", query=sentence, boxes=tuple(bs))
                for sentence, bs in (phrase_boxes or {}).items()]
    return StudyResult(
        created=datetime(2025, 1, 2, 11, 0, 0, tzinfo=timezone.utc),
        model=ModelInfo(model_id="radvlm-test", version=version, weights_sha256="ab" * 32),
        source=SourceImage(sop_instance_uid=source.SOPInstanceUID, sop_class_uid=source.SOPClassUID,
                           series_instance_uid=source.SeriesInstanceUID,
                           study_instance_uid=source.StudyInstanceUID,
                           rows=source.Rows, columns=source.Columns,
                           photometric_interpretation=source.PhotometricInterpretation),
        findings_text=findings,
        labels=labels if labels is not None else {l: l in ("cardiomegaly", "pleural effusion") for l in LABELS},
        regions=tuple(regions),
    )


def full_result(source: Dataset) -> StudyResult:
    """A result with label boxes (two boxes for one label), a phrase box and an anatomy box."""
    result = make_result(
        source,
        boxes={"cardiomegaly": [Box(x1=0.3, y1=0.4, x2=0.75, y2=0.8)],
               "pleural effusion": [Box(x1=0.05, y1=0.6, x2=0.35, y2=0.9),
                                    Box(x1=0.123, y1=0.456, x2=0.2, y2=0.5)]},
        phrase_boxes={"Small right pleural effusion.": [Box(x1=0.06, y1=0.61, x2=0.33, y2=0.88)]})
    anatomy = Region(task="anatomical_grounding", query="left lower lung zone",
                     boxes=(Box(x1=0.55, y1=0.55, x2=0.9, y2=0.85),))
    return result.model_copy(update={"regions": result.regions + (anatomy,)})


ADVERSARIAL_TEXTS: dict[str, str] = {
    "controls": "Heart\x00 size\x07 is\x1b[31m enlarged\x7f.\x85\x9b\x9f Small\x0b\x0c effusion",
    "surrogates": "Effusion \ud800 at the right \udfff base \ud83d",
    "html": "<script>alert('x')</script> <b>Cardiomegaly</b> &amp; </table>",
    "backslashes": "Opacity \\ right \\\\ lower zone C:\\temp",
    "emoji": "Pneumothorax \U0001fac1\U0001f44d\U0001f3fd \U0001f468\u200d\u2695\ufe0f right apex",
    "bidi": "left \u202eright\u202c lung \u2066x\u2069 \u2028next line",
    "noncharacters": "\ufffe\uffff\ufdd0 Lesion \U0010ffff",
    "newlines": "Line one.\r\nLine two.\rLine three.\n\n\n\nLine four.",
}
"""Model answers that are not valid DICOM text as they stand (what a random-weight model emits)."""
HUGE_ANSWER = "Patchy opacity in the right lower zone, likely atelectasis. " * 1700  # ~100 kB


def adversarial_result(source: Dataset, texts: dict[str, str] | None = None) -> StudyResult:
    """A result whose findings and every grounded phrase are adversarial model text (``texts``,
    default all of ADVERSARIAL_TEXTS, plus a ~100 kB answer), with one box per phrase and a label
    box, so that the read-back can be checked box by box."""
    texts = ADVERSARIAL_TEXTS if texts is None else texts
    answers = [*texts.values(), HUGE_ANSWER]
    boxes = [Box(x1=0.05 + 0.1 * i, y1=0.1, x2=0.1 + 0.1 * i, y2=0.3 + 0.05 * i)
             for i in range(len(answers))]
    return make_result(source, boxes={"cardiomegaly": [Box(x1=0.3, y1=0.4, x2=0.75, y2=0.8)]},
                       findings="\n".join(answers), phrase_boxes=dict(zip(answers, ([b] for b in boxes))))


# --- tests of the small modules ----------------------------------------------------------------

def test_derived_uid_is_deterministic_and_distinct() -> None:
    a = derived_uid("1.2.3.4", "1.0", "sr")
    assert a == derived_uid("1.2.3.4", "1.0", "sr")
    assert len(a) <= 64 and a.startswith("2.25.")
    others = {derived_uid("1.2.3.4", "1.0", p) for p in ("gsps", "sr-series", "tracking-0-0")}
    others |= {derived_uid("1.2.3.5", "1.0", "sr"), derived_uid("1.2.3.4", "1.1", "sr")}
    assert a not in others and len(others) == 5
    rooted = derived_uid("1.2.3.4", "1.0", "sr", root="1.2.826.0.1.3680043.10.999.")
    assert rooted.startswith("1.2.826.0.1.3680043.10.999.") and len(rooted) <= 64
    assert rooted == derived_uid("1.2.3.4", "1.0", "sr", root="1.2.826.0.1.3680043.10.999.")
    assert len(fhir_id("1.2.3.4", "1.0", "x")) <= 64
    with pytest.raises(ValueError):
        derived_uid("", "1.0", "sr")


def test_code_table_covers_labels_and_anatomy() -> None:
    assert set(codes.LABEL_CODES) == set(LABELS)
    finding_values = [c.finding.value for c in codes.LABEL_CODES.values()]
    assert len(set(finding_values)) == len(finding_values), "finding codes must be distinct (readback)"
    site = codes.anatomic_site_for_text("right costophrenic angle")
    assert site is not None and site.location == codes.LOWER_ZONE and site.laterality == codes.RIGHT
    assert codes.anatomic_site_for_text("cardiac silhouette").location == codes.HEART
    assert codes.anatomic_site_for_text("left upper zone").laterality == codes.LEFT
    assert codes.anatomic_site_for_text("bilateral lower lungs").laterality == codes.BILATERAL
    assert codes.anatomic_site_for_text("nothing here") is None
    assert codes.finding_for_label("support devices", "Endotracheal tube tip 4 cm above carina").value == "26412008"
    assert codes.finding_for_label("support devices", "").value == "111102"
