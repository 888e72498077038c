"""Instruction builder, `radvlm build-dataset` and site adaptation on the fixture sources."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import ConfigError, load_typed_config
from inference import prompts
from tests.dicom_samples import (
    DEFAULT_PATIENT_ID,
    chest_phantom,
    make_cr_dataset,
    make_sr_dataset,
    write,
)
from training.build_dataset_cli import add_command, build_from_file
from training.instructions import BuildConfig, build_dataset
from training.instructions.render import conversations
from training.sources.samples import SourceSample

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
JOB = FIXTURES / "build.toml"

EXPECTED_TRAIN = {  # samples × upstream repeat factor
    "mimic_cxr_report": 2, "chexpert_plus_report": 1, "mimic_cxr_classification": 2,
    "chexpert_classification": 3, "chest_imagenome_anatomical_grounding": 2,
    "vindr_cxr_abnormality_grounding": 3 * 3, "vindr_cxr_detection": 2 * 2,
    "ms_cxr_phrase_grounding": 3 * 3, "padchest_gr_phrase_grounding": 3 * 2,
    "mimic_cxr_conversation": 2, "mimic_cxr_grounded_conversation": 1 * 4,
    "padchest_gr_grounded_conversation": 1 * 4, "generated_conversation": 1,
    "generated_grounded_conversation": 1 * 4,
}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    summary = build_from_file(JOB, out, progress=False)
    return summary, out


def test_counts_per_component_and_manifest(built):
    summary, out = built
    train = _records(out / "train.jsonl")
    by_component = Counter(r["id"].split("-train")[0] for r in train)
    assert dict(by_component) == EXPECTED_TRAIN
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"]["by_component"] == EXPECTED_TRAIN
    assert manifest["counts"]["train"]["total"] == len(train) == 53
    assert manifest["counts"]["train"]["by_task"]["phrase_grounding"] == 15
    assert manifest["counts"]["train"]["by_source"]["vindr_cxr"] == 13
    assert manifest["counts"]["test"]["total"] == len(_records(out / "test.jsonl")) == 10


def test_llava_record_format(built):
    _, out = built
    records = _records(out / "train.jsonl") + _records(out / "test.jsonl")
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        assert set(record) == {"image", "conversations", "id"}
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<image>") for t in turns) == 1


def test_test_split_kept_apart(built):
    _, out = built
    train_images = {r["image"] for r in _records(out / "train.jsonl")}
    test_images = {r["image"] for r in _records(out / "test.jsonl")}
    assert test_images and not train_images & test_images
    assert all("-test1_" in r["id"] for r in _records(out / "test.jsonl"))


def test_phrasings_come_from_prompt_module_and_are_redrawn_per_repeat(built):
    _, out = built
    grounding = [r for r in _records(out / "train.jsonl")
                 if r["id"].startswith("vindr_cxr_abnormality_grounding")]
    questions = {r["conversations"][0]["value"].removeprefix("<image>\n") for r in grounding}
    allowed = {v.format(n) for v in prompts.GROUNDING_PROMPT_VARIANTS
               for n in ("cardiomegaly", "nodule/mass", "pleural effusion")}
    assert questions <= allowed and len(questions) > 3
    detection = [r for r in _records(out / "train.jsonl") if r["id"].startswith("vindr_cxr_detection")]
    answers = [r["conversations"][1]["value"] for r in detection]
    assert sum(a in prompts.DETECTION_NONE_ANSWER_VARIANTS for a in answers) == 2
    assert any("a cardiomegaly located at the coordinates [0.31, 0.5, 0.71, 0.7]" in a for a in answers)


def test_deterministic_with_seed(tmp_path):
    config = load_typed_config(BuildConfig, JOB, environ={}).resolved(FIXTURES.resolve())
    first = build_dataset(config, tmp_path / "a", progress=False)
    build_dataset(config, tmp_path / "b", progress=False)
    other = build_dataset(config.model_copy(update={"seed": 1}), tmp_path / "c", progress=False)
    a = (first.files["train"]).read_bytes()
    assert a == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert a != other.files["train"].read_bytes()


def test_repeat_factors_json_format_and_imagenome_cap(tmp_path):
    config = load_typed_config(BuildConfig, JOB, environ={}).resolved(FIXTURES.resolve())
    mix = config.mix.model_copy(update={"vindr_cxr_detection": 5, "ms_cxr_phrase_grounding": 0,
                                        "chest_imagenome_samples": 1})
    config = config.model_copy(update={"mix": mix, "output_format": "json", "splits": ("train",)})
    summary = build_dataset(config, tmp_path, progress=False)
    records = json.loads((tmp_path / "train.json").read_text())
    ids = Counter(r["id"].split("-train")[0] for r in records)
    assert ids["vindr_cxr_detection"] == 10 and "ms_cxr_phrase_grounding" not in ids
    assert ids["chest_imagenome_anatomical_grounding"] == 1
    assert set(summary.files) == {"train"}


def test_build_on_todays_layouts_without_test_csv_and_with_a_zero_area_box(tmp_path):
    import shutil

    from training.sources import chexpert_plus

    for name in ("CheXpert", "VinDr-CXR"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    (tmp_path / "CheXpert" / "test.csv").unlink()
    annotations = tmp_path / "VinDr-CXR" / "annotations" / "annotations_train.csv"
    annotations.write_text(annotations.read_text() + "00053190460d56c53cc3e57321387478,R8,Nodule/Mass,10,20,40,20\n")
    plus = tmp_path / "CheXpertPlus"            # today's CheXpert-Plus layout: root/<path_to_image>
    plus.mkdir()
    shutil.copy(FIXTURES / "CheXpertPlus" / chexpert_plus.REPORTS_CSV, plus)
    for png in (FIXTURES / "CheXpertPlus" / "PNG").rglob("*.png"):
        target = plus / png.relative_to(FIXTURES / "CheXpertPlus" / "PNG").with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target)
    config = BuildConfig.model_validate({"sources": {"chexpert": {"root": tmp_path / "CheXpert"},
                                                     "chexpert_plus": {"root": plus},
                                                     "vindr_cxr": {"root": tmp_path / "VinDr-CXR"}}})
    summary = build_dataset(config, tmp_path / "out", progress=False)
    test = _records(tmp_path / "out" / "test.jsonl")
    assert not [r for r in test if r["id"].startswith("chexpert_classification")]
    assert [r["image"] for r in test if r["id"].startswith("chexpert_plus_report")] == [
        str(plus / "valid/patient64541/study1/view1_frontal.jpg")]
    assert summary.skipped == {"chexpert": {"no test.csv: no test records": 1}, "vindr_cxr": {"zero-area box": 1}}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped_inputs"]["vindr_cxr"] == {"zero-area box": 1}


def test_uncertain_labels_absent_setting_changes_the_classification_targets(tmp_path):
    config = BuildConfig.model_validate({"sources": {"chexpert": {"root": FIXTURES / "CheXpert"}},
                                         "splits": ["train"], "shuffle": False})
    assert config.uncertain_labels == "present"                     # upstream's code is the default
    present = build_dataset(config, tmp_path / "p", progress=False)
    absent = build_dataset(config.model_copy(update={"uncertain_labels": "absent"}), tmp_path / "a", progress=False)
    # patient00002: Cardiomegaly -1, Edema 1 → "cardiomegaly and edema" (code) vs "edema" (paper)
    answers = [_records(s.files["train"])[1]["conversations"][1]["value"] for s in (present, absent)]
    assert "cardiomegaly" in answers[0] and "edema" in answers[0]
    assert "cardiomegaly" not in answers[1] and "edema" in answers[1]


def test_classification_answer_rendering():
    import random
    sample = SourceSample("classification", "x", "train", "i.png", labels=("cardiomegaly",))
    answer = conversations(sample, random.Random(0))[1]["value"]
    assert answer.endswith(" cardiomegaly.") and answer.rsplit(" ", 1)[0] in \
        prompts.CLASSIFICATION_ONE_PREFIX_VARIANTS


def test_unknown_config_key_is_an_error(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('seed = 0\n[sources.mimic_cxr]\nroot = "x"\nfrobnicate = 1\n')
    with pytest.raises(ConfigError, match="sources.mimic_cxr.frobnicate: unknown key"):
        build_from_file(job, tmp_path / "out", progress=False)


def radvlm_main(argv: list[str]) -> int:
    """The `radvlm` parser with only this subcommand registered (as training.commands does)."""
    parser = argparse.ArgumentParser(prog="radvlm")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_prints_summary_and_fails_cleanly(tmp_path, capsys):
    assert radvlm_main(["build-dataset", "--config", str(JOB), "--out", str(tmp_path / "o"),
                        "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "vindr_cxr_detection" in out and "train: 53 records" in out
    job = tmp_path / "bad.toml"
    job.write_text(f'[sources.chexpert]\nroot = "{tmp_path / "nowhere"}"\n')
    assert radvlm_main(["build-dataset", "--config", str(job), "--out", str(tmp_path / "p"),
                        "--no-progress"]) == 2
    assert "train.csv does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------ site adaptation
SECRETS = (DEFAULT_PATIENT_ID, "Testpatient", "Radvlm", "ACC-778899", "Smith", "19480213",
           "13.02.1948", "4455667788")


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    pixels = chest_phantom(64, 48)
    common = dict(pixel_array=pixels, PatientBirthDate="19480213", AccessionNumber="ACC-778899",
                  ReferringPhysicianName="Smith^John")
    pa = make_cr_dataset(view_position="PA", **common)
    write(pa, site / "pa.dcm")
    (site / f"{pa.StudyInstanceUID}.txt").write_text(
        "FINAL REPORT Testpatient^Radvlm, MRN 4455667788, born 13.02.1948\n\n"
        "FINDINGS:\nModerate cardiomegaly. Small left pleural effusion. No pneumothorax.\n"
        "Discussed with Dr. Smith on 2026-01-15.\n\nIMPRESSION:\nCardiomegaly.\n")
    ap = make_cr_dataset(view_position="AP", modality="DX", **common)
    write(ap, site / "ap.dcm")
    write(make_sr_dataset(text="FINDINGS: No acute cardiopulmonary abnormality.",
                          study_instance_uid=ap.StudyInstanceUID), site / "ap_report.dcm")
    lateral = make_cr_dataset(view_position="LL", **common)
    write(lateral, site / "lat.dcm")
    (site / "lat.txt").write_text("FINDINGS: Normal.")
    return site


def test_site_adaptation_deidentified(tmp_path):
    site = _site(tmp_path)
    job = tmp_path / "site.toml"
    job.write_text(f'seed = 3\n[sources.site]\nfolder = "{site}"\n'
                   'pseudonym_salt = "site-secret-salt-0123"\n')
    out = tmp_path / "out"
    summary = build_from_file(job, out, progress=False)
    train = _records(out / "train.jsonl")
    assert Counter(r["id"].split("-train")[0] for r in train) == {"site_report": 2,
                                                                  "site_classification": 2}
    assert summary.skipped["site"] == {"not frontal (ViewPosition LL)": 1}
    reports = sorted(r["conversations"][1]["value"] for r in train if r["id"].startswith("site_report"))
    assert reports == ["Moderate cardiomegaly. Small left pleural effusion. No pneumothorax. "
                       "Discussed with Dr. ___ on ___.", "No acute cardiopulmonary abnormality."]
    classification = {r["conversations"][1]["value"] for r in train
                      if r["id"].startswith("site_classification")}
    assert any(a.endswith("cardiomegaly and pleural effusion.") for a in classification)
    assert classification & set(prompts.CLASSIFICATION_NONE_ANSWER_VARIANTS)
    pngs = sorted((out / "images" / "site").glob("*.png"))
    assert len(pngs) == 2 and all(r["image"] in {str(p) for p in pngs} for r in train)
    assert np.asarray(Image.open(pngs[0])).shape == (64, 48)
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (*SECRETS, "site-secret-salt-0123"):
                assert secret.encode() not in data, (secret, path)
