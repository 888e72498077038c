"""Coverage-guided fuzz of the node's per-instance pipeline (issue 12): parse (the selector's
header read) → select (classify) → decode (load_image: pixel data, modality/VOI LUTs) →
preprocess (the tiny model's processor) → write (SR + GSPS + FHIR bundle of a fixed result with a
box, against the mutated header, as the worker writes them). Engine: atheris (libFuzzer, coverage of pydicom and the
project's `inference`/`dicom_node` modules) when it is installed, otherwise a seeded byte-mutation
fuzzer over the same target (`--mutation`).

Contract checked per input: the header read may refuse (the node records such an instance
"unreadable"); classify never raises; load_image raises only the project's InputImageError family;
preprocessing a decoded image never raises; the writers raise only WriterError. Anything else is an *escape*, counted by exception type
and the last project/library code site (not raised, so a run always completes its N inputs).

Run: .venv/bin/python -m tests.reliability.long.fuzz_pipeline [N=10000] [SEED=1] [--mutation]
"""

from __future__ import annotations

import collections
import io
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

N_DEFAULT = 10000


def _seeds() -> list[bytes]:
    from pydicom.uid import RLELossless

    from tests.dicom_samples import chest_phantom, make_cr_dataset

    datasets = [
        make_cr_dataset(rows=32, columns=32, pixel_array=chest_phantom(32, 32), view_position="PA"),
        make_cr_dataset(rows=32, columns=32, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096,
                        view_position="AP"),
        make_cr_dataset(rows=32, columns=24, view_position="LL", RescaleSlope=2, RescaleIntercept=-1024),
        make_cr_dataset(rows=32, columns=32, view_position=None, NumberOfFrames=1),
    ]
    datasets[3].compress(RLELossless)
    out = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


