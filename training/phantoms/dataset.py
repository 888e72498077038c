"""Write a phantom data set to disk: PNG, DICOM, truth, LLaVA instructions and a manifest.

Layout under `out`::

    manifest.json              generator version, seed, config, counts, sha256 of every file
    truth.jsonl                one RadVLM-format truth record per study (records.truth_record)
    instructions.json          LLaVA-style records (id, image, conversations)
    images/phantom_000000.png  8-bit display image (what the model sees)
    dicom/phantom_000000/frontal.dcm   CR/DX, PA or AP
    dicom/phantom_000000/lateral.dcm   LL/RL, only for some studies (a node must skip it)

Everything is a function of (seed, indices, config): the same call writes identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from training.phantoms.dicom_export import frontal_dataset, lateral_dataset, write_dataset
from training.phantoms.records import TASKS, Variants, instruction_records, truth_record, with_regions
from training.phantoms.sampler import GENERATOR_VERSION, PhantomConfig, PhantomSampler

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class DatasetSummary:
    out: Path
    count: int
    instructions: int
    dicom_files: int
    laterals: int
    seconds: float


def png_bytes(pixels) -> bytes:
    """Deterministic PNG encoding of an 8-bit grayscale array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def write_phantom_dataset(out: str | Path, count: int, seed: int = 0, *, start: int = 0,
                          config: PhantomConfig | None = None, dicom: bool = True,
                          png: bool = True, dicom_scale: int = 1,
                          variants: Variants = "random",
                          tasks: tuple[str, ...] = TASKS,
                          regions: tuple[str, ...] | None = None) -> DatasetSummary:
    """Generate phantoms `start … start+count−1` of `seed` into `out` (created if needed).

    ``regions``: ask anatomical-grounding questions only about these (default: every region drawn);
    the truth file keeps all regions.
    """
    if count < 1:
        raise ValueError("count must be ≥ 1")
    began = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sampler = PhantomSampler(seed, config)
    files: dict[str, str] = {}
    truths: list[str] = []
    instructions: list[dict] = []
    dicom_files = laterals = 0
    for index in range(start, start + count):
        phantom = sampler.sample(index)
        stem = f"phantom_{index:06d}"
        image_rel = f"images/{stem}.png"
        if png:
            files[image_rel] = _write(out / image_rel, png_bytes(phantom.pixels))
        dicom_rel: list[str] = []
        if dicom:
            datasets = [("frontal", frontal_dataset(phantom, dicom_scale)),
                        ("lateral", lateral_dataset(phantom, dicom_scale))]
            for role, ds in datasets:
                if ds is None:
                    continue
                rel = f"dicom/{stem}/{role}.dcm"
                write_dataset(ds, out / rel)
                files[rel] = _sha256((out / rel).read_bytes())
                dicom_rel.append(rel)
                dicom_files += 1
                laterals += role == "lateral"
        truths.append(json.dumps(truth_record(phantom, image_rel if png else None, dicom_rel)))
        instructions += instruction_records(with_regions(phantom, regions), image_rel, variants, tasks)
    files["truth.jsonl"] = _write(out / "truth.jsonl", ("\n".join(truths) + "\n").encode())
    files["instructions.json"] = _write(
        out / "instructions.json", json.dumps(instructions, indent=1).encode())
    manifest = {
        "generator": "training.phantoms", "generator_version": GENERATOR_VERSION,
        "seed": seed, "start": start, "count": count, "config": sampler.config.as_dict(),
        "dicom_scale": dicom_scale, "variants": variants, "tasks": list(tasks),
        "regions": list(regions) if regions else None,
        "instructions": len(instructions), "dicom_files": dicom_files, "laterals": laterals,
        "notice": "Synthetic chest phantoms for testing and demonstration; not patient data.",
        "files": dict(sorted(files.items())),
    }
    _write(out / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    return DatasetSummary(out=out, count=count, instructions=len(instructions),
                          dicom_files=dicom_files, laterals=laterals,
                          seconds=time.perf_counter() - began)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return _sha256(data)
