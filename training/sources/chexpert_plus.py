"""CheXpert-Plus report generation.

Schema sources:
- Stanford AIMI CheXpert-Plus release: ``df_chexpert_plus_240401.csv`` with ``path_to_image``
  (``train/patient42142/study5/view1_frontal.jpg``), ``frontal_lateral`` (Frontal/Lateral),
  ``split`` (train/valid) and the report sections ``section_findings``,
  ``section_impression``, ``section_end_of_impression`` …. Images: today's layout (and current
  upstream) ``root/<path_to_image>``; the older PNG export ``root/PNG/<path_to_image>.png`` is
  also found. The first that exists is used.
- Upstream uzh-dqbm-cmi/RadVLM ``radvlm/data/datasets.py`` ``CheXpertPlus_Dataset``: train =
  split "train", test = split "valid" (the release has no other held-out part); frontal =
  ``frontal_lateral == "Frontal"``.
- Report target, as the paper: the findings section, else the impression (never
  ``section_end_of_impression``, which holds sign-off boilerplate such as "I have personally
  reviewed the images…"), cleaned of references to prior studies by an LLM
  (``radvlm filter-reports`` writes ``filtered_reports/{first three path parts joined by _}.txt``,
  upstream's names; ``report_source = "filtered_reports"`` reads them, only images with one).
  Whitespace is kept as the text has it (upstream ``file.read()``); line breaks inside a CSV
  section become spaces (upstream deletes them, which glues the words on either side).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from training.sources.errors import MissingSourceFileError, SourceFormatError
from training.sources.samples import SourceSample, Split
from training.sources.tables import find_table, read_csv, text_cell

SOURCE = "chexpert_plus"
REPORTS_CSV = "df_chexpert_plus_240401.csv"
SECTION_COLUMNS = ("section_findings", "section_impression")
_CSV_SPLIT = {"train": "train", "test": "valid"}

ReportSource = Literal["csv_sections", "filtered_reports"]


def section_text(row: dict[str, str]) -> str:
    """Findings, else impression (stripped; line breaks → spaces); "" when both are empty."""
    for column in SECTION_COLUMNS:
        text = (row.get(column) or "").replace("\r\n", " ").replace("\n", " ").strip()
        if text:
            return text
    return ""


def filtered_report_name(path_to_image: str) -> str:
    """Upstream's file name in ``filtered_reports/``: the first three path parts joined by _."""
    return "_".join(path_to_image.split("/")[:3]) + ".txt"


def image_file(root: Path, path_to_image: str, *, check: bool = True, where: str = "") -> Path:
    """``root/<path_to_image>`` (today's layout), else ``root/PNG/<path_to_image>.png`` (older
    PNG export); with ``check`` a missing image in both names both."""
    current = Path(root) / path_to_image
    png = Path(root) / "PNG" / str(Path(path_to_image).with_suffix(".png"))
    for candidate in (current, png):
        if candidate.is_file():
            return candidate
    if check:
        raise MissingSourceFileError(current, f"CheXpert-Plus image{where} (nor {png})")
    return current


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
            report_file = filtered / filtered_report_name(relative)
            if not report_file.is_file():
                continue
            text = report_file.read_text(encoding="utf-8").strip()
        else:
            text = section_text(row)
        if not text:
            continue
        image = image_file(root, relative, check=check_images, where=f" ({path.name} line {line})")
        samples.append(SourceSample("report", SOURCE, split, str(image), text=text))
    return samples
