"""Source readers on fixtures laid out as the datasets ship them (tests/fixtures/datasets)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from training.sources import chest_imagenome, chexpert, chexpert_plus, ms_cxr, padchest_gr, vindr_cxr
from training.sources.conversation_files import load_turns
from training.sources.errors import MissingSourceFileError, SourceFormatError
from training.sources.label_rules import chexpert_present, mimic_present
from training.sources.mimic_cxr import MimicCxr
from training.sources.report_text import findings_text, report_sections
from training.sources.wbf import fuse_boxes

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
A = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"   # MIMIC p10000032/s50414267, PA, train
C = "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"   # AP, train, "No Finding"
D = "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"   # PA, validate (MS-CXR)
E = "ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c"   # PA, test


@pytest.fixture(scope="module")
def mimic() -> MimicCxr:
    return MimicCxr(FIXTURES / "MIMIC-CXR-JPG")


def _stem(path: str) -> str:
    return Path(path).stem


# ------------------------------------------------------------------------- label rules
def test_uncertain_counts_present_and_blank_absent():
    cells = {"Cardiomegaly": -1.0, "Edema": None, "Pleural Effusion": 1.0, "Pneumothorax": 0.0}
    assert mimic_present(cells) == ("cardiomegaly", "pleural effusion")
    assert chexpert_present(cells) == ("cardiomegaly", "pleural effusion")


def test_no_finding_clears_all_but_support_devices_in_chexpert_only():
    cells = {"No Finding": 1.0, "Support Devices": 1.0, "Pleural Effusion": -1.0}
    assert chexpert_present(cells) == ("support devices",)
    assert mimic_present(cells) == ("pleural effusion", "support devices")


# ---------------------------------------------------------------------------- MIMIC-CXR
def test_mimic_frontal_train_images_with_chexpert_rows(mimic):
    train = mimic.images("train")
    assert [i.dicom_id for i in train] == [A, C]           # lateral and label-less study left out
    assert {i.dicom_id for i in mimic.images("train", frontal_only=False)} >= {A, C}
    assert [i.dicom_id for i in mimic.images("valid")] == [D]
    assert [i.dicom_id for i in mimic.images("test")] == [E]


def test_mimic_reports_findings_else_impression(mimic):
    samples = {_stem(s.image): s for s in mimic.report_samples("train")}
    assert samples[A].text == ("The heart size is mildly enlarged. There is a small left pleural "
                               "effusion. No pneumothorax is seen.")
    assert samples[C].text == "No acute cardiopulmonary process."
    assert Path(samples[A].image).is_file()


def test_mimic_classification_labels(mimic):
    labels = {_stem(s.image): s.labels for s in mimic.classification_samples("train")}
    assert labels == {A: ("cardiomegaly", "pleural effusion"), C: ()}
    assert mimic.classification_samples("test")[0].labels == ("atelectasis", "support devices")


def test_mimic_conversations_both_file_formats(mimic):
    samples = mimic.conversation_samples("train", grounded=False)
    assert sorted(_stem(s.image) for s in samples) == sorted([A, C])
    assert all(t.speaker == ("human", "gpt")[i % 2] for s in samples for i, t in enumerate(s.turns))


def test_report_sections():
    text = "EXAMINATION: CHEST\n\nFINDINGS:\nLungs clear.\n\nIMPRESSION:\nNormal.\n"
    sections = report_sections(text)
    assert (sections.findings, sections.impression) == ("Lungs clear.", "Normal.")
    assert findings_text("IMPRESSION: No acute process.") == "No acute process."
    assert findings_text("Free text without headers.") == "Free text without headers."


# ----------------------------------------------------------------------------- CheXpert
def test_chexpert_frontal_filter_and_labels():
    samples = chexpert.classification_samples(FIXTURES / "CheXpert", "train")
    got = {s.image.split("CheXpert/")[1]: s.labels for s in samples}
    assert got == {"train/patient00001/study1/view1_frontal.jpg": ("support devices",),
                   "train/patient00002/study2/view1_frontal.jpg": ("cardiomegaly", "edema"),
                   "train/patient00003/study1/view1_frontal.jpg": ()}
    test = chexpert.classification_samples(FIXTURES / "CheXpert", "test")   # no Frontal/Lateral column
    assert [s.labels for s in test] == [("atelectasis", "cardiomegaly", "pleural effusion")]


def test_chexpert_plus_reports_findings_else_impression_never_end_of_impression():
    train = chexpert_plus.report_samples(FIXTURES / "CheXpertPlus", "train")
    # findings only (the impression "No acute process." and the sign-off are not joined);
    # the line break inside the cell becomes a space, the rest of the whitespace stays
    assert [s.text for s in train] == ["Support devices in place.  Lungs are clear."]
    assert train[0].image.endswith("PNG/train/patient00001/study1/view1_frontal.png")   # older PNG layout
    # no findings → impression; the end_of_impression boilerplate is never used
    assert [s.text for s in chexpert_plus.report_samples(FIXTURES / "CheXpertPlus", "test")] == [
        "Cardiomegaly with mild edema."]


def _chexpert_plus_current_layout(tmp_path: Path) -> Path:
    """Today's layout: the CSV and the JPGs at root/<path_to_image>, no PNG/ folder."""
    root = tmp_path / "CheXpertPlus"
    root.mkdir()
    shutil.copy(FIXTURES / "CheXpertPlus" / chexpert_plus.REPORTS_CSV, root)
    for png in (FIXTURES / "CheXpertPlus" / "PNG").rglob("*.png"):
        target = root / png.relative_to(FIXTURES / "CheXpertPlus" / "PNG").with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target)
    return root