class Target:
    def __init__(self, work: Path) -> None:
        from dicom_node.selector import Candidate, classify, read_header
        from inference.errors import InputImageError
        from inference.image import load_image
        from inference.processor import load_processor
        from inference.tiny import build_tiny_model

        self.Candidate, self.classify, self.read_header = Candidate, classify, read_header
        self.InputImageError, self.load_image = InputImageError, load_image
        self.processor = load_processor(build_tiny_model(work / "model", seed=0))
        from config.settings import SRSettings
        from inference.errors import RadVLMError
        from inference.labels import LABELS
        from inference.result import Box, ModelInfo, Region, StudyResult
        from sr_writer import write_outputs

        self.RadVLMError, self.write_outputs, self.StudyResult = RadVLMError, write_outputs, StudyResult
        self.template = dict(model=ModelInfo(model_id="radvlm-fuzz", version="1.0.0", weights_sha256="ab" * 32),
                             findings_text="Heart size is enlarged.", labels={l: l == "cardiomegaly" for l in LABELS},
                             regions=(Region(task="abnormality_grounding", query="cardiomegaly", label="cardiomegaly",
                                             boxes=(Box(x1=0.3, y1=0.4, x2=0.75, y2=0.8),)),))
        self.sr_settings = SRSettings(fhir_patient_identifier_system="urn:oid:1.2.3")
        self.out = work / "out"
        self.path = work / "input.dcm"
        self.stats: collections.Counter[str] = collections.Counter()
        self.escapes: collections.Counter[str] = collections.Counter()
        self.started = time.monotonic()
        self.final: tuple[str, int, int] | None = None

    def _escape(self, stage: str, exc: BaseException) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        site = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)
                     if "/work/" in f.filename and "site-packages" not in f.filename), None) \
            or (f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?")
        self.escapes[f"{stage} {type(exc).__name__} at {site}"] += 1

    def __call__(self, data: bytes) -> None:
        self.stats["inputs"] += 1
        try:
            self._run(data)
        finally:
            if self.final is not None and self.stats["inputs"] == self.final[1]:
                self.report(*self.final)  # libFuzzer leaves without running atexit handlers

    def _run(self, data: bytes) -> None:
        self.path.write_bytes(data)
        try:
            header = self.read_header(self.path)
            candidate = self.Candidate("1.2.3", header)
        except Exception as exc:  # the node records the instance as unreadable
            self.stats["header refused"] += 1
            candidate = self.Candidate("1.2.3", None, f"{type(exc).__name__}")
        try:
            decision = self.classify(candidate).decision
            self.stats[f"select {decision}"] += 1
        except Exception as exc:
            self._escape("select", exc)
        try:
            image = self.load_image(self.path)
        except self.InputImageError:
            self.stats["decode refused (project error)"] += 1
            return
        except Exception as exc:
            self._escape("decode", exc)
            return
        self.stats["decoded"] += 1
        try:
            self.processor(images=[image.to_pil_rgb()], return_tensors="pt")
            self.stats["preprocessed"] += 1
        except Exception as exc:
            self._escape("preprocess", exc)
        try:  # the worker: the typed result for this image, written against the source header
            from pydicom import dcmread

            result = self.StudyResult(source=image.source, **self.template)
            written = self.write_outputs(result, dcmread(self.path), self.sr_settings, sr_path=self.out / "sr.dcm",
                                         gsps_path=self.out / "gsps.dcm", fhir_path=self.out / "bundle.json")
            self.stats["written"] += 1
            if written.gsps_skipped_reason:
                self.stats["written, GSPS skipped"] += 1
        except self.RadVLMError:
            self.stats["write refused (project error)"] += 1
        except Exception as exc:
            self._escape("write", exc)

    def report(self, engine: str, n: int, seed: int) -> None:
        seconds = time.monotonic() - self.started
        print(f"\nfuzz_pipeline engine {engine}, inputs run {self.stats['inputs']} (asked {n}, seed {seed}), "
              f"{seconds:.0f}s", flush=True)
        for key in sorted(k for k in self.stats if k != "inputs"):
            print(f"  {key}: {self.stats[key]}")
        print(f"  escapes: {sum(self.escapes.values())}")
        for key, count in self.escapes.most_common(20):
            print(f"    {count:5d} {key}")
        print("OK" if not self.escapes and self.stats["inputs"] >= n else "FAILED", flush=True)


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 6)):
        pos = rng.randrange(132, len(data))
        op = rng.random()
        if op < 0.5:
            data[pos] = rng.randrange(256)
        elif op < 0.7:
            data[pos:pos + 2] = bytes(rng.randrange(48, 58) for _ in range(2))
        elif op < 0.85:
            data[pos:pos + 4] = b"ab\\x"
        else:  # truncate or duplicate a chunk
            cut = rng.randrange(pos, len(data))
            data = data[:pos] + data[cut:] if rng.random() < 0.5 else data[:cut] + data[pos:cut] + data[cut:]
    return bytes(data)


def main(argv: list[str]) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")  # pydicom's per-input validation warnings: noise at this volume
    logging.disable(logging.WARNING)
    mutation = "--mutation" in argv
    args = [int(a) for a in argv if not a.startswith("-")]
    n = args[0] if args else N_DEFAULT
    seed = args[1] if len(args) > 1 else 1
    work = Path(tempfile.mkdtemp(prefix="fuzz-pipeline-"))
    if not mutation:
        try:
            import atheris
        except ImportError:
            print("atheris not installed: mutation fuzzer", flush=True)
            mutation = True
    if mutation:
        target = Target(work)
        rng = random.Random(seed)
        seeds = _seeds()
        for _ in range(n):
            target(_mutate(rng, rng.choice(seeds)))
        target.report("mutation", n, seed)
        return 0 if not target.escapes else 1
    with atheris.instrument_imports(include=["pydicom", "inference", "dicom_node"]):
        target = Target(work)
    corpus = work / "corpus"
    corpus.mkdir()
    for i, data in enumerate(_seeds()):
        (corpus / f"seed{i}.dcm").write_bytes(data)
    target.final = ("atheris (libFuzzer, coverage-guided)", n, seed)
    atheris.Setup([sys.argv[0], f"-runs={n}", f"-seed={seed}", "-max_len=16384", "-rss_limit_mb=4096",
                   "-timeout=60", "-print_final_stats=1", str(corpus)], target)
    atheris.Fuzz()  # exits the process after N runs; the report runs at exit
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
