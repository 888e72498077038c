"""`radvlm` CLI: infer on the real RG1 chest CR with the tiny model, exit codes, chat, tiny-model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from dicom_node.cli import EXIT_BAD_INPUT, EXIT_MODEL, EXIT_OK, main


def test_infer_real_jpeg2000_chest_cr_prints_a_typed_result(tiny_model_dir: Path, rg1_j2kr: Path, capsys):
    assert main(["infer", str(rg1_j2kr), "--model", str(tiny_model_dir), "--json"]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["source"]["rows"] == 1955 and result["source"]["columns"] == 1841
    assert result["source"]["sop_instance_uid"]
    assert result["model"]["version"] == "tiny-random-seed0" and len(result["model"]["weights_sha256"]) == 64
    assert [a["task"] for a in result["answers"]][:2] == ["report", "classification"]
    for region in result["regions"]:
        for box in region["boxes"]:
            assert 0 <= box["x1"] < box["x2"] <= 1 and 0 <= box["y1"] < box["y2"] <= 1
    assert "UNVERIFIED" in result["notice"]


def test_infer_human_readable_output(tiny_model_dir: Path, rg1_j2kr: Path, capsys):
    assert main(["infer", str(rg1_j2kr), "--model", str(tiny_model_dir), "--tasks", "report"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "UNVERIFIED AI RESULT" in out and "1841×1955" in out and "findings:" in out


def test_bad_input_exits_2_with_one_line_reason(tmp_path: Path, tiny_model_dir: Path, capsys):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    assert main(["infer", str(not_an_image), "--model", str(tiny_model_dir)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("radvlm: ") and err.count("\n") == 1
    assert main(["infer", str(tmp_path / "missing.dcm"), "--model", str(tiny_model_dir)]) == EXIT_BAD_INPUT
    assert main(["infer", str(not_an_image), "--tasks", "report,dance"]) == EXIT_BAD_INPUT


def test_missing_model_exits_3(tmp_path: Path, rg1_j2kr: Path, capsys):
    assert main(["infer", str(rg1_j2kr), "--model", str(tmp_path / "no-weights")]) == EXIT_MODEL
    err = capsys.readouterr().err
    assert "model problem" in err and "no-weights" in err and err.count("\n") == 1


def test_console_script_runs_as_a_process(tmp_path: Path):
    completed = subprocess.run([sys.executable, "-m", "dicom_node.cli", "infer", str(tmp_path / "x.dcm"),
                                "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == EXIT_BAD_INPUT
    assert completed.stderr.startswith("radvlm: ")


def test_chat_in_the_terminal(tiny_model_dir: Path, rg1_j2kr: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Provide a radiology report for this Chest X-Ray.\n"
                                                  "Is the heart enlarged?\n/quit\n"))
    assert main(["chat", str(rg1_j2kr), "--model", str(tiny_model_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("radvlm> ") == 2 and "UNVERIFIED" in out


def test_tiny_model_command(tmp_path: Path, capsys):
    assert main(["tiny-model", str(tmp_path / "tiny")]) == EXIT_OK
    assert (tmp_path / "tiny" / "model.safetensors").is_file()
    assert (tmp_path / "tiny" / "processor_config.json").is_file()


def test_infer_writes_sr_gsps_and_fhir_for_the_real_cr(tiny_model_dir: Path, rg1_j2kr: Path, tmp_path: Path):
    import pydicom

    from sr_writer.readback import read_sr_regions

    sr, pr, bundle = tmp_path / "sr.dcm", tmp_path / "pr.dcm", tmp_path / "bundle.json"
    assert main(["infer", str(rg1_j2kr), "--model", str(tiny_model_dir), "--sr", str(sr), "--gsps", str(pr),
                 "--fhir", str(bundle)]) == EXIT_OK
    source = pydicom.dcmread(rg1_j2kr, stop_before_pixels=True)
    written = pydicom.dcmread(sr)
    assert written.StudyInstanceUID == source.StudyInstanceUID and written.PatientID == source.PatientID
    assert written.SeriesInstanceUID != source.SeriesInstanceUID and written.VerificationFlag == "UNVERIFIED"
    assert written.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    read_sr_regions(written)  # readable back through highdicom
    assert pydicom.dcmread(pr).Modality == "PR"
    assert json.loads(bundle.read_text())["resourceType"] == "Bundle"


def test_infer_refuses_a_lateral_or_non_chest_image_unless_forced(tiny_model_dir: Path, tmp_path: Path, capsys):
    """As the node's selector skips them: exit 2 with the reason, or --force with a warning."""
    from tests.dicom_samples import chest_phantom, make_cr_dataset, write

    lateral = write(make_cr_dataset(rows=64, columns=64, pixel_array=chest_phantom(64, 64), view_position="LL",
                                    PatientOrientation=["A", "F"]), tmp_path / "lateral.dcm")
    hand = write(make_cr_dataset(BodyPartExamined="HAND"), tmp_path / "hand.dcm")
    for path, reason in ((lateral, "lateral view: ViewPosition=LL"), (hand, "BodyPartExamined=HAND")):
        assert main(["infer", str(path), "--model", str(tiny_model_dir), "--tasks", "report"]) == EXIT_BAD_INPUT
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "not a frontal chest radiograph" in lines[0] and reason in lines[0], lines
        assert "--force" in lines[0]
    assert main(["infer", str(lateral), "--model", str(tiny_model_dir), "--tasks", "report", "--force"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "warning" in captured.err and "lateral view" in captured.err and "findings:" in captured.out
