"""Phantom generator (issue 8 item 1): truth self-consistency, determinism, DICOM export."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.image import load_image
from inference.labels import LABELS
from inference.parsing import parse_boxes, parse_labels
from inference.prompts import ANATOMICAL_REGIONS
from inference.result import Box
from training.phantoms import PhantomConfig, PhantomSampler
from training.phantoms.anatomy import cardiothoracic_ratio
from training.phantoms.dataset import write_phantom_dataset
from training.phantoms.dicom_export import frontal_dataset, write_dataset
from training.phantoms.findings import Cardiomegaly
from training.phantoms.records import instruction_records, truth_record

SEED = 7
# Findings in most phantoms, so every family is exercised by a few dozen samples.
BUSY = PhantomConfig(normal_fraction=0.0, rates={
    "cardiomegaly": 0.5, "pleural effusion": 0.5, "lung lesion": 0.6, "pneumothorax": 0.35,
    "consolidation": 0.45, "lung opacity": 0.4, "support devices": 0.5})


@pytest.fixture(scope="module")
def busy() -> list:
    sampler = PhantomSampler(SEED, BUSY)
    return [sampler.sample(i) for i in range(40)]


def _pixel_edges(box, rows: int, columns: int) -> tuple[float, float, float, float]:
    return box[0] * columns, box[1] * rows, box[2] * columns, box[3] * rows


def test_finding_boxes_cover_the_drawn_finding(busy) -> None:
    """Difference image (phantom − phantom without the finding): ≥ 95 % of the changed pixels
    fall inside the finding's boxes, and the boxes are not much larger than the change."""
    checked: dict[str, int] = {}
    for phantom in busy:
        full = phantom.render().image
        for k, truth in enumerate(phantom.truths):
            finding = truth.finding
            if isinstance(finding, Cardiomegaly):
                normal = phantom.anatomy.with_heart_width(0.44 * phantom.anatomy.heart_width
                                                          / finding.ctr)
                others = [f for f in phantom.findings if f is not finding]
                without = phantom.render(others, anatomy=normal).image
            else:
                without = phantom.render(phantom.findings[:k] + phantom.findings[k + 1:]).image
            changed = np.abs(full - without) * 255.0 > 6.0
            assert changed.sum() > 0, f"{finding.kind} drew nothing in phantom {phantom.index}"
            inside = np.zeros_like(changed)
            for box in truth.boxes:
                x1, y1, x2, y2 = _pixel_edges(box, phantom.rows, phantom.columns)
                inside[int(round(y1)):int(round(y2)), int(round(x1)):int(round(x2))] = True
            share = (changed & inside).sum() / changed.sum()
            assert share >= 0.95, (phantom.index, finding.kind, share)
            rows = np.flatnonzero(changed.any(axis=1))
            cols = np.flatnonzero(changed.any(axis=0))
            change_area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
            box_area = sum((b[2] - b[0]) * phantom.columns * (b[3] - b[1]) * phantom.rows
                           for b in truth.boxes)
            limit = 1.6 if len(truth.boxes) == 1 else 2.5   # bilateral: one change bbox spans both
            if len(truth.boxes) == 1:
                assert box_area <= limit * change_area + 16, (phantom.index, finding.kind,
                                                              box_area, change_area)
            checked[finding.kind] = checked.get(finding.kind, 0) + 1
    for kind in ("cardiomegaly", "pleural effusion", "lung lesion", "pneumothorax",
                 "consolidation", "lung opacity", "support devices"):
        assert checked.get(kind, 0) >= 3, checked


def test_cardiomegaly_matches_the_measured_cardiothoracic_ratio() -> None:
    """CTR measured on the rendered image (heart run at its widest row vs the lungs' widest
    extent) agrees with the truth, and cardiomegaly ⇔ CTR > 0.5."""
    sampler = PhantomSampler(SEED + 1, BUSY)
    enlarged = normal = 0
    for index in range(40):
        phantom = sampler.sample(index)
        a = phantom.anatomy
        clean = phantom.render([], noise=False).image   # the heart alone: no effusion beside it
        masks = a.masks
        lung_level = float(np.median(clean[masks.lung_right | masks.lung_left]))
        heart_level = float(np.median(clean[masks.heart]))
        threshold = (lung_level + heart_level) / 2.0
        hx, hy = a.heart_centre
        top = int(hy - a.heart_width / 2 * a.heart_aspect) + 1
        widest = 0
        for row in range(top, int(hy) + 1):
            bright = clean[row] > threshold
            col = int(hx)
            left = right = col
            while left > 0 and bright[left - 1]:
                left -= 1
            while right < a.columns - 1 and bright[right + 1]:
                right += 1
            widest = max(widest, right - left + 1)
        lungs = masks.lung_right | masks.lung_left
        thorax = max(np.flatnonzero(r)[-1] - np.flatnonzero(r)[0] + 1 for r in lungs if r.any())
        measured = widest / thorax
        assert measured == pytest.approx(phantom.cardiothoracic_ratio, abs=0.03), index
        assert phantom.cardiothoracic_ratio == pytest.approx(cardiothoracic_ratio(masks))
        assert phantom.labels["cardiomegaly"] == (measured > 0.5), (index, measured)
        enlarged += phantom.labels["cardiomegaly"]
        normal += not phantom.labels["cardiomegaly"]
    assert enlarged >= 5 and normal >= 5


