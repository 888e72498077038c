"""CheXpert-Plus report generation.

Schema sources:
- Stanford AIMI CheXpert-Plus release: ``df_chexpert_plus_240401.csv`` with ``path_to_image``
  (``train/patient42142/study5/view1_frontal.jpg``), ``frontal_lateral`` (Frontal/Lateral),
  ``split`` (train/valid) and the report sections ``section_findings``,
  ``section_impression``, ``section_end_of_impression`` …; images as PNG under
  ``PNG/{path_to_image with .png}``.
- Upstream uzh-dqbm-cmi/RadVLM ``radvlm/data/datasets.py`` ``CheXpertPlus_Dataset``: train =
  split "train", test = split "valid" (the release has no other held-out part); frontal =
  ``frontal_lateral == "Frontal"``; text = the three sections concatenated (upstream joins them
  without a separator and then ``str.capitalize()``s the result, which lower-cases acronyms;
  we join with a space and keep the case), or the LLM-filtered
  ``filtered_reports/{first three path parts joined by _}.txt`` (only images with one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from training.sources.errors import MissingSourceFileError, SourceFormatError
from training.sources.samples import SourceSample, Split
from training.sources.tables import find_table, read_csv, text_cell

SOURCE = "chexpert_plus"
REPORTS_CSV = "df_chexpert_plus_240401.csv"
SECTION_COLUMNS = ("section_findings", "section_impression", "section_end_of_impression")
_CSV_SPLIT = {"train": "train", "test": "valid"}

ReportSource = Literal["csv_sections", "filtered_reports"]


def report_samples(root: Path, split: Split, *, report_source: ReportSource = "csv_sections",
                   check_images: bool = True) -> list[SourceSample]:
    if split not in _CSV_SPLIT:
        raise SourceFormatError(Path(root) / REPORTS_CSV,
                                "CheXpert-Plus has no validation split (upstream trains on all of "
                                "'train' and tests on 'valid')", column="split")
    path = find_table(root, REPORTS_CSV, "CheXpert-Plus report table")
    filtered = Path(root) / "filtered_reports"
    if report_source == "filtered_reports" and not filtered.is_dir():
        raise MissingSourceFileError(filtered, "CheXpert-Plus filtered_reports folder")
    samples = []
    for line, row in read_csv(path, ("path_to_image", "frontal_lateral", "split",
                                     *SECTION_COLUMNS)):
        if row["split"].strip() != _CSV_SPLIT[split] or row["frontal_lateral"].strip() != "Frontal":
            continue
        relative = text_cell(path, line, row, "path_to_image")
        if report_source == "filtered_reports":
            report_file = filtered / ("_".join(relative.split("/")[:3]) + ".txt")
            if not report_file.is_file():
                continue
            text = " ".join(report_file.read_text(encoding="utf-8").split())
        else:
            text = " ".join(" ".join(row[c] for c in SECTION_COLUMNS if row[c]).split())
        if not text:
            continue
        image = Path(root) / "PNG" / relative.replace(".jpg", ".png")
        if check_images and not image.is_file():
            raise MissingSourceFileError(image, f"CheXpert-Plus image ({path.name} line {line})")
        samples.append(SourceSample("report", SOURCE, split, str(image), text=text))
    return samples
