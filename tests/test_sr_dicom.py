"""SR and GSPS writers against real tools: dciodvfy (dicom3tools), dsr2html (dcmtk), highdicom
read-back, and pixel-exact box placement on synthetic images."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

import highdicom as hd
from pydicom.uid import generate_uid

from config.settings import SRSettings
from inference.result import Box
from sr_writer import codes
from sr_writer.common import box_polyline, evidence_dataset
from sr_writer import write_outputs
from sr_writer.errors import SourceMismatchError
from sr_writer.gsps import build_gsps
from sr_writer.readback import read_sr, read_sr_labels, read_sr_regions
from sr_writer.sr import (CLASSIFICATION_TRACKING_IDENTIFIER, algorithm_identification, build_sr,
                          device_observer_context)
from tests.test_sr_support import full_result, make_cr, make_result

SETTINGS = SRSettings()
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools missing")
needs_dsr2html = pytest.mark.skipif(shutil.which("dsr2html") is None, reason="dcmtk missing")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) lines that dciodvfy reports for ``path``."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return ([l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")])


def rg1_source() -> pydicom.Dataset:
    from pydicom.data import get_testdata_file
    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data RG1_UNCR.dcm not installed")
    return pydicom.dcmread(path)


def _write_both(tmp_path: Path, result, source) -> tuple[Path, Path]:
    out = write_outputs(result, source, SETTINGS, sr_path=tmp_path / "sr.dcm",
                        gsps_path=tmp_path / "pr.dcm")
    assert out.sr_path and out.gsps_path
    return out.sr_path, out.gsps_path


@needs_dciodvfy
@pytest.mark.parametrize("case", ["full", "empty", "real_rg1"])
def test_dciodvfy_reports_no_errors(tmp_path: Path, case: str) -> None:
    if case == "real_rg1":
        source = rg1_source()
        result = full_result(source)
    else:
        source = make_cr(600, 500, rect=(100, 200, 300, 400))
        result = full_result(source) if case == "full" else make_result(
            source, labels={}, findings=None)
    sr_path, pr_path = _write_both(tmp_path, result, source)
    for path in (sr_path, pr_path):
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        print(path.name, "warnings:", warnings)


@needs_dciodvfy
def test_dciodvfy_check_can_fail(tmp_path: Path) -> None:
    """Negative control: the parser above does see dciodvfy's errors."""
    source = make_cr(300, 200)
    sr = build_sr(full_result(source), source, SETTINGS)
    del sr.VerificationFlag
    del sr.ContentSequence[0].ConceptNameCodeSequence
    sr.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    errors, _ = dciodvfy(tmp_path / "broken.dcm")
    assert errors, "dciodvfy must flag a missing Type 1 attribute"