def test_truth_records_are_radvlm_format(busy) -> None:
    for phantom in busy:
        record = truth_record(phantom, "images/x.png")
        assert list(record["labels"]) == list(LABELS)
        assert record["labels"]["no finding"] == (not any(
            v for k, v in record["labels"].items() if k != "no finding"))
        assert parse_labels(record["report"]) == record["labels"], record["report"]
        for finding in record["findings"]:
            assert finding["label"] in LABELS and record["labels"][finding["label"]]
            assert finding["boxes"] and finding["sentence"] in record["report"]
            for box in finding["boxes"]:
                Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3])
        names = [region["name"] for region in record["regions"]]
        assert set(names) <= set(ANATOMICAL_REGIONS)
        assert {"right lung", "left lung", "cardiac silhouette", "mediastinum", "trachea",
                "right costophrenic angle", "left hemidiaphragm", "spine"} <= set(names)
        right, left = (dict((r["name"], r["boxes"][0]) for r in record["regions"])[n]
                       for n in ("right lung", "left lung"))
        assert right[2] <= left[0] + 0.02   # patient's right lung on the image left
        json.dumps(record)


def test_instruction_records_follow_the_llava_format(busy) -> None:
    for phantom in busy[:15]:
        for variants in ("canonical", "random"):
            records = instruction_records(phantom, "images/p.png", variants)
            ids = [r["id"] for r in records]
            assert len(ids) == len(set(ids))
            for record in records:
                turns = record["conversations"]
                assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
                assert turns[0]["value"].startswith("<image>\n")
                assert all("<image>" not in t["value"] for t in turns[1:])
            by_kind = {r["id"].split("-")[3]: r for r in records}
            answer = by_kind["classification"]["conversations"][1]["value"]
            assert parse_labels(answer) == phantom.labels, answer
        canonical = instruction_records(phantom, "images/p.png", "canonical")
        for record in canonical:
            if "-abnormality-" in record["id"]:
                k = int(record["id"].rsplit("-", 1)[1])
                truth = [t for t in phantom.truths if t.boxes][k]
                parsed = parse_boxes(record["conversations"][1]["value"]).boxes
                assert len(parsed) == len(truth.boxes)
                for got, want in zip(parsed, truth.boxes):
                    assert np.allclose(got.as_list(), want, atol=0.006)
        report = next(r for r in canonical if r["id"].endswith("-report"))
        assert report["conversations"][0]["value"] == ("<image>\nProvide a radiology report "
                                                       "for this Chest X-Ray.")
        assert report["conversations"][1]["value"] == phantom.report


def test_sampling_is_deterministic_and_fast() -> None:
    first, second = PhantomSampler(3), PhantomSampler(3)
    for index in (0, 5, 17):
        a, b = first.sample(index), second.sample(index)
        assert np.array_equal(a.intensity, b.intensity) and a.report == b.report
        assert [t.boxes for t in a.truths] == [t.boxes for t in b.truths]
    assert not np.array_equal(PhantomSampler(4).sample(5).pixels, first.sample(5).pixels)
    sampler = PhantomSampler(11)
    sampler.sample(0)
    began = time.perf_counter()
    for index in range(50):
        sampler.sample(index)
    per_phantom = (time.perf_counter() - began) / 50
    assert per_phantom < 0.05, f"{per_phantom * 1000:.1f} ms per 160-px phantom"


def test_sizes_and_aspect_ratios_vary() -> None:
    sampler = PhantomSampler(2, PhantomConfig(size=192, size_range=(0.8, 1.0)))
    shapes = {(p.rows, p.columns) for p in (sampler.sample(i) for i in range(12))}
    assert len(shapes) >= 6
    assert all(max(s) <= 192 and min(s) >= 64 for s in shapes)
    assert any(r > c for r, c in shapes) and any(c > r for r, c in shapes)


