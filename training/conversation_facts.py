"""The facts the conversation generator is given, read from the sources of a ``build-dataset`` job.

Upstream (``radvlm/data/llm_generate_conversations.py``) builds each prompt from the dataset
objects: for MIMIC-CXR the (LLM-filtered) report, the CheXpert-style labels, the view and the
gender; for grounded conversations also the MS-CXR phrases (MIMIC images) or the PadChest-GR
sentences with their boxes. `conversation_inputs` does the same from the job file's
``[sources.*]`` tables, so ``radvlm generate-conversations`` runs from the same configuration as
``radvlm build-dataset`` and the image paths match the ones the builder writes:

- ``mimic_cxr``: one standard conversation per image of the split that has a report text
  (``report_source`` as configured — ``"filtered_reports"`` after ``radvlm filter-reports``, as
  the paper); labels by the configured uncertain-label rule; view = ViewPosition; gender from
  MIMIC-IV ``patients.csv`` (``subject_id``, ``gender``) when ``[sources.mimic_cxr]
  patients_csv`` names it (MIMIC-CXR-JPG itself does not carry it; upstream reads a derived
  dicom_id → gender JSON), else none;
- ``ms_cxr``: one grounded conversation per frontal MIMIC image with MS-CXR phrases: the same
  facts plus each phrase with its boxes;
- ``padchest_gr``: one grounded conversation per kept PadChest-GR image: the report is its
  English sentences (upstream passes PadChest's Spanish ``Report`` column; the English sentences
  are the curated text of the same findings and keep the generated conversation in one
  language), the observations the sentences with boxes, the view from ``Projection``, gender
  from the master table; no CheXpert-style labels (PadChest's label set is another one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

from training.conversation_prompt import ConversationInput, GroundedObservation
from training.instructions.config import BuildConfig
from training.sources import ms_cxr, padchest_gr
from training.sources.errors import SourceFormatError
from training.sources.mimic_cxr import FRONTAL_VIEWS, MimicCxr, MimicImage
from training.sources.tables import find_table, int_id, read_csv, read_json, text_cell

FactSource = Literal["mimic_cxr", "ms_cxr", "padchest_gr"]
FACT_SOURCES: tuple[str, ...] = ("mimic_cxr", "ms_cxr", "padchest_gr")


class _Mimic:
    def __init__(self, config: BuildConfig) -> None:
        cfg = config.sources.mimic_cxr
        assert cfg is not None
        self.cfg = cfg
        self.index = MimicCxr(cfg.root, reports_root=cfg.reports_root, report_source=cfg.report_source,
                              check_images=config.check_images, uncertain=config.uncertain_labels)

    @cached_property
    def genders(self) -> dict[int, str]:
        if self.cfg.patients_csv is None:
            return {}
        path = Path(self.cfg.patients_csv)
        table = find_table(path.parent, path.name, "MIMIC-IV patients table")
        return {int_id(table, line, row, "subject_id"): (row["gender"] or "").strip()
                for line, row in read_csv(table, ("subject_id", "gender"))}

    def facts(self, image: MimicImage, prefix: str,
              observations: list[GroundedObservation] | None = None) -> ConversationInput | None:
        report = self.index.report_text(image)
        if not report:
            return None
        return ConversationInput(id=f"{prefix}-{image.dicom_id}", image=self.index.image_path(image), report=report,
                                 labels=list(self.index.labels(image)), view=image.view,
                                 gender=self.genders.get(image.subject_id), observations=observations or [])


def _padchest_sexes(root: Path) -> dict[str, str]:
    table = find_table(root, padchest_gr.MASTER_TABLE, "PadChest-GR master table")
    sexes: dict[str, str] = {}
    for line, row in read_csv(table, ("ImageID",)):
        sexes.setdefault(text_cell(table, line, row, "ImageID"), (row.get("PatientSex_DICOM") or "").strip())
    return sexes


def _padchest_projections(root: Path) -> dict[str, str]:
    table = find_table(root, padchest_gr.PADCHEST_TABLE, "PadChest image table (Projection column)")
    return {row["ImageID"].strip(): (row["Projection"] or "").strip()
            for _, row in read_csv(table, ("ImageID", "Projection"))}


def _padchest_sentences(root: Path) -> dict[str, list[str]]:
    path = Path(root) / padchest_gr.GROUNDED_REPORTS
    data = read_json(path, "PadChest-GR grounded reports")
    if not isinstance(data, list):
        raise SourceFormatError(path, "expected a list of studies")
    sentences: dict[str, list[str]] = {}
    for entry in data:
        if isinstance(entry, dict) and "ImageID" in entry:
            sentences[str(entry["ImageID"])] = [str(f["sentence_en"]).strip() for f in entry.get("findings") or []
                                                if isinstance(f, dict) and str(f.get("sentence_en") or "").strip()]
    return sentences


def conversation_inputs(config: BuildConfig, split: Literal["train", "test"] = "train",
                        sources: Sequence[str] = FACT_SOURCES) -> Iterator[ConversationInput]:
    """The facts of every image of ``split`` in the configured ``sources`` (in that order);
    a source the job file does not configure contributes nothing."""
    unknown = [name for name in sources if name not in FACT_SOURCES]
    if unknown:
        raise ValueError(f"unknown fact source(s) {unknown}; known: {', '.join(FACT_SOURCES)}")
    s = config.sources
    mimic = _Mimic(config) if s.mimic_cxr is not None else None
    if "mimic_cxr" in sources and mimic is not None:
        for image in mimic.index.images(split, frontal_only=False):
            item = mimic.facts(image, "mimic")
            if item is not None:
                yield item
    if "ms_cxr" in sources and mimic is not None and s.ms_cxr is not None:
        phrases = ms_cxr.read_phrases(s.ms_cxr.root, s.ms_cxr.csv_name)
        splits = ("train", "valid") if split == "train" else ("test",)   # as the builder's MS-CXR component
        for part in splits:
            for image in mimic.index.images(part):  # type: ignore[arg-type]
                if image.dicom_id in phrases and image.view in FRONTAL_VIEWS:
                    observations = [GroundedObservation(text=phrase, boxes=[list(b) for b in boxes])
                                    for phrase, boxes in phrases[image.dicom_id].items()]
                    item = mimic.facts(image, "mscxr", observations)
                    if item is not None:
                        yield item
    if "padchest_gr" in sources and s.padchest_gr is not None:
        root = s.padchest_gr.root
        sexes, sentences, views = _padchest_sexes(root), _padchest_sentences(root), _padchest_projections(root)
        splits = ("train", "valid") if split == "train" else ("test",)
        for part in splits:
            grounded = padchest_gr.read_grounded(root, part, s.padchest_gr.images_dir,  # type: ignore[arg-type]
                                                 config.check_images)
            for image_id, image, findings in grounded:
                observations = [GroundedObservation(text=sentence, boxes=[list(b) for b in boxes])
                                for sentence, boxes in findings]
                report = " ".join(sentences.get(image_id) or [sentence for sentence, _ in findings])
                yield ConversationInput(id=f"padchest-{Path(image_id).stem}", image=image, report=report,
                                        view=views.get(image_id), gender=sexes.get(image_id),
                                        observations=observations)


def load_build_config(path: Path) -> BuildConfig:
    """A ``build-dataset`` job file, relative paths taken from its folder."""
    from config import load_typed_config

    path = Path(path)
    return load_typed_config(BuildConfig, path, environ={}).resolved(path.parent.resolve())