@needs_dsr2html
def test_dsr2html_renders(tmp_path: Path) -> None:
    source = make_cr(600, 500)
    sr_path = write_outputs(full_result(source), source, SETTINGS, sr_path=tmp_path / "sr.dcm").sr_path
    proc = subprocess.run(["dsr2html", "+Ra", str(sr_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    html = proc.stdout
    for needle in ("Comprehensive 3D SR", "UNVERIFIED", "Imaging Measurement Report",
                   "XR Chest Single view", "Cardiomegaly", "Polyline", "Heart size is enlarged",
                   "Tracking Unique Identifier", "Algorithm Version", "DOE"):
        assert needle in html, needle
    text = _html_text(html)
    # SEPARATE containers: each evaluation reads "<finding>: <value>", not a run of values
    assert re.search(r"Cardiomegaly: Present\b", text), text
    assert re.search(r"Pneumothorax: Absent\b", text) and re.search(r"Pleural effusion: Present\b", text)
    assert not re.search(r"\b(?:Absent|Present)\s+(?:Absent|Present)\b", text), "values run together"
    assert "Comment: Small right pleural effusion." in text


def test_round_trip_recovers_everything(tmp_path: Path) -> None:
    source = make_cr(1841, 1955)
    result = full_result(source)
    sr_path = write_outputs(result, source, SETTINGS, sr_path=tmp_path / "sr.dcm").sr_path
    back = read_sr(pydicom.dcmread(sr_path))
    assert back.patient_id == source.PatientID
    assert back.study_instance_uid == source.StudyInstanceUID
    assert back.referenced_sop_instance_uid == source.SOPInstanceUID
    assert back.findings_text == result.findings_text
    assert back.labels == result.labels
    assert (back.algorithm_name, back.algorithm_version) == ("radvlm-test", "1.0.0")
    expected = [(region, box) for region in result.regions for box in region.boxes]
    assert len(back.regions) == len(expected)
    half_x, half_y = 0.5 / source.Columns, 0.5 / source.Rows
    for got, (region, box) in zip(back.regions, expected):
        assert got.label == region.label
        assert got.text == region.query
        assert got.referenced_sop_instance_uid == source.SOPInstanceUID
        for g, e, tol in zip(got.box.as_list(), box.as_list(), (half_x, half_y, half_x, half_y)):
            assert abs(g - e) <= tol
        pts = got.polyline
        assert pts.shape == (5, 2) and np.array_equal(pts[0], pts[-1]), "closed 5-point POLYLINE"
    uids = [r.tracking_uid for r in back.regions]
    assert len(set(uids)) == len(uids), "each group has its own tracking UID"
    assert back.regions[-1].finding_sites == ("Lower zone of lung",)


def test_sr_identity_series_and_determinism() -> None:
    source = make_cr(400, 300)
    result = full_result(source)
    a, b = build_sr(result, source, SETTINGS), build_sr(result, source, SETTINGS)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SeriesInstanceUID != source.SeriesInstanceUID
    assert (a.PatientID, a.PatientName, a.StudyInstanceUID, a.AccessionNumber) == (
        source.PatientID, source.PatientName, source.StudyInstanceUID, source.AccessionNumber)
    assert a.VerificationFlag == "UNVERIFIED" and a.PreliminaryFlag == "PRELIMINARY"
    assert "UNVERIFIED AI RESULT" in a.SeriesDescription
    assert any(item.get("ManufacturerModelName") == "radvlm-test"
               for item in a.ContributingEquipmentSequence)
    other = build_sr(make_result(source, version="2.0.0"), source, SETTINGS)
    assert other.SOPInstanceUID != a.SOPInstanceUID
    gsps = build_gsps(result, source, SETTINGS)
    assert gsps.SOPInstanceUID not in (a.SOPInstanceUID, a.SeriesInstanceUID)
    assert [r.tracking_uid for r in read_sr_regions(a)] == [
        str(o.TrackingUID) for o in gsps.GraphicAnnotationSequence[0].GraphicObjectSequence]


def test_source_mismatch_is_refused() -> None:
    source = make_cr(400, 300)
    other = make_cr(400, 300, patient_id="PAT-999")
    with pytest.raises(SourceMismatchError):
        build_sr(full_result(source), other, SETTINGS)
    with pytest.raises(SourceMismatchError):
        build_gsps(full_result(source), make_cr(300, 400), SETTINGS)


def _inside_pixels(polyline: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Mask of pixels whose centre (c + 0.5, r + 0.5) lies inside the closed polygon
    (even-odd ray casting, independent of the writer's rectangle assumption)."""
    cc, rr = np.meshgrid(np.arange(columns) + 0.5, np.arange(rows) + 0.5)
    inside = np.zeros((rows, columns), dtype=bool)
    for (xa, ya), (xb, yb) in zip(polyline[:-1], polyline[1:]):
        crosses = (ya > rr) != (yb > rr)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = xa + (rr - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (cc < x_at)
    return inside


@pytest.mark.parametrize("rows, columns, rect", [
    (300, 200, (37, 121, 90, 260)),     # portrait
    (200, 300, (210, 15, 283, 77)),     # landscape
])
def test_polyline_encloses_exactly_the_bright_rectangle(rows: int, columns: int,
                                                        rect: tuple[int, int, int, int]) -> None:
    source = make_cr(rows, columns, rect=rect)
    c1, r1, c2, r2 = rect
    box = Box(x1=c1 / columns, y1=r1 / rows, x2=c2 / columns, y2=r2 / rows)
    result = make_result(source, boxes={"lung lesion": [box]})
    bright = np.frombuffer(source.PixelData, dtype=np.uint16).reshape(rows, columns) > 1000
    (region,) = read_sr_regions(build_sr(result, source, SETTINGS))
    assert np.array_equal(_inside_pixels(region.polyline, rows, columns), bright)
    gsps = build_gsps(result, source, SETTINGS)
    (graphic,) = gsps.GraphicAnnotationSequence[0].GraphicObjectSequence
    assert graphic.GraphicAnnotationUnits == "PIXEL" and graphic.GraphicType == "POLYLINE"
    points = np.asarray(graphic.GraphicData, dtype=float).reshape(-1, 2)
    assert np.array_equal(_inside_pixels(points, rows, columns), bright)


def test_non_latin_names_and_model_text_survive_the_round_trip(tmp_path: Path) -> None:
    source = make_cr(64, 48, patient_name="Müller^Jürgen")
    source.SpecificCharacterSet = "ISO_IR 100"
    findings = "Opacité basale droite ≥ 2 cm → à contrôler. 右下肺野に浸潤影。"
    result = make_result(source, findings=findings)
    sr_path = write_outputs(result, source, SETTINGS, sr_path=tmp_path / "sr.dcm").sr_path
    back = pydicom.dcmread(sr_path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "Müller^Jürgen"
    assert read_sr(back).findings_text == findings
    assert source.SpecificCharacterSet == "ISO_IR 100", "the source dataset is not modified"


# --- structure that viewers load (issue 11) ---------------------------------------------------

def _html_text(html: str) -> str:
    """dsr2html output as plain text (tags dropped, entities decoded, blanks folded)."""
    import html as html_module
    return re.sub(r"\s+", " ", html_module.unescape(re.sub(r"<[^>]+>", " ", html)))


def _concept(item: pydicom.Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue


def _children(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    return list(getattr(item, "ContentSequence", []))


def _walk(item: pydicom.Dataset):
    for child in _children(item):
        yield child
        yield from _walk(child)


def _container(parent: pydicom.Dataset, code) -> pydicom.Dataset:
    [found] = [c for c in _children(parent) if c.ValueType == "CONTAINER"
               and _concept(c) == (code.scheme_designator, code.value)]
    return found


def test_sr_structure_that_ohif_loads() -> None:
    source = make_cr(600, 500)
    result = full_result(source)
    sr = build_sr(result, source, SETTINGS)
    containers = [sr] + [item for item in _walk(sr) if item.ValueType == "CONTAINER"]
    assert all(c.ContinuityOfContent == "SEPARATE" for c in containers)

    groups = _children(_container(sr, codes.IMAGING_MEASUREMENTS))
    expected = [(region, box) for region in result.regions for box in region.boxes]
    assert len(groups) == len(expected) == 5
    for group, (region, _) in zip(groups, expected):
        assert _concept(group) == ("DCM", "125007")
        kinds = {item.ValueType for item in _children(group)}
        assert kinds & {"SCOORD", "NUM"}, "every measurement group has coordinates (OHIF)"
        comments = [str(i.TextValue) for i in _children(group)
                    if i.ValueType == "TEXT" and _concept(i) == ("DCM", "121106")]
        assert comments == [region.query], "the phrase is TEXT Comment (DCM 121106)"
    assert not [i for i in _walk(sr) if i.ValueType == "TEXT" and _concept(i) == ("DCM", "121071")], \
        "no TEXT Finding (TID 1410 defines Finding only as CODE)"

    qualitative = _container(sr, codes.QUALITATIVE_EVALUATIONS)
    evaluations = {_concept(i): i.ConceptCodeSequence[0].CodeValue
                   for i in _children(qualitative) if i.ValueType == "CODE"}
    assert evaluations == {
        (codes.LABEL_CODES[label].finding.scheme_designator, codes.LABEL_CODES[label].finding.value):
            (codes.PRESENT if present else codes.ABSENT).value for label, present in result.labels.items()}
    texts = {(_concept(i), str(i.TextValue)) for i in _children(qualitative) if i.ValueType == "TEXT"}
    assert ((codes.FINDINGS.scheme_designator, codes.FINDINGS.value), result.findings_text) in texts
    assert (("DCM", "121106"), result.notice) in texts


def test_long_phrase_tracking_identifier_is_cut_at_a_word() -> None:
    source = make_cr(300, 200)
    phrase = ("Ill-defined opacities projecting over the right lower zone adjacent to the "
              "cardiophrenic angle, possibly atelectasis")  # 64 characters end inside "over"
    result = make_result(source, phrase_boxes={phrase: [Box(x1=0.5, y1=0.5, x2=0.9, y2=0.9)]})
    [region] = read_sr_regions(build_sr(result, source, SETTINGS))
    full = f"RadVLM phrase_grounding 1.1: {phrase}"
    assert len(region.tracking_identifier) <= 64 and full.startswith(region.tracking_identifier)
    assert full[len(region.tracking_identifier)] == " ", region.tracking_identifier
    assert region.text == phrase


def _legacy_sr(result, source: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    """An SR in the layout written before issue 11 (SRs already delivered): the classification as
    a TID 1501 group under Imaging Measurements, the phrase as TEXT Finding (DCM 121071)."""
    evidence = evidence_dataset(source)
    classification = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=CLASSIFICATION_TRACKING_IDENTIFIER),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            codes.finding_for_label(label), codes.PRESENT if present else codes.ABSENT)
            for label, present in result.labels.items()],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence)])
    region = result.regions[0]
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="legacy 1.1"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=box_polyline(region.boxes[0], source.Columns, source.Rows),
            source_image=hd.sr.SourceImageForRegion.from_source_image(evidence)),
        algorithm_id=algorithm_identification(result, SETTINGS))
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        codes.FINDING, region.query, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    report = hd.sr.MeasurementReport(observation_context=device_observer_context(result, SETTINGS),
                                     procedure_reported=codes.CHEST_XR_SINGLE_VIEW,
                                     imaging_measurements=[classification, group])
    return hd.sr.Comprehensive3DSR(evidence=[evidence], content=report[0],
                                   series_instance_uid=generate_uid(), series_number=99,
                                   sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test")


def test_readback_still_reads_srs_written_before_issue_11() -> None:
    source = make_cr(400, 300)
    result = make_result(source, phrase_boxes={"Small right pleural effusion.": [
        Box(x1=0.06, y1=0.61, x2=0.33, y2=0.88)]})
    legacy = _legacy_sr(result, source)
    assert read_sr_labels(legacy) == result.labels
    [region] = read_sr_regions(legacy)
    assert region.text == "Small right pleural effusion."
    assert region.box.as_list() == pytest.approx([0.06, 0.61, 0.33, 0.88], abs=1e-6)
    assert read_sr(build_sr(result, source, SETTINGS)).labels == read_sr(legacy).labels == result.labels


# --- PixelMed DicomSRValidator: the TID templates, beyond dciodvfy ---------------------------

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
needs_pixelmed = pytest.mark.skipif(not PIXELMED_JAR.is_file() or shutil.which("java") is None,
                                    reason="pixelmed-apps (Debian) or Java missing")
# docs/codes.md "PixelMed DicomSRValidator": what it still reports, and why each is deliberate
PIXELMED_DELIBERATE_ERRORS = (
    'Code (36554-4,LN,"XR Chest Single view") not found in context group 100',
)
PIXELMED_DELIBERATE_WARNINGS = (
    'TEXT (121106,DCM,"Comment"): Content Item not in template',
    'CODE (130400,DCM,"Geometric purpose of region"): Content Item not in template',
    'TEXT (122405,DCM,"Algorithm Manufacturer"): Content Item not in template',
    'CODE (363698007,SCT,"Finding Site"): Content Item not in template',
    'Code (51440002,SCT,"Right and left") has different code meaning ("Right and left") than code '
    'meaning in context group 244 ("Bilateral")',
)


def pixelmed(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of PixelMed's DicomSRValidator. Debian's /usr/bin/DicomSRValidator dies
    under Java 17's XPath limits (JAXP0801003), so the class is run with those limits lifted."""
    proc = subprocess.run(
        ["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
         "-Djdk.xml.xpathTotalOpLimit=0", "-cp", str(PIXELMED_JAR),
         "com.pixelmed.validate.DicomSRValidator", str(path)],
        capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert "Found Root Template TID_1500" in output and "IOD validation complete" in output, output[-2000:]
    lines = output.splitlines()
    return [l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")]


@needs_pixelmed
@pytest.mark.parametrize("case", ["full", "empty", "adversarial"])
def test_pixelmed_sr_validator_finds_no_errors(tmp_path: Path, case: str) -> None:
    from tests.test_sr_support import adversarial_result

    source = make_cr(600, 500)
    result = {"full": full_result, "adversarial": adversarial_result,
              "empty": lambda s: make_result(s, labels={}, findings=None)}[case](source)
    path = write_outputs(result, source, SETTINGS, sr_path=tmp_path / "sr.dcm").sr_path
    errors, warnings = pixelmed(path)
    assert [e for e in errors if not e.endswith(PIXELMED_DELIBERATE_ERRORS)] == []
    assert [w for w in warnings if not w.endswith(PIXELMED_DELIBERATE_WARNINGS)] == []
    print(case, f"PixelMed: {len(errors)} errors, {len(warnings)} warnings (all documented)")


@needs_pixelmed
def test_pixelmed_check_can_fail(tmp_path: Path) -> None:
    """Negative control: an image region that is a POINT with five points is an error."""
    source = make_cr(300, 200)
    sr = build_sr(full_result(source), source, SETTINGS)
    region = next(i for i in _walk(sr) if i.ValueType == "SCOORD")
    region.GraphicType = "POINT"
    sr.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    errors, _ = pixelmed(tmp_path / "broken.dcm")
    assert [e for e in errors if not e.endswith(PIXELMED_DELIBERATE_ERRORS)], errors
