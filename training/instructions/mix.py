"""The components of the RadVLM instruction mix (paper Table 1) and where their samples come from.

Upstream ``create_llava_dataset.py`` lists each dataset once per repeat (VinDr detection ×2,
VinDr grounding ×3, MS-CXR ×3, PadChest-GR ×2, grounded conversations ×4, Chest ImaGenome
80,000 samples); `Mix` holds the same factors. MS-CXR and PadChest-GR train on their train +
validation splits, everything else on train; the test split of each source is kept apart, in
its own file, one pass, never repeated.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from training.instructions.config import BuildConfig
from training.site_adaptation import SiteSamples, read_site
from training.sources import (
    chest_imagenome,
    chexpert,
    chexpert_plus,
    generated_conversations,
    ms_cxr,
    padchest_gr,
    vindr_cxr,
)
from training.sources.mimic_cxr import MimicCxr
from training.sources.samples import SourceSample, Split


@dataclass(frozen=True)
class Component:
    name: str
    source: str          # key of BuildConfig.sources
    task: str
    train_splits: tuple[Split, ...] = ("train",)
    has_test: bool = True
    optional_input: bool = False   # conversations: produced by a separate step, may be absent


COMPONENTS: tuple[Component, ...] = (
    Component("mimic_cxr_report", "mimic_cxr", "report"),
    Component("chexpert_plus_report", "chexpert_plus", "report"),
    Component("mimic_cxr_classification", "mimic_cxr", "classification"),
    Component("chexpert_classification", "chexpert", "classification"),
    Component("chest_imagenome_anatomical_grounding", "chest_imagenome", "anatomical_grounding"),
    Component("vindr_cxr_abnormality_grounding", "vindr_cxr", "abnormality_grounding"),
    Component("vindr_cxr_detection", "vindr_cxr", "detection"),
    Component("ms_cxr_phrase_grounding", "ms_cxr", "phrase_grounding", ("train", "valid")),
    Component("padchest_gr_phrase_grounding", "padchest_gr", "phrase_grounding",
              ("train", "valid")),
    Component("mimic_cxr_conversation", "mimic_cxr", "conversation", optional_input=True),
    Component("mimic_cxr_grounded_conversation", "mimic_cxr", "grounded_conversation",
              optional_input=True),
    Component("padchest_gr_grounded_conversation", "padchest_gr", "grounded_conversation",
              ("train", "valid"), has_test=False, optional_input=True),
    Component("generated_conversation", "generated_conversations", "conversation",
              has_test=False),
    Component("generated_grounded_conversation", "generated_conversations",
              "grounded_conversation", has_test=False),
    Component("site_report", "site", "report"),
    Component("site_classification", "site", "classification"),
)


class SourceSet:
    """Builds each configured reader once and caches what several components share."""

    def __init__(self, config: BuildConfig, out_dir: Path) -> None:
        self.config = config
        self.sources = config.sources
        self.out_dir = Path(out_dir)
        self._cache: dict[tuple, object] = {}
        self.skipped: dict[str, Counter] = defaultdict(Counter)   # source → reason → count

    def unconfigured(self, component: Component) -> list[str]:
        """The ``[sources.*]`` tables this component needs but the job file lacks."""
        needs = [component.source]
        if component.source in ("chest_imagenome", "ms_cxr"):
            needs.append("mimic_cxr")
        return [name for name in needs if getattr(self.sources, name) is None]

    def _cached(self, key: tuple, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def mimic(self) -> MimicCxr:
        cfg = self.sources.mimic_cxr
        assert cfg is not None
        return self._cached(("mimic",), lambda: MimicCxr(
            cfg.root, reports_root=cfg.reports_root, report_source=cfg.report_source,
            conversations_dir=cfg.conversations_dir, check_images=self.config.check_images,
            uncertain=self.config.uncertain_labels))

    def site(self) -> SiteSamples:
        cfg = self.sources.site
        assert cfg is not None
        return self._cached(("site",), lambda: read_site(
            cfg.folder, self.out_dir / "images" / "site", cfg.pseudonym_salt.get_secret_value(),
            cfg.test_fraction))

    def samples(self, component: Component, split: Split) -> list[SourceSample]:
        return self._samples(component.name, split)

    def _samples(self, name: str, split: Split) -> list[SourceSample]:  # noqa: C901 - a dispatch
        s, check = self.sources, self.config.check_images
        if name == "mimic_cxr_report":
            return self.mimic.report_samples(split)
        if name == "mimic_cxr_classification":
            return self.mimic.classification_samples(split)
        if name == "chexpert_plus_report":
            return chexpert_plus.report_samples(s.chexpert_plus.root, split,
                                                report_source=s.chexpert_plus.report_source,
                                                check_images=check)
        if name == "chexpert_classification":
            return chexpert.classification_samples(s.chexpert.root, split, check_images=check,
                                                   uncertain=self.config.uncertain_labels,
                                                   skipped=self.skipped["chexpert"])
        if name == "chest_imagenome_anatomical_grounding":
            return chest_imagenome.anatomical_samples(s.chest_imagenome.root, self.mimic, split)
        if name in ("vindr_cxr_abnormality_grounding", "vindr_cxr_detection"):
            images = self._cached(("vindr", split), lambda: vindr_cxr.read_images(
                s.vindr_cxr.root, split, iou_thr=s.vindr_cxr.iou_thr, check_images=check,
                skipped=self.skipped["vindr_cxr"]))
            if name == "vindr_cxr_detection":
                return vindr_cxr.detection_samples(images, split)
            return vindr_cxr.grounding_samples(images, split)
        if name == "ms_cxr_phrase_grounding":
            return ms_cxr.phrase_samples(s.ms_cxr.root, self.mimic, split, s.ms_cxr.csv_name)
        if name in ("padchest_gr_phrase_grounding", "padchest_gr_grounded_conversation"):
            grounded = self._cached(("padchest", split), lambda: padchest_gr.read_grounded(
                s.padchest_gr.root, split, s.padchest_gr.images_dir, check))
            if name == "padchest_gr_phrase_grounding":
                return padchest_gr.phrase_samples(grounded, split)
            return padchest_gr.conversation_samples(s.padchest_gr.root, grounded, split,
                                                    s.padchest_gr.conversations_dir)
        if name == "mimic_cxr_conversation":
            return self.mimic.conversation_samples(split, grounded=False)
        if name == "mimic_cxr_grounded_conversation":
            only = (ms_cxr.dicom_ids(s.ms_cxr.root, s.ms_cxr.csv_name)
                    if s.ms_cxr is not None else None)
            return self.mimic.conversation_samples(split, grounded=True, only_dicom_ids=only)
        if name in ("generated_conversation", "generated_grounded_conversation"):
            task = name.removeprefix("generated_")
            return generated_conversations.conversation_samples(s.generated_conversations.files,
                                                                task)
        if name in ("site_report", "site_classification"):
            task = "report" if name == "site_report" else "classification"
            return [x for x in self.site().samples if x.task == task and x.split == split]
        raise KeyError(f"unknown component {name!r}")

