"""No-mix-up run (issue 12): S studies of P patients, their instances interleaved over two
concurrent associations to a running `radvlm serve` (tiny model, loopback, folder destination
with SR + FHIR bundle). Every SR and every FHIR bundle is checked against its source study:

* SR: Patient ID, Patient Name, Study Instance UID equal the source's; every referenced SOP
  Instance UID is an instance of that study, and the instance the node selected is referenced;
* bundle: the Patient identifier and every subject identifier are the source's Patient ID, the
  ImagingStudy is the source study and lists the selected source instance, the DiagnosticReport
  carries the SR's SOP Instance UID, and no other patient's ID occurs anywhere in the bundle.

A study failing any check is a mix-up; the count must be 0.

Run: .venv/bin/python -m tests.reliability.long.mixup [STUDIES=500] [PATIENTS=100] [SEED=5]
"""

from __future__ import annotations

import collections
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from inference.tiny import build_tiny_model
from tests.dicom_samples import chest_phantom, make_cr_dataset
from tests.reliability.long.node_proc import TERMINAL, Serve, db, stream, write_config


def _patient_id(p: int) -> str:
    return f"MIXP{p:04d}Z"  # fixed width + end marker: no ID is a substring of another


def _referenced_sops(ds: Dataset) -> set[str]:
    found = set()
    for element in ds.iterall():
        if element.keyword == "ReferencedSOPInstanceUID":
            found.add(str(element.value))
    return found


def _walk(value, key: str):
    if isinstance(value, dict):
        for k, v in value.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)


def check_study(study: str, out: Path, source: dict, selected: str | None, all_ids: set[str]) -> list[str]:
    """The problems of one study's outputs (empty: no mix-up)."""
    problems = []
    srs = sorted(out.glob("*.dcm")) if out.is_dir() else []
    if len(srs) != 1:
        return [f"{len(srs)} SR files"]
    sr = dcmread(srs[0])
    if str(sr.PatientID) != source["patient_id"]:
        problems.append("SR PatientID")
    if str(sr.PatientName) != source["patient_name"]:
        problems.append("SR PatientName")
    if str(sr.StudyInstanceUID) != study:
        problems.append("SR StudyInstanceUID")
    refs = _referenced_sops(sr)
    if not refs or not refs <= source["sops"]:
        problems.append("SR references an instance of another study")
    if selected is None or selected not in refs:
        problems.append("SR does not reference the selected instance")
    bundle_path = out / "bundle.json"
    if not bundle_path.is_file():
        return problems + ["no FHIR bundle"]
    text = bundle_path.read_text()
    bundle = json.loads(text)
    resources = [e["resource"] for e in bundle["entry"]]
    pid = source["patient_id"]
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    if not patients or any(i.get("value") != pid for p in patients for i in p["identifier"]):
        problems.append("FHIR Patient identifier")
    for subject in _walk(bundle, "subject"):
        ident = subject.get("identifier") if isinstance(subject, dict) else None
        if ident is not None and ident.get("value") != pid:
            problems.append("FHIR subject identifier")
            break
    studies = [r for r in resources if r["resourceType"] == "ImagingStudy"]
    if not studies or any({"value": f"urn:oid:{study}"} not in
                          [{"value": i.get("value")} for i in s["identifier"]] for s in studies):
        problems.append("FHIR ImagingStudy UID")
    listed = {i["uid"] for s in studies for series in s.get("series", []) for i in series.get("instance", [])}
    if selected not in listed or not listed - {str(sr.SOPInstanceUID)} <= source["sops"]:  # + the SR's own series
        problems.append("FHIR ImagingStudy instances")
    reports = [r for r in resources if r["resourceType"] == "DiagnosticReport"]
    if not reports or not any(i.get("value") == f"urn:oid:{sr.SOPInstanceUID}" for r in reports
                              for i in r["identifier"]):
        problems.append("FHIR DiagnosticReport SR UID")
    if any(other in text for other in all_ids - {pid}):
        problems.append("another patient's ID in the bundle")
    return problems


def main(n_studies: int = 500, n_patients: int = 100, seed: int = 5) -> int:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="long-mixup-"))
    config = write_config(work, build_tiny_model(work / "model", seed=0))
    sources: dict[str, dict] = {}
    instances = []
    for s in range(n_studies):
        p = s % n_patients
        pid, name = _patient_id(p), f"MIX^PATIENT{p:04d}"
        study = make_cr_dataset().StudyInstanceUID
        views = ["PA", "LL"] if rng.random() < 0.7 else ["AP"]
        batch = [make_cr_dataset(rows=48, columns=48, pixel_array=chest_phantom(48, 48), view_position=v,
                                 study_instance_uid=study, patient_id=pid, patient_name=name) for v in views]
        sources[str(study)] = {"patient_id": pid, "patient_name": name,
                               "sops": {str(ds.SOPInstanceUID) for ds in batch}}
        instances += batch
    rng.shuffle(instances)  # studies and patients interleaved on the wire
    halves = [instances[0::2], instances[1::2]]
    all_ids = {_patient_id(p) for p in range(n_patients)}
    node = Serve(config)
    started = time.monotonic()
    try:
        acked: list[list[str]] = [[], []]
        answers: list[dict[str, int]] = [{}, {}]
        threads = [threading.Thread(target=stream, args=(node.port, h, acked[i], answers[i], f"MIX{i + 1}"),
                                    daemon=True) for i, h in enumerate(halves)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(1800)
        ingest = time.monotonic() - started
        data = work / "data"
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            done = {s for s, state in db(data, "SELECT study_instance_uid, state FROM studies") if state in TERMINAL}
            if done >= set(sources):
                break
            time.sleep(0.5)
        total = time.monotonic() - started
        states = dict(db(data, "SELECT study_instance_uid, state FROM studies"))
        selected = dict(db(data, "SELECT study_instance_uid, selected_sop_instance_uid FROM studies"))
    finally:
        code = node.term()
    mixups: dict[str, list[str]] = {}
    for study, source in sources.items():
        problems = check_study(study, work / "out" / study, source, selected.get(study), all_ids)
        if problems:
            mixups[study] = problems
    kinds = collections.Counter(p for ps in mixups.values() for p in ps)
    # the checker itself: study A's outputs checked against study B's source (another patient) must fail
    a, b = next((x, y) for x in sources for y in sources
                if sources[x]["patient_id"] != sources[y]["patient_id"])
    swap_detected = bool(check_study(a, work / "out" / a, sources[b], selected.get(a), all_ids))
    n_acked = sum(len(a) for a in acked)
    print(f"studies {n_studies} of {n_patients} patients, {len(instances)} instances interleaved on 2 associations;"
          f" acknowledged {n_acked}; states {dict(collections.Counter(states.values()))}")
    print(f"checked {len(sources)} SRs + FHIR bundles: mix-ups {len(mixups)} {dict(kinds)}; "
          f"ingest {ingest:.1f}s, all terminal after {total:.1f}s; node exit {code}")
    print(f"checker self-test: a deliberate swap detected {swap_detected}")
    ok = not mixups and n_acked == len(instances) and code == 0 and swap_detected
    print("OK" if ok else "FAILED")
    shutil.rmtree(work, ignore_errors=True) if ok else print(f"kept {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:])))
