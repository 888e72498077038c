"""Model text can never corrupt an output (issue 11, build item 3): ``sr_writer.text`` itself, and
SR / GSPS written from adversarial and random model text checked with the real validators
(dciodvfy, dcmtk dcmpschk) and read back through highdicom."""

from __future__ import annotations

import json
import shutil
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from config.settings import SRSettings
from inference.result import Box
from sr_writer import write_outputs
from sr_writer.readback import read_sr
from sr_writer.text import (ALTERED_NOTICE, FHIR_DEFAULT_MAX_CHARACTERS, TRUNCATION_MARK,
                            VR_MAX_CHARACTERS, CleanText, cut_at_word, dicom_text, fhir_string)
from tests.test_sr_dicom import dciodvfy, needs_dciodvfy
from tests.test_sr_support import ADVERSARIAL_TEXTS, HUGE_ANSWER, adversarial_result, make_cr, make_result

SETTINGS = SRSettings()
needs_dcmpschk = pytest.mark.skipif(shutil.which("dcmpschk") is None, reason="dcmtk missing")
TEXT_VRS = ("UT", "LT", "ST")
LINE_VRS = ("LO", "SH", "UC", "PN")


def dcmpschk(path: Path) -> tuple[bool, str]:
    """(passed, output) of dcmtk's presentation state checker (its exit status is 0 either way)."""
    proc = subprocess.run(["dcmpschk", str(path)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    return "Test passed" in output and "\nE:" not in "\n" + output, output


def _forbidden(text: str, vr: str) -> list[str]:
    """Characters ``text`` must not hold in ``vr`` (UTF-8, ISO_IR 192)."""
    allowed = "\n" if vr in TEXT_VRS else ""
    bad = [c for c in text if (unicodedata.category(c) == "Cc" and c not in allowed)
           or 0xD800 <= ord(c) <= 0xDFFF or c in "\u202e\u2028\u2029"]
    if vr in LINE_VRS:
        bad += [c for c in text if c == "\\"]
    return bad


# --- sr_writer.text ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ADVERSARIAL_TEXTS))
@pytest.mark.parametrize("vr", TEXT_VRS + LINE_VRS)
def test_adversarial_text_is_made_valid_and_flagged(name: str, vr: str) -> None:
    original = ADVERSARIAL_TEXTS[name]
    clean = dicom_text(original, vr)
    assert _forbidden(clean.text, vr) == []
    assert len(clean.text) <= VR_MAX_CHARACTERS[vr]
    clean.text.encode("utf-8")  # no lone surrogates left
    too_long = len(" ".join(original.split())) > VR_MAX_CHARACTERS[vr]
    changed = (name in ("controls", "surrogates", "bidi", "noncharacters") or too_long
               or (name == "backslashes" and vr in LINE_VRS))
    assert clean.altered is changed, clean
    assert dicom_text(clean.text, vr) == CleanText(clean.text, False), "cleaning is idempotent"


def test_readable_text_is_kept() -> None:
    assert dicom_text("Heart\x00 size\x07 is enlarged.", "UT").text == "Heart size is enlarged."
    assert dicom_text("<script>alert(1)</script>", "UT") == CleanText("<script>alert(1)</script>", False)
    assert dicom_text("a \\ b", "UT").text == "a \\ b" and dicom_text("a \\ b", "LO").text == "a / b"
    assert dicom_text("Ödem 👍 右", "LO") == CleanText("Ödem 👍 右", False)
    assert dicom_text("x\ud800y", "UT").text == "x\ufffdy"


def test_layout_whitespace_alone_is_not_an_alteration() -> None:
    for value in ("a  b", " a b ", "a\r\nb", "line\n\n\n\nnext", "a\tb"):
        assert dicom_text(value, "UT").altered is False, repr(value)
        assert fhir_string(value).altered is False, repr(value)
    assert dicom_text("a\x07b", "UT").altered and fhir_string("a\x07b").altered


def test_long_text_is_cut_at_a_word_with_a_marker() -> None:
    clean = dicom_text(HUGE_ANSWER, "UT")
    assert clean.altered and len(clean.text) <= VR_MAX_CHARACTERS["UT"]
    head = clean.text[:-len(TRUNCATION_MARK)]
    assert clean.text.endswith(TRUNCATION_MARK) and HUGE_ANSWER.startswith(head)
    assert HUGE_ANSWER[len(head)] == " ", "cut at a word boundary"
    assert cut_at_word("Patchy opacity in the right lower zone", 20) == "Patchy opacity in"
    assert len(fhir_string(HUGE_ANSWER).text) <= FHIR_DEFAULT_MAX_CHARACTERS


@settings(max_examples=300, deadline=None)
@given(value=st.text(alphabet=st.characters(codec=None), max_size=300),
       vr=st.sampled_from(TEXT_VRS + LINE_VRS))
def test_any_unicode_becomes_valid_text(value: str, vr: str) -> None:
    clean = dicom_text(value, vr, max_characters=120)
    assert _forbidden(clean.text, vr) == []
    assert len(clean.text) <= 120
    clean.text.encode("utf-8")
    assert clean.text == clean.text.strip()
    assert dicom_text(clean.text, vr, max_characters=120).altered is False
    if not _forbidden(value, vr) and len(value) <= 100 and not any(
            unicodedata.category(c) == "Cc" or c in "\ufffe\uffff" or 0xFDD0 <= ord(c) <= 0xFDEF
            or c in "\u202a\u202b\u202c\u202d\u2066\u2067\u2068" for c in value):
        assert clean.altered is False, "valid text is not reported as altered"
    fhir = fhir_string(value)
    assert all(c in "\n\t" or unicodedata.category(c) != "Cc" for c in fhir.text)
    fhir.text.encode("utf-8")


# --- SR and GSPS written from adversarial model text -----------------------------------------

def _boxes(result) -> list[Box]:
    return [box for region in result.regions for box in region.boxes]


def _assert_same_boxes(sr: pydicom.Dataset, result, source: pydicom.Dataset) -> None:
    back = read_sr(sr)
    expected = _boxes(result)
    assert len(back.regions) == len(expected)
    half_x, half_y = 0.5 / source.Columns, 0.5 / source.Rows
    for got, box in zip(back.regions, expected):
        assert np.allclose(got.box.as_list(), box.as_list(), atol=max(half_x, half_y))


@needs_dciodvfy
@needs_dcmpschk
def test_sr_and_gsps_from_adversarial_text_are_valid(tmp_path: Path) -> None:
    source = make_cr(600, 500, patient_name="Müller^Jürgen")
    result = adversarial_result(source)
    out = write_outputs(result, source, SETTINGS, sr_path=tmp_path / "sr.dcm", gsps_path=tmp_path / "pr.dcm")
    for path in (out.sr_path, out.gsps_path):
        errors, _ = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"

    sr = pydicom.dcmread(out.sr_path)
    assert sr.SpecificCharacterSet == "ISO_IR 192" and str(sr.PatientName) == "Müller^Jürgen"
    back = read_sr(sr)
    assert back.text_altered
    _assert_same_boxes(sr, result, source)
    phrases = [r.text for r in back.regions if r.label is None]
    assert all(_forbidden(p, "UT") == [] for p in phrases)
    assert "<script>alert('x')</script> <b>Cardiomegaly</b> &amp; </table>" in phrases, "HTML is kept as text"
    assert any("\U0001fac1" in p for p in phrases), "emoji are kept"
    assert back.findings_text.startswith("Heart size is [31m enlarged . Small effusion\nEffusion \ufffd at")
    assert len(back.findings_text) <= VR_MAX_CHARACTERS["UT"]

    gsps = pydicom.dcmread(out.gsps_path)
    assert gsps.SpecificCharacterSet == "ISO_IR 192"
    annotation = gsps.GraphicAnnotationSequence[0]
    texts = [str(t.UnformattedTextValue) for t in annotation.TextObjectSequence]
    assert ALTERED_NOTICE in texts
    assert all(len(t) <= 1024 and _forbidden(t, "ST") == [] for t in texts)
    assert all(len(str(g.TrackingID)) <= 64 and _forbidden(str(g.TrackingID), "LO") == []
               for g in annotation.GraphicObjectSequence)


@pytest.mark.skipif(shutil.which("dsr2html") is None, reason="dcmtk missing")
def test_dsr2html_shows_model_html_as_text(tmp_path: Path) -> None:
    source = make_cr(600, 500)
    path = write_outputs(adversarial_result(source), source, SETTINGS, sr_path=tmp_path / "sr.dcm").sr_path
    proc = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "<script>" not in proc.stdout and "&lt;script&gt;alert(" in proc.stdout
    assert ALTERED_NOTICE in proc.stdout


def _dcmtk_checkable(text: str) -> bool:
    """dcmtk 3.6.7's VR checker does not support ISO_IR 192 ("The VR checker does not support this
    Specific Character Set") and rejects valid UTF-8 whose bytes fall in 0x80-0x9F (e.g. "ß",
    "→", CJK, emoji); dciodvfy checks those values instead."""
    return all(ord(c) < 0x80 or not any(0x80 <= b <= 0x9F for b in c.encode("utf-8"))
               for c in dicom_text(text, "LO", max_characters=1024).text)


@needs_dcmpschk
def test_gsps_from_adversarial_text_passes_dcmpschk(tmp_path: Path) -> None:
    texts = {name: text for name, text in ADVERSARIAL_TEXTS.items() if _dcmtk_checkable(text)}
    assert set(ADVERSARIAL_TEXTS) - set(texts) == {"emoji"}
    source = make_cr(600, 500)
    out = write_outputs(adversarial_result(source, texts), source, SETTINGS, gsps_path=tmp_path / "pr.dcm")
    passed, output = dcmpschk(out.gsps_path)
    assert passed, output
    labels = [str(t.UnformattedTextValue)
              for t in pydicom.dcmread(out.gsps_path).GraphicAnnotationSequence[0].TextObjectSequence]
    assert ALTERED_NOTICE in labels and "<script>alert('x')</script> <b>Cardiomegaly</b> &amp; </table>" in labels


def test_clean_model_text_carries_no_altered_notice(tmp_path: Path) -> None:
    source = make_cr(300, 200)
    result = make_result(source, boxes={"cardiomegaly": [Box(x1=0.3, y1=0.4, x2=0.7, y2=0.8)]},
                         phrase_boxes={"Heart  size is enlarged.": [Box(x1=0.3, y1=0.4, x2=0.7, y2=0.8)]})
    out = write_outputs(result, source, SETTINGS, sr_path=tmp_path / "sr.dcm", gsps_path=tmp_path / "pr.dcm")
    assert read_sr(pydicom.dcmread(out.sr_path)).text_altered is False
    gsps = pydicom.dcmread(out.gsps_path)
    assert ALTERED_NOTICE not in [str(t.UnformattedTextValue)
                                  for t in gsps.GraphicAnnotationSequence[0].TextObjectSequence]


_model_text = st.text(alphabet=st.characters(codec=None), min_size=1, max_size=400)


@needs_dciodvfy
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(findings=_model_text, phrase=_model_text, region=_model_text)
@example(findings="0", phrase="0", region=" ")  # found by hypothesis: an empty GSPS label
@example(findings="\x00", phrase="\x07\x1b", region="\ud800")
def test_sr_and_gsps_from_random_unicode_are_valid(tmp_path: Path, findings: str, phrase: str,
                                                   region: str) -> None:
    source = make_cr(240, 200)
    box = Box(x1=0.1, y1=0.2, x2=0.6, y2=0.7)
    result = make_result(source, boxes={"pneumothorax": [box]}, findings=findings,
                         phrase_boxes={phrase: [box]})
    from inference.result import Region
    result = result.model_copy(update={"regions": result.regions + (
        Region(task="anatomical_grounding", query=region, boxes=(box,)),)})
    out = write_outputs(result, source, SETTINGS, sr_path=tmp_path / "sr.dcm", gsps_path=tmp_path / "pr.dcm")
    for path in (out.sr_path, out.gsps_path):
        errors, _ = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
    sr = pydicom.dcmread(out.sr_path)
    _assert_same_boxes(sr, result, source)
    expected_altered = any(dicom_text(value, "UT").altered for value in (findings, phrase, region))
    assert read_sr(sr).text_altered is expected_altered


@needs_dciodvfy
def test_random_weight_model_output_is_valid(tiny_model_dir: Path, rg1_j2kr: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The model that showed the problem: a random-weight model's report (control characters,
    133 dciodvfy errors before issue 11) through ``radvlm infer``."""
    from dicom_node.cli import EXIT_OK, main

    sr_path, pr_path = tmp_path / "sr.dcm", tmp_path / "pr.dcm"
    assert main(["infer", str(rg1_j2kr), "--model", str(tiny_model_dir), "--tasks", "report", "--json",
                 "--sr", str(sr_path), "--gsps", str(pr_path)]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    for path in (sr_path, pr_path):
        errors, _ = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
    back = read_sr(pydicom.dcmread(sr_path))
    expected = dicom_text(result["findings_text"], "UT")
    assert expected.altered, "this model's answer holds control characters (else the test proves nothing)"
    assert back.findings_text == (expected.text or None)
    assert back.text_altered is expected.altered
