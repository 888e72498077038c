"""Phantom truth as RadVLM-format records, and LLaVA-style instruction records built from it.

Instruction records use the phrasings and answer builders of `inference.prompts`, so the model is
taught exactly what inference later asks. `variants="canonical"` always takes variant 0 (held-out
evaluation); `"random"` draws a phrasing per question from the phantom's own stream, as upstream
did in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from inference import prompts
from inference.labels import LABELS, NO_FINDING
from training.phantoms.reports import report_sentences
from training.phantoms.sampler import GENERATOR_VERSION, Phantom

Variants = Literal["canonical", "random"]
TASKS = ("report", "classification", "anatomical_grounding", "abnormality_grounding",
         "phrase_grounding", "detection", "conversation")

_QUESTION_BY_LABEL = {
    "cardiomegaly": ("Is the heart enlarged?", "No, the heart size is normal."),
    "pleural effusion": ("Is there a pleural effusion?", "No, there is no pleural effusion."),
    "lung lesion": ("Is there a lung nodule or mass?", "No, there is no lung nodule or mass."),
    "pneumothorax": ("Is there a pneumothorax?", "No, there is no pneumothorax."),
    "consolidation": ("Is there any consolidation?", "No, there is no consolidation."),
    "lung opacity": ("Is there a lung opacity?", "No, there is no lung opacity."),
    "support devices": ("Are there any support devices?", "No, there are no support devices."),
}


def checked_regions(names) -> tuple[str, ...]:
    """Region names, lower-cased and stripped, refused when not in ``prompts.ANATOMICAL_REGIONS``
    (a misspelt name would otherwise silently teach or ask nothing about anatomy)."""
    regions = tuple(str(n).strip().lower() for n in (names or ()) if str(n).strip())
    unknown = set(regions) - set(prompts.ANATOMICAL_REGIONS)
    if unknown:
        raise ValueError(f"unknown anatomical region(s) {sorted(unknown)}; "
                         "expected names from inference.prompts.ANATOMICAL_REGIONS")
    return regions


def with_regions(phantom: Phantom, regions: Iterable[str] | None) -> Phantom:
    """``phantom`` with only the named anatomical regions kept (all of them when ``regions`` is empty),
    so that anatomical questions ask only about the regions a model was taught."""
    if not regions:
        return phantom
    keep = set(regions)
    return dataclasses.replace(phantom, regions={name: box for name, box in phantom.regions.items()
                                                 if name in keep})


def _round_box(box) -> list[float]:
    return [round(float(v), 4) for v in box]


def truth_record(phantom: Phantom, image: str | None = None,
                 dicom: list[str] | None = None) -> dict[str, Any]:
    """One phantom's truth: labels, findings with sentences and boxes, anatomical regions,
    report, CTR, acquisition. Boxes are [x1, y1, x2, y2] relative to the original image."""
    acq = phantom.acquisition
    return {
        "id": phantom_id(phantom),
        "seed": phantom.seed,
        "index": phantom.index,
        "generator_version": GENERATOR_VERSION,
        "image": image,
        "dicom": dicom or [],
        "rows": phantom.rows,
        "columns": phantom.columns,
        "view_position": acq.view_position,
        "modality": acq.modality,
        "photometric_interpretation": acq.photometric,
        "bits_stored": acq.bits_stored,
        "lateral_view_position": acq.lateral_view,
        "pixel_spacing_mm": round(phantom.anatomy.pixel_spacing_mm, 4),
        "labels": {label: bool(phantom.labels[label]) for label in LABELS},
        "findings": [
            {"kind": t.finding.kind, "label": t.label, "name": t.name,
             "side": t.finding.side_text, "sentence": t.sentence,
             "boxes": [_round_box(b) for b in t.boxes]}
            for t in phantom.truths],
        "regions": [{"name": name, "boxes": [_round_box(box)]}
                    for name, box in phantom.regions.items()],
        "report": phantom.report,
        "cardiothoracic_ratio": round(phantom.cardiothoracic_ratio, 4),
    }


def phantom_id(phantom: Phantom) -> str:
    return f"phantom-s{phantom.seed}-{phantom.index:06d}"


class _Picker:
    """Chooses phrasing variants: always 0, or random from the phantom's instruction stream."""

    def __init__(self, phantom: Phantom, variants: Variants) -> None:
        if variants not in ("canonical", "random"):
            raise ValueError("variants must be 'canonical' or 'random'")
        self.random = variants == "random"
        self.rng = np.random.default_rng([phantom.seed, phantom.index, 4])

    def __call__(self, count: int) -> int:
        return int(self.rng.integers(count)) if self.random else 0

    def choice(self, items: list[Any]) -> Any:
        return items[int(self.rng.integers(len(items)))]