def test_chexpert_plus_current_layout_root_path_to_image(tmp_path):
    root = _chexpert_plus_current_layout(tmp_path)
    train = chexpert_plus.report_samples(root, "train")
    assert train[0].image == str(root / "train/patient00001/study1/view1_frontal.jpg")
    assert [s.text for s in train] == ["Support devices in place.  Lungs are clear."]
    (root / "train/patient00001/study1/view1_frontal.jpg").unlink()
    with pytest.raises(MissingSourceFileError, match=r"PNG/train/.*view1_frontal.jpg does not exist"):
        chexpert_plus.report_samples(root, "train")


def test_chexpert_plus_filtered_reports_read_as_written(tmp_path):
    root = _chexpert_plus_current_layout(tmp_path)
    (root / "filtered_reports").mkdir()
    (root / "filtered_reports" / "train_patient00001_study1.txt").write_text(
        "Support devices in place.\nLungs are clear.\n")
    train = chexpert_plus.report_samples(root, "train", report_source="filtered_reports")
    assert [s.text for s in train] == ["Support devices in place.\nLungs are clear."]


def test_chexpert_without_test_csv_gives_no_test_records(tmp_path):
    from collections import Counter

    root = _copy(tmp_path, "CheXpert")
    (root / "test.csv").unlink()
    skipped: Counter = Counter()
    assert chexpert.classification_samples(root, "test", skipped=skipped) == []
    assert skipped == {"no test.csv: no test records": 1}
    (root / "valid.csv").unlink()
    with pytest.raises(MissingSourceFileError, match="valid.csv"):     # train/valid still required
        chexpert.classification_samples(root, "valid")


def test_uncertain_labels_setting():
    cells = {"Cardiomegaly": -1.0, "Pleural Effusion": 1.0}
    assert mimic_present(cells, "absent") == ("pleural effusion",)
    assert chexpert_present(cells, "absent") == ("pleural effusion",)
    assert chexpert_present(cells, "present") == ("cardiomegaly", "pleural effusion")
    with pytest.raises(ValueError, match="uncertain"):
        mimic_present(cells, "maybe")  # type: ignore[arg-type]


# --------------------------------------------------------------------- Chest ImaGenome
def test_imagenome_boxes_normalised_by_mimic_size(mimic):
    samples = chest_imagenome.anatomical_samples(FIXTURES / "CHEST_IMA", mimic, "train")
    regions = {_stem(s.image): dict(s.regions) for s in samples}
    assert set(regions) == {A, C}                      # F is not in the MIMIC index
    assert regions[A]["right lung"] == pytest.approx((254 / 2544, 611 / 3056, 1272 / 2544, 2445 / 3056))
    assert [_stem(s.image) for s in chest_imagenome.anatomical_samples(
        FIXTURES / "CHEST_IMA", mimic, "test")] == [E]


# ----------------------------------------------------------------------------- VinDr-CXR
def test_wbf_hand_checked():
    # three radiologists, one cardiomegaly: mean of the cluster; a distant box stays apart
    fused = fuse_boxes([[300, 1000, 700, 1400], [320, 1000, 720, 1400], [310, 1020, 710, 1420],
                        [800, 1500, 860, 1580]], columns=1000, rows=2000)
    assert sorted(fused) == [(0.31, 0.503, 0.71, 0.703), (0.8, 0.75, 0.86, 0.79)]


def test_vindr_detection_and_grounding():
    images = vindr_cxr.read_images(FIXTURES / "VinDr-CXR", "train")
    assert [Path(i.image).name for i in images] == ["000434271f63a053c4128a0ba6352c7f.jpg",
                                                    "00053190460d56c53cc3e57321387478.jpg"]
    findings = dict(images[0].findings)
    assert list(findings) == ["Cardiomegaly", "Nodule/Mass", "Pleural effusion"]
    assert findings["Cardiomegaly"] == ((0.31, 0.503, 0.71, 0.703),)
    assert sorted(findings["Nodule/Mass"]) == [(0.1, 0.1, 0.15, 0.13), (0.8, 0.75, 0.86, 0.79)]
    assert findings["Pleural effusion"] == ((0.6, 0.75, 0.9, 0.9),)
    assert images[1].findings == ()                                  # "No finding" by all three
    assert len(vindr_cxr.grounding_samples(images, "train")) == 3
    assert len(vindr_cxr.detection_samples(images, "train")) == 2


