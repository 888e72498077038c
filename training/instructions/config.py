"""Typed job file of ``radvlm build-dataset`` (TOML, loaded by ``config.load_typed_config``).

Example::

    seed = 0
    splits = ["train", "test"]
    [sources.mimic_cxr]
    root = "/data/MIMIC-CXR-JPG"
    [sources.vindr_cxr]
    root = "/data/VinDr-CXR"
    [mix]
    vindr_cxr_detection = 2          # repeat factor; 0 leaves the component out

Relative paths are resolved against the folder of the job file. Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from training.sources.ms_cxr import DEFAULT_CSV as MS_CXR_DEFAULT_CSV
from training.sources.wbf import UPSTREAM_IOU_THR


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MimicCxrSource(_Strict):
    root: Path = Field(description="MIMIC-CXR-JPG folder (the three CSVs and files/)")
    reports_root: Path | None = Field(
        None, description="folder holding files/pXX/pXXXXXXXX/sXXXXXXXX.txt (default: root)")
    report_source: Literal["report_files", "reports_csv", "filtered_reports"] = "report_files"
    conversations_dir: Path | None = Field(None, description="default: root/conversations")
    patients_csv: Path | None = Field(
        None, description="MIMIC-IV hosp/patients.csv(.gz) (subject_id, gender): the gender given to the "
                          "conversation generator (MIMIC-CXR-JPG does not carry it)")


class ChexpertSource(_Strict):
    root: Path


class ChexpertPlusSource(_Strict):
    root: Path
    report_source: Literal["csv_sections", "filtered_reports"] = "csv_sections"


class ChestImaGenomeSource(_Strict):
    root: Path = Field(description="folder holding silver_dataset/ (needs sources.mimic_cxr)")


class VindrCxrSource(_Strict):
    root: Path
    iou_thr: float = Field(UPSTREAM_IOU_THR, gt=0.0, lt=1.0)


class MsCxrSource(_Strict):
    root: Path = Field(description="MS-CXR folder (needs sources.mimic_cxr)")
    csv_name: str = MS_CXR_DEFAULT_CSV


class PadchestGrSource(_Strict):
    root: Path
    images_dir: str = "images_grounding"
    conversations_dir: Path | None = Field(
        None, description="default: root/conversations/train/grounding")


class GeneratedConversationsSource(_Strict):
    files: list[Path] = Field(min_length=1, description="JSONL written by generate-conversations")


class SiteSource(_Strict):
    folder: Path = Field(description="the hospital's DICOM CXRs with their final reports")
    pseudonym_salt: SecretStr = Field(min_length=16, description="site secret for image names")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)


class Sources(_Strict):
    mimic_cxr: MimicCxrSource | None = None
    chexpert: ChexpertSource | None = None
    chexpert_plus: ChexpertPlusSource | None = None
    chest_imagenome: ChestImaGenomeSource | None = None
    vindr_cxr: VindrCxrSource | None = None
    ms_cxr: MsCxrSource | None = None
    padchest_gr: PadchestGrSource | None = None
    generated_conversations: GeneratedConversationsSource | None = None
    site: SiteSource | None = None


class Mix(_Strict):
    """Repeat factor per component (upstream ``create_llava_dataset.py``); 0 leaves it out."""

    mimic_cxr_report: int = Field(1, ge=0)
    chexpert_plus_report: int = Field(1, ge=0)
    mimic_cxr_classification: int = Field(1, ge=0)
    chexpert_classification: int = Field(1, ge=0)
    chest_imagenome_anatomical_grounding: int = Field(1, ge=0)
    vindr_cxr_abnormality_grounding: int = Field(3, ge=0)
    vindr_cxr_detection: int = Field(2, ge=0)
    ms_cxr_phrase_grounding: int = Field(3, ge=0)
    padchest_gr_phrase_grounding: int = Field(2, ge=0)
    mimic_cxr_conversation: int = Field(1, ge=0)
    mimic_cxr_grounded_conversation: int = Field(4, ge=0)
    padchest_gr_grounded_conversation: int = Field(4, ge=0)
    generated_conversation: int = Field(1, ge=0)
    generated_grounded_conversation: int = Field(4, ge=0)
    site_report: int = Field(1, ge=0)
    site_classification: int = Field(1, ge=0)
    chest_imagenome_samples: int | None = Field(
        80_000, ge=1, description="samples per repeat drawn from Chest ImaGenome train (upstream "
                                  "80,000); unset = all")


class BuildConfig(_Strict):
    seed: int = 0
    output_format: Literal["jsonl", "json"] = "jsonl"
    splits: tuple[Literal["train", "test"], ...] = ("train", "test")
    shuffle: bool = Field(True, description="shuffle the train records (seeded)")
    check_images: bool = Field(True, description="fail on a missing image file")
    uncertain_labels: Literal["present", "absent"] = Field(
        "present", description="CheXpert-style -1 (uncertain) labels of MIMIC-CXR and CheXpert: "
                               "'present' as upstream's code (default), 'absent' as the paper's text")
    sources: Sources = Sources()
    mix: Mix = Mix()

    def resolved(self, base: Path) -> "BuildConfig":
        """A copy whose relative source paths are taken relative to ``base``."""
        data = self.model_dump()
        for name, source in (data.get("sources") or {}).items():
            if not source:
                continue
            for key, value in source.items():
                if isinstance(value, Path) and not value.is_absolute():
                    source[key] = (base / value).resolve()
                elif isinstance(value, list):
                    source[key] = [(base / v).resolve() if isinstance(v, Path)
                                   and not v.is_absolute() else v for v in value]
            data["sources"][name] = source
        if data["sources"].get("site"):
            data["sources"]["site"]["pseudonym_salt"] = \
                self.sources.site.pseudonym_salt.get_secret_value()  # type: ignore[union-attr]
        return BuildConfig.model_validate(data)