def _record(record_id: str, image: str, turns: list[tuple[str, str]]) -> dict[str, Any]:
    conversations = []
    for k, (question, answer) in enumerate(turns):
        conversations.append({"from": "human",
                              "value": ("<image>\n" if k == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": record_id, "image": image, "conversations": conversations}


def instruction_records(phantom: Phantom, image: str, variants: Variants = "random",
                        tasks: tuple[str, ...] = TASKS,
                        anatomical_per_image: int = 2) -> list[dict[str, Any]]:
    """LLaVA-style records (`id`, `image`, `conversations`) for one frontal phantom."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected some of {list(TASKS)}")
    pick = _Picker(phantom, variants)
    base = phantom_id(phantom)
    records: list[dict[str, Any]] = []
    positives = [label for label in phantom.positive_labels if label != NO_FINDING]
    grounded = [t for t in phantom.truths if t.boxes]
    if "report" in tasks:
        report = " ".join(s for s, _ in report_sentences(phantom.findings, pick))
        question = prompts.REPORT_PROMPT_VARIANTS[pick(len(prompts.REPORT_PROMPT_VARIANTS))]
        records.append(_record(f"{base}-report", image, [(question, report)]))
    if "classification" in tasks:
        records.append(_record(f"{base}-classification", image, [_classification(positives, pick)]))
    if "anatomical_grounding" in tasks and phantom.regions:
        names = list(phantom.regions)
        count = min(anatomical_per_image, len(names))
        chosen = (names[:count] if not pick.random else
                  [names[int(i)] for i in pick.rng.choice(len(names), size=count, replace=False)])
        for k, name in enumerate(chosen):
            records.append(_record(f"{base}-anatomy-{k}", image,
                                   [_grounding(name, [phantom.regions[name]], pick)]))
    if "abnormality_grounding" in tasks:
        for k, truth in enumerate(grounded):
            records.append(_record(f"{base}-abnormality-{k}", image,
                                   [_grounding(truth.name, truth.boxes, pick)]))
    if "phrase_grounding" in tasks:
        for k, truth in enumerate(grounded):
            variant = pick(len(prompts.PHRASE_GROUNDING_PROMPT_VARIANTS))
            question = prompts.phrase_grounding_prompt(truth.sentence, variant)
            answer = prompts.phrase_grounding_answer(
                truth.boxes, pick(len(prompts.PHRASE_GROUNDING_ANSWER_VARIANTS)))
            records.append(_record(f"{base}-phrase-{k}", image, [(question, answer)]))
    if "detection" in tasks:
        question = prompts.DETECTION_PROMPT_VARIANTS[pick(len(prompts.DETECTION_PROMPT_VARIANTS))]
        findings = [(t.name, t.boxes) for t in grounded]
        answer = (prompts.detection_answer(findings) if not pick.random else
                  prompts.detection_answer(findings, pick(len(prompts.DETECTION_PREFIX_VARIANTS)),
                                           pick(len(prompts.DETECTION_NONE_ANSWER_VARIANTS))))
        records.append(_record(f"{base}-detection", image, [(question, answer)]))
    if "conversation" in tasks:
        records.append(_record(f"{base}-conversation", image, _conversation(phantom, pick)))
    return records


def _classification(positives: list[str], pick: _Picker) -> tuple[str, str]:
    question = prompts.CLASSIFICATION_PROMPT_VARIANTS[
        pick(len(prompts.CLASSIFICATION_PROMPT_VARIANTS))]
    if not positives:
        variant = pick(len(prompts.CLASSIFICATION_NONE_ANSWER_VARIANTS))
    elif len(positives) == 1:
        variant = pick(len(prompts.CLASSIFICATION_ONE_PREFIX_VARIANTS))
    else:
        variant = pick(len(prompts.CLASSIFICATION_MANY_PREFIX_VARIANTS))
    return question, prompts.classification_answer(positives, variant)


def _grounding(name: str, boxes, pick: _Picker) -> tuple[str, str]:
    question = prompts.anatomical_grounding_prompt(
        name, pick(len(prompts.GROUNDING_PROMPT_VARIANTS)))
    answer = prompts.grounding_answer(name, boxes, pick(len(prompts.GROUNDING_ANSWER_VARIANTS)))
    return question, answer


def _conversation(phantom: Phantom, pick: _Picker) -> list[tuple[str, str]]:
    """Three turns: classification, a yes/no question about one finding family, a location."""
    positives = [label for label in phantom.positive_labels if label in _QUESTION_BY_LABEL]
    turns = [_classification(positives, pick)]
    label = pick.choice(list(_QUESTION_BY_LABEL)) if pick.random else (
        positives[0] if positives else "pleural effusion")
    question, negative = _QUESTION_BY_LABEL[label]
    sentences = [t.sentence for t in phantom.truths if t.label == label]
    turns.append((question, "Yes. " + " ".join(sentences) if sentences else negative))
    located = [t for t in phantom.truths if t.label == label and t.boxes]
    if located:
        turns.append(_grounding(located[0].name, located[0].boxes, pick))
    else:
        name = pick.choice(list(phantom.regions)) if pick.random else "cardiac silhouette"
        turns.append(_grounding(name, [phantom.regions[name]], pick))
    return turns