def test_vindr_zero_area_box_dropped_and_counted(tmp_path):
    from collections import Counter

    root = _copy(tmp_path, "VinDr-CXR")
    path = root / "annotations" / "annotations_train.csv"
    path.write_text(path.read_text() + "000434271f63a053c4128a0ba6352c7f,R9,Pleural effusion,600,1500,600,1800\n"
                    "00053190460d56c53cc3e57321387478,R8,Aortic enlargement,10,20,40,20\n")
    skipped: Counter = Counter()
    images = vindr_cxr.read_images(root, "train", skipped=skipped)
    assert skipped == {"zero-area box": 2}
    assert dict(images[0].findings)["Pleural effusion"] == ((0.6, 0.75, 0.9, 0.9),)   # unchanged
    assert images[1].findings == ()                                  # only box had no area
    path.write_text(path.read_text() + "00053190460d56c53cc3e57321387478,R8,Nodule/Mass,50,20,40,30\n")
    with pytest.raises(SourceFormatError, match="inverted"):
        vindr_cxr.read_images(root, "train")


def test_vindr_size_from_dicom_header_without_resolution_file():
    (image,) = vindr_cxr.read_images(FIXTURES / "VinDr-CXR", "test")
    assert image.image.endswith("test/002a34c58c5b758217ed1f584ccbcfe9.dicom")
    assert image.findings == (("Aortic enlargement", ((0.25, 0.1, 0.75, 0.5),)),)


# -------------------------------------------------------------------------------- MS-CXR
def test_ms_cxr_groups_boxes_per_phrase(mimic):
    train = ms_cxr.phrase_samples(FIXTURES / "MS-CXR", mimic, "train")
    valid = ms_cxr.phrase_samples(FIXTURES / "MS-CXR", mimic, "valid")
    assert [s.name for s in train] == ["The heart size is mildly enlarged"]
    phrases = {s.name: s.boxes for s in valid}
    assert phrases["Left lower lobe consolidation"] == ((0.6, 0.5, 0.8, 0.7), (0.55, 0.6, 0.65, 0.7))
    assert phrases["Small right pleural effusion"] == ((0.1, 0.7, 0.3, 0.9),)


# --------------------------------------------------------------------------- PadChest-GR
def test_padchest_split_projection_and_boxes():
    root = FIXTURES / "PadChest"
    train = padchest_gr.phrase_samples(padchest_gr.read_grounded(root, "train"), "train")
    assert [s.name for s in train] == ["Cardiomegaly.", "Left basal atelectasis."]   # lateral dropped
    assert train[1].boxes == ((0.55, 0.6, 0.8, 0.75), (0.6, 0.7, 0.85, 0.82))
    assert len(padchest_gr.phrase_samples(padchest_gr.read_grounded(root, "valid"), "valid")) == 1
    assert len(padchest_gr.phrase_samples(padchest_gr.read_grounded(root, "test"), "test")) == 1


# -------------------------------------------------------------------- errors name file/column
def _copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_missing_column_is_named(tmp_path):
    root = _copy(tmp_path, "CheXpert")
    path = root / "train.csv"
    path.write_text(path.read_text().replace("Pleural Effusion", "Effusion", 1))
    with pytest.raises(SourceFormatError) as info:
        chexpert.classification_samples(root, "train")
    assert info.value.column == "Pleural Effusion" and "train.csv" in str(info.value)


def test_bad_label_value_names_line_and_column(tmp_path):
    root = _copy(tmp_path, "MIMIC-CXR-JPG")
    path = root / "mimic-cxr-2.0.0-chexpert.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("-1.0", "2", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceFormatError, match=r"line 2, column 'Cardiomegaly'"):
        MimicCxr(root).classification_samples("train")


def test_missing_file_is_named(tmp_path):
    root = _copy(tmp_path, "MIMIC-CXR-JPG")
    (root / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(MissingSourceFileError, match="mimic-cxr-2.0.0-split.csv"):
        MimicCxr(root).report_samples("train")
    root2 = _copy(tmp_path, "VinDr-CXR")
    (root2 / "train_jpg" / "000434271f63a053c4128a0ba6352c7f.jpg").unlink()
    with pytest.raises(MissingSourceFileError, match="000434271f63a053c4128a0ba6352c7f.jpg"):
        vindr_cxr.read_images(root2, "train")


def test_malformed_conversation_rejected(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"from": "gpt", "value": "hi"}]')
    with pytest.raises(SourceFormatError, match="expected human"):
        load_turns(path)
