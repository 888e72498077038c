"""Templated radiology reports for phantoms: one short sentence per finding, normal statements
for the rest, in a fixed order (devices, lungs, pleura, heart).

Each finding family has a few phrasings; variant 0 is canonical and is what reports use unless a
caller asks for variety. Sentences are written so `inference.parsing.parse_labels` reads back the
phantom's labels exactly (the tests check it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from training.phantoms.findings import (
    Cardiomegaly,
    Consolidation,
    Finding,
    LungLesion,
    LungOpacity,
    PleuralEffusion,
    Pneumothorax,
    SupportDevice,
)

VariantPicker = Callable[[int], int]
"""Given the number of phrasings, return the index to use (canonical: always 0)."""

LUNGS_CLEAR = ("The lungs are clear.", "The lungs are clear without focal opacity.")
NO_EFFUSION_OR_PNEUMOTHORAX = ("There is no pleural effusion or pneumothorax.",
                               "No pleural effusion or pneumothorax is seen.")
NO_EFFUSION = ("There is no pleural effusion.", "No pleural effusion is seen.")
NO_PNEUMOTHORAX = ("There is no pneumothorax.", "No pneumothorax is seen.")
HEART_NORMAL = ("The heart size is normal.", "The cardiac silhouette is normal in size.")

_FAMILIES: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("The heart is enlarged.", "There is cardiomegaly.",
                     "The cardiac silhouette is enlarged."),
    "pleural effusion": ("There is a {size} {side} pleural effusion.",
                         "A {size} {side} pleural effusion is present."),
    "pleural effusion bilateral": ("There are {size} bilateral pleural effusions.",
                                   "{Size} bilateral pleural effusions are present."),
    "lung lesion": ("There is a {size} in the {side} {zone} lung zone.",
                    "A {size} is seen in the {side} {zone} lung zone."),
    "pneumothorax": ("There is a {size} {side} pneumothorax.",
                     "A {size} {side} pneumothorax is present."),
    "consolidation": ("There is consolidation in the {side} {zone} lung zone.",
                      "Consolidation is seen in the {side} {zone} lung zone."),
    "lung opacity": ("There is a hazy opacity in the {side} {zone} lung zone.",
                     "An ill-defined opacity is seen in the {side} {zone} lung zone."),
    "endotracheal tube": ("An endotracheal tube is in place.",
                          "The endotracheal tube tip lies above the carina."),
    "nasogastric tube": ("A nasogastric tube is in place.",
                         "A nasogastric tube courses into the stomach."),
    "central venous catheter": ("A {side} central venous catheter is in place.",
                                "A {side} central venous catheter ends in the lower SVC."),
    "pacemaker": ("A left chest wall pacemaker is present.",
                  "A left-sided pacemaker is seen with its lead in the right ventricle."),
}

_ORDER = (SupportDevice, Consolidation, LungOpacity, LungLesion, PleuralEffusion, Pneumothorax,
          Cardiomegaly)
_PARENCHYMAL = (Consolidation, LungOpacity, LungLesion)


def canonical(count: int) -> int:
    """The default VariantPicker: always the first phrasing."""
    del count
    return 0


def _family(finding: Finding) -> str:
    if isinstance(finding, SupportDevice):
        return finding.device
    if isinstance(finding, PleuralEffusion) and len(finding.sides) == 2:
        return "pleural effusion bilateral"
    return finding.kind


def finding_sentence(finding: Finding, pick: VariantPicker = canonical) -> str:
    """The report sentence describing one finding."""
    options = _FAMILIES[_family(finding)]
    template = options[pick(len(options))]
    size = getattr(finding, "size", "")
    return template.format(size=size, Size=size.capitalize(), side=finding.side_text or "",
                           zone=getattr(finding, "zone", ""))


def ordered(findings: Sequence[Finding]) -> list[Finding]:
    """Findings in report order (devices, lungs, pleura, heart), stable within a family."""
    return sorted(findings, key=lambda f: next(i for i, cls in enumerate(_ORDER)
                                               if isinstance(f, cls)))


def report_sentences(findings: Sequence[Finding],
                     pick: VariantPicker = canonical) -> list[tuple[str, Finding | None]]:
    """(sentence, finding or None for a normal statement) in report order."""
    sentences: list[tuple[str, Finding | None]] = []
    items = ordered(findings)
    for finding in items:
        if isinstance(finding, SupportDevice):
            sentences.append((finding_sentence(finding, pick), finding))
    parenchymal = [f for f in items if isinstance(f, _PARENCHYMAL)]
    sentences += [(finding_sentence(f, pick), f) for f in parenchymal]
    if not parenchymal:
        sentences.append((LUNGS_CLEAR[pick(len(LUNGS_CLEAR))], None))
    effusion = [f for f in items if isinstance(f, PleuralEffusion)]
    pneumothorax = [f for f in items if isinstance(f, Pneumothorax)]
    sentences += [(finding_sentence(f, pick), f) for f in effusion + pneumothorax]
    if not effusion and not pneumothorax:
        sentences.append((NO_EFFUSION_OR_PNEUMOTHORAX[pick(len(NO_EFFUSION_OR_PNEUMOTHORAX))], None))
    elif not effusion:
        sentences.append((NO_EFFUSION[pick(len(NO_EFFUSION))], None))
    elif not pneumothorax:
        sentences.append((NO_PNEUMOTHORAX[pick(len(NO_PNEUMOTHORAX))], None))
    heart = [f for f in items if isinstance(f, Cardiomegaly)]
    if heart:
        sentences.append((finding_sentence(heart[0], pick), heart[0]))
    else:
        sentences.append((HEART_NORMAL[pick(len(HEART_NORMAL))], None))
    return sentences


def report_text(findings: Sequence[Finding], pick: VariantPicker = canonical) -> str:
    """The findings section: sentences joined by single spaces."""
    return " ".join(sentence for sentence, _ in report_sentences(findings, pick))
