"""MIMIC-CXR-JPG (v2.0.0 / v2.1.0) with the MIMIC-CXR free-text reports.

Schema sources:
- PhysioNet MIMIC-CXR-JPG documentation: ``mimic-cxr-2.0.0-split.csv(.gz)`` (dicom_id, study_id,
  subject_id, split ∈ train/validate/test), ``mimic-cxr-2.0.0-metadata.csv(.gz)`` (dicom_id,
  subject_id, study_id, ViewPosition, Rows, Columns, …), ``mimic-cxr-2.0.0-chexpert.csv(.gz)``
  (subject_id, study_id, 14 CheXpert label columns 1/0/-1/blank), images
  ``files/p10/p10000032/s50414267/{dicom_id}.jpg``.
- PhysioNet MIMIC-CXR ``mimic-cxr-reports.zip``: ``files/p10/p10000032/s50414267.txt``.
- Upstream uzh-dqbm-cmi/RadVLM ``radvlm/data/datasets.py`` ``MIMIC_Dataset_MM``: metadata ∩ split
  joined onto the CheXpert table (so only studies with a CheXpert row), split "validate" is
  "valid", frontal = ViewPosition ∈ {PA, AP}; report text = findings, else impression, else
  last paragraph (``reports.csv`` from MIT-LCP ``create_section_files.py``), or the LLM-filtered
  ``filtered_reports/{study_id}.txt``; labels by the MIMIC rule of `label_rules`.
- Upstream ``create_llava_dataset.py``: conversations from
  ``conversations/{train,test}/standard/{dicom_id}.json`` and ``…/grounding/{dicom_id}.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from training.sources.conversation_files import load_turns
from training.sources.errors import MissingSourceFileError, SourceFormatError
from training.sources.label_rules import LABEL_COLUMNS, UNCERTAIN_DEFAULT, Uncertain, mimic_present
from training.sources.report_text import findings_text, pick_sections
from training.sources.samples import SourceSample, Split
from training.sources.tables import find_table, int_id, label_cell, read_csv, text_cell

SOURCE = "mimic_cxr"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
REPORTS_CSV = "reports.csv"
FRONTAL_VIEWS = frozenset({"PA", "AP"})
_SPLIT_NAMES = {"train": "train", "validate": "valid", "test": "test"}

ReportSource = Literal["report_files", "reports_csv", "filtered_reports"]


@dataclass(frozen=True)
class MimicImage:
    dicom_id: str
    subject_id: int
    study_id: int
    split: Split
    view: str
    rows: int
    columns: int
    image: Path


def study_folder(root: Path, subject_id: int, study_id: int) -> Path:
    subject = str(subject_id)
    return Path(root) / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}"


class MimicCxr:
    """Index of one MIMIC-CXR-JPG copy; the tables are read once, on first use."""

    def __init__(self, root: Path, *, reports_root: Path | None = None,
                 report_source: ReportSource = "report_files",
                 conversations_dir: Path | None = None, check_images: bool = True,
                 uncertain: Uncertain = UNCERTAIN_DEFAULT) -> None:
        self.root = Path(root)
        self.reports_root = Path(reports_root) if reports_root else self.root
        self.report_source = report_source
        self.conversations_dir = (Path(conversations_dir) if conversations_dir
                                  else self.root / "conversations")
        self.check_images = check_images
        self.uncertain = uncertain

    # ------------------------------------------------------------------ tables
    @cached_property
    def _labels(self) -> dict[tuple[int, int], tuple[str, ...]]:
        path = find_table(self.root, CHEXPERT_CSV, "MIMIC-CXR CheXpert labels")
        labels = {}
        for line, row in read_csv(path, ("subject_id", "study_id", *LABEL_COLUMNS)):
            key = (int_id(path, line, row, "subject_id"), int_id(path, line, row, "study_id"))
            labels[key] = mimic_present({c: label_cell(path, line, row, c) for c in LABEL_COLUMNS},
                                        self.uncertain)
        return labels

    @cached_property
    def _splits(self) -> dict[tuple[str, int, int], Split]:
        path = find_table(self.root, SPLIT_CSV, "MIMIC-CXR split table")
        splits: dict[tuple[str, int, int], Split] = {}
        for line, row in read_csv(path, ("dicom_id", "study_id", "subject_id", "split")):
            name = (row["split"] or "").strip()
            if name not in _SPLIT_NAMES:
                raise SourceFormatError(path, f"split must be train/validate/test, got {name!r}",
                                        column="split", line=line)
            key = (text_cell(path, line, row, "dicom_id"), int_id(path, line, row, "subject_id"),
                   int_id(path, line, row, "study_id"))
            splits[key] = _SPLIT_NAMES[name]  # type: ignore[assignment]
        return splits

    @cached_property
    def all_images(self) -> tuple[MimicImage, ...]:
        """Every image in metadata ∩ split whose study has a CheXpert row (upstream's join)."""
        path = find_table(self.root, METADATA_CSV, "MIMIC-CXR metadata table")
        images = []
        required = ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns")
        for line, row in read_csv(path, required):
            dicom_id = text_cell(path, line, row, "dicom_id")
            subject = int_id(path, line, row, "subject_id")
            study = int_id(path, line, row, "study_id")
            split = self._splits.get((dicom_id, subject, study))
            if split is None or (subject, study) not in self._labels:
                continue
            images.append(MimicImage(
                dicom_id=dicom_id, subject_id=subject, study_id=study, split=split,
                view=(row["ViewPosition"] or "").strip().upper(),
                rows=int_id(path, line, row, "Rows"), columns=int_id(path, line, row, "Columns"),
                image=study_folder(self.root, subject, study) / f"{dicom_id}.jpg"))
        return tuple(images)

    @cached_property
    def by_dicom_id(self) -> dict[str, MimicImage]:
        return {image.dicom_id: image for image in self.all_images}

    def images(self, split: Split, *, frontal_only: bool = True) -> list[MimicImage]:
        return [image for image in self.all_images if image.split == split
                and (not frontal_only or image.view in FRONTAL_VIEWS)]

    def labels(self, image: MimicImage) -> tuple[str, ...]:
        return self._labels[(image.subject_id, image.study_id)]

    def image_path(self, image: MimicImage) -> str:
        if self.check_images and not image.image.is_file():
            raise MissingSourceFileError(image.image, "MIMIC-CXR-JPG image")
        return str(image.image)

    # ----------------------------------------------------------------- reports
    @cached_property
    def _reports_csv(self) -> dict[int, str]:
        path = find_table(self.root, REPORTS_CSV, "MIMIC-CXR sections table (reports.csv)")
        reports = {}
        for line, row in read_csv(path, ("study", "findings", "impression", "last_paragraph")):
            study = text_cell(path, line, row, "study").lstrip("s")
            if not study.isdigit():
                raise SourceFormatError(path, f"expected s<digits>, got {row['study']!r}",
                                        column="study", line=line)
            reports[int(study)] = pick_sections(row["findings"], row["impression"],
                                                row["last_paragraph"])
        return reports

    def report_text(self, image: MimicImage) -> str | None:
        """The study's report text by the configured source; None where upstream skips it."""
        if self.report_source == "reports_csv":
            return self._reports_csv.get(image.study_id)
        if self.report_source == "filtered_reports":
            path = self.root / "filtered_reports" / f"{image.study_id}.txt"
            if not path.parent.is_dir():
                raise MissingSourceFileError(path.parent, "MIMIC-CXR filtered_reports folder")
            # upstream reads the filtered file as it is (file.read()): inner whitespace kept
            return path.read_text(encoding="utf-8").strip() if path.is_file() else None
        folder = study_folder(self.reports_root, image.subject_id, image.study_id)
        path = folder.with_name(folder.name + ".txt")
        if not path.is_file():
            raise MissingSourceFileError(path, "MIMIC-CXR report (mimic-cxr-reports.zip)")
        return findings_text(path.read_text(encoding="utf-8"))

    # ----------------------------------------------------------------- samples
    def report_samples(self, split: Split) -> list[SourceSample]:
        samples = []
        for image in self.images(split):
            text = self.report_text(image)
            if text:
                samples.append(SourceSample("report", SOURCE, split, self.image_path(image),
                                            text=text))
        return samples

    def classification_samples(self, split: Split) -> list[SourceSample]:
        return [SourceSample("classification", SOURCE, split, self.image_path(image),
                             labels=self.labels(image)) for image in self.images(split)]

    def conversation_samples(self, split: Split, *, grounded: bool,
                             only_dicom_ids: frozenset[str] | None = None) -> list[SourceSample]:
        """Images of ``split`` with a conversation file (upstream keeps only those)."""
        folder = self.conversations_dir / ("test" if split == "test" else "train") / (
            "grounding" if grounded else "standard")
        if not folder.is_dir():
            raise MissingSourceFileError(folder, "MIMIC-CXR conversations folder")
        available = {p.stem for p in folder.glob("*.json")}
        task = "grounded_conversation" if grounded else "conversation"
        samples = []
        # Upstream: grounded conversations with only_frontal=True, standard ones without.
        for image in self.images(split, frontal_only=grounded):
            if image.dicom_id not in available:
                continue
            if only_dicom_ids is not None and image.dicom_id not in only_dicom_ids:
                continue
            samples.append(SourceSample(task, SOURCE, split, self.image_path(image),
                                        turns=load_turns(folder / f"{image.dicom_id}.json")))
        return samples
