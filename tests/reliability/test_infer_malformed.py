"""`radvlm infer` on malformed files (issue 12 item 10): exit 2 with one line, never a traceback;
the pipeline's decoding and building errors are the project's specific exceptions. A bounded,
seeded mutation fuzz of load_image → run_study → write_outputs (the long one: 1,000 inputs,
docs/reliability figures) checks that nothing else escapes."""

from __future__ import annotations

import io
import random

import pytest
from pydicom.uid import RLELossless

from config.settings import InferenceSettings, SRSettings
from dicom_node.cli import main
from inference.errors import RadVLMError
from inference.image import load_image
from inference.tasks import run_study
from sr_writer import write_outputs
from tests.dicom_samples import DEFAULT_PATIENT_ID, make_cr_dataset


def _encoded(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_vr(data: bytes, tag: bytes, vr: bytes) -> bytes:
    at = data.index(tag)
    return data[:at + 4] + vr + data[at + 6:]


@pytest.mark.parametrize("name, mutate", [
    # an unknown VR on the Patient ID: the SR writer's copy of the header fails
    ("unknown-vr-patient-id", lambda d: _with_vr(d, b"\x10\x00\x20\x00LO", b"ZZ")),
    # an unknown VR on Photometric Interpretation: the image pipeline fails
    ("unknown-vr-photometric", lambda d: _with_vr(d, b"\x28\x00\x04\x00CS", b"ZZ")),
])
def test_infer_on_a_malformed_file_exits_2_with_one_line(tmp_path, tiny_model_dir, capsys, name, mutate):
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(mutate(_encoded(make_cr_dataset(rows=32, columns=32))))
    code = main(["infer", str(path), "--model", str(tiny_model_dir), "--tasks", "report",
                 "--sr", str(tmp_path / "sr.dcm"), "--force"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    ours = [line for line in err.splitlines() if line.startswith("radvlm")]  # not transformers' progress bars
    assert len(ours) == 1 and ours[0].startswith("radvlm: ") and "Traceback" not in err
    assert DEFAULT_PATIENT_ID not in err
    assert not (tmp_path / "sr.dcm").exists()


def test_mutation_fuzz_raises_only_project_errors(tmp_path, tiny_model):
    """120 seeded mutants of three seeds: decode every mutant, write SR/GSPS/FHIR for it with the
    model's result for its unmutated seed (one model run per seed keeps this fast)."""
    from pydicom import dcmread

    rng = random.Random(12)
    datasets = [make_cr_dataset(rows=32, columns=32),
                make_cr_dataset(rows=32, columns=32, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096),
                make_cr_dataset(rows=32, columns=32)]
    datasets[2].compress(RLELossless)
    seeds = []
    for n, ds in enumerate(datasets):
        path = tmp_path / f"seed{n}.dcm"
        path.write_bytes(_encoded(ds))
        seeds.append((path.read_bytes(), run_study(tiny_model, load_image(path), InferenceSettings(tasks=["report"]))))
    outcomes = {"ok": 0, "refused": 0}
    settings = SRSettings(fhir_patient_identifier_system="urn:oid:1.2.3")
    for n in range(120):
        seed, result = rng.choice(seeds)
        data = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(132, len(data))
            op = rng.random()
            if op < 0.6:
                data[pos] = rng.randrange(256)
            elif op < 0.8:
                data[pos:pos + 2] = bytes(rng.randrange(48, 58) for _ in range(2))
            else:
                data[pos:pos + 4] = b"ab\\x"
        path = tmp_path / f"m{n}.dcm"
        path.write_bytes(bytes(data))
        try:
            load_image(path)
            write_outputs(result, dcmread(path), settings, sr_path=tmp_path / "o" / "sr.dcm",
                          gsps_path=tmp_path / "o" / "gsps.dcm", fhir_path=tmp_path / "o" / "bundle.json")
            outcomes["ok"] += 1
        except RadVLMError:
            outcomes["refused"] += 1
    assert outcomes["ok"] > 20 and outcomes["refused"] > 20, outcomes


def test_chat_url_sends_pixels_only(tmp_path):
    """`radvlm chat FILE --url`: the request carries a PNG of the windowed image, never the DICOM
    header (patient name, ID, birth date, accession number, institution)."""
    import base64

    import numpy as np
    from PIL import Image

    from inference.api_client import image_url_for_file
    from tests.dicom_samples import DEFAULT_PATIENT_NAME, chest_phantom, write

    ds = make_cr_dataset(rows=40, columns=32, pixel_array=chest_phantom(40, 32), photometric="MONOCHROME1",
                         AccessionNumber="ACC-778899", InstitutionName="Hospital Zyx", PatientBirthDate="19500101")
    path = write(ds, tmp_path / "cr.dcm")
    url = image_url_for_file(path)
    assert url.startswith("data:image/png;base64,")
    payload = base64.b64decode(url.split(",", 1)[1])
    for value in (DEFAULT_PATIENT_ID, DEFAULT_PATIENT_NAME, "ACC-778899", "Hospital Zyx", "19500101", "DICM"):
        assert value.encode() not in payload
    png = np.asarray(Image.open(io.BytesIO(payload)))
    assert png.shape == (40, 32) and np.array_equal(png, load_image(path).pixels)


def test_library_warnings_that_quote_header_values_are_not_printed():
    """pydicom and highdicom warn with the value (``Invalid value for VR DA: '…'``, ``The string
    "…" is unlikely to represent the intended person name``): the node's log redaction drops the
    warning copies and redacts pydicom's log records."""
    import logging
    import warnings

    from highdicom.valuerep import check_person_name

    from dicom_node.phi import install_log_redaction, redact

    install_log_redaction()
    with warnings.catch_warnings(record=True) as caught:
        check_person_name("Qzxvsecret")
        with_bad_date = make_cr_dataset()
        with_bad_date.PatientBirthDate = "Qzxv 1950"
    assert not [w for w in caught if "Qzxv" in str(w.message)]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("pydicom").warning("Invalid value for VR DA: 'Qzxv 1950'")
    finally:
        logging.getLogger().removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Invalid value for VR DA: '…'"]
    assert redact("Unable to convert 'Qzxv' to 'DA' object") == "Unable to convert '…' to 'DA' object"