def test_dataset_files_are_identical_for_the_same_seed(tmp_path: Path) -> None:
    one = write_phantom_dataset(tmp_path / "a", 12, seed=5)
    write_phantom_dataset(tmp_path / "b", 12, seed=5)
    files = sorted(p.relative_to(one.out) for p in one.out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                           if p.is_file())
    for rel in files:
        assert (one.out / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    manifest = json.loads((one.out / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["seed"] == 5
    assert set(manifest["files"]) | {"manifest.json"} == {str(f) for f in files}
    other = write_phantom_dataset(tmp_path / "c", 12, seed=6)
    assert (other.out / "truth.jsonl").read_bytes() != (one.out / "truth.jsonl").read_bytes()


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_monochrome1_reads_back_like_monochrome2(tmp_path: Path, bits: int) -> None:
    phantom = PhantomSampler(9).sample(1)
    loaded = {}
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        variant = dataclasses.replace(phantom, acquisition=dataclasses.replace(
            phantom.acquisition, photometric=photometric, bits_stored=bits))
        path = write_dataset(frontal_dataset(variant), tmp_path / f"{photometric}.dcm")
        loaded[photometric] = load_image(path).pixels.astype(int)
    assert np.abs(loaded["MONOCHROME1"] - loaded["MONOCHROME2"]).max() <= 1
    assert np.abs(loaded["MONOCHROME2"] - phantom.pixels.astype(int)).max() <= 1
    stored = pydicom.dcmread(tmp_path / "MONOCHROME1.dcm").pixel_array.astype(int)
    assert stored.mean() > ((1 << bits) - 1) / 2   # MONOCHROME1: air (most of it) stored high


def test_dicom_exports_are_readable_with_original_geometry(tmp_path: Path) -> None:
    summary = write_phantom_dataset(tmp_path, 16, seed=4, dicom_scale=2,
                                    config=PhantomConfig(lateral_fraction=0.5))
    records = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    seen = {"photometric": set(), "modality": set(), "bits": set(), "views": set()}
    laterals = 0
    for record in records:
        for rel in record["dicom"]:
            ds = pydicom.dcmread(tmp_path / rel)
            image = load_image(tmp_path / rel)
            assert (image.rows, image.columns) == (ds.Rows, ds.Columns)
            assert (ds.Rows, ds.Columns) == (2 * record["rows"], 2 * record["columns"])
            assert str(ds.PatientName).startswith("PHANTOM^")
            assert ds.PatientID.startswith("PHANTOM-") and not ds.PatientBirthDate
            assert "SYNTHETIC PHANTOM" in ds.PatientComments
            assert ds.StudyInstanceUID.startswith("2.25.") and ds.BodyPartExamined == "CHEST"
            assert ds.Modality in ("CR", "DX") and 8 <= ds.BitsStored <= 16
            seen["photometric"].add(ds.PhotometricInterpretation)
            seen["modality"].add(ds.Modality)
            seen["bits"].add(int(ds.BitsStored))
            seen["views"].add(ds.ViewPosition)
            if rel.endswith("lateral.dcm"):
                laterals += 1
                assert ds.ViewPosition in ("LL", "RL")
                assert record["lateral_view_position"] == ds.ViewPosition
                assert "lateral" in ds.ViewCodeSequence[0].CodeMeaning
            else:
                assert ds.ViewPosition == record["view_position"] in ("PA", "AP")
                png = np.asarray(load_image(tmp_path / record["image"]).pixels, dtype=int)
                upsampled = np.repeat(np.repeat(png, 2, axis=0), 2, axis=1)
                assert np.abs(image.pixels.astype(int) - upsampled).max() <= 1
        studies = {pydicom.dcmread(tmp_path / rel).StudyInstanceUID for rel in record["dicom"]}
        assert len(studies) == 1
    assert laterals == summary.laterals >= 3
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["modality"] == {"CR", "DX"} and len(seen["bits"]) >= 3


def test_cli_subcommand_writes_a_dataset(tmp_path: Path, capsys) -> None:
    from training.phantoms_cli import add_command

    parser = argparse.ArgumentParser(prog="radvlm")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["phantoms", "--out", str(tmp_path), "--count", "3", "--seed", "1",
                              "--size", "128", "--no-dicom", "--variants", "canonical"])
    assert args.handler(args) == 0
    assert "3 phantoms" in capsys.readouterr().out
    records = json.loads((tmp_path / "instructions.json").read_text())
    assert records and all((tmp_path / r["image"]).is_file() for r in records)
    assert not (tmp_path / "dicom").exists()


def test_cli_regions_restrict_anatomical_questions_and_reject_unknown_names(tmp_path: Path) -> None:
    from training.phantoms_cli import add_command

    parser = argparse.ArgumentParser(prog="radvlm")
    add_command(parser.add_subparsers(dest="command", required=True))
    taught = ("right lung", "cardiac silhouette")
    args = parser.parse_args(["phantoms", "--out", str(tmp_path), "--count", "6", "--seed", "3",
                              "--size", "128", "--no-dicom", "--no-png", "--tasks", "anatomical_grounding",
                              "--regions", " Right Lung,cardiac silhouette"])
    assert args.handler(args) == 0
    questions = [r["conversations"][0]["value"] for r in json.loads((tmp_path / "instructions.json").read_text())]
    assert len(questions) == 12
    assert all(any(name in q.lower() for name in taught) for q in questions)
    assert {name for q in questions for name in taught if name in q.lower()} == set(taught)
    truth = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    assert len(truth[0]["regions"]) > len(taught)   # the truth keeps every drawn region
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["regions"] == list(taught)

    bad = parser.parse_args(["phantoms", "--out", str(tmp_path / "bad"), "--count", "1",
                             "--regions", "left elbow"])
    with pytest.raises(SystemExit, match="unknown anatomical region"):
        bad.handler(bad)
