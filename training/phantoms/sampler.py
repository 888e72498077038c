"""`PhantomSampler(seed).sample(index)`: one phantom with its truth, in memory, random access.

Every phantom is a pure function of (seed, index, config): three independent random streams are
derived from them — geometry and findings, lung texture, detector noise — so a trainer can draw
fresh samples every step (each a few milliseconds at 160 px) and a test can re-render any
phantom with a finding removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

from inference.labels import ABNORMALITY_LABELS, LABELS, NO_FINDING
from training.phantoms.anatomy import (
    SIDES,
    Anatomy,
    anatomical_regions,
    cardiothoracic_ratio,
    sample_anatomy,
)
from training.phantoms.findings import (
    DEVICE_NAMES,
    Cardiomegaly,
    Finding,
    sample_consolidation,
    sample_device,
    sample_effusion,
    sample_lesion,
    sample_opacity,
    sample_pneumothorax,
    truth_boxes,
)
from training.phantoms.geometry import BoxTuple, dilate, grid
from training.phantoms.lateral import render_lateral
from training.phantoms.render import Rendered, blur_sigma, render_frontal
from training.phantoms.reports import report_sentences

DEFAULT_RATES: Mapping[str, float] = MappingProxyType({
    "cardiomegaly": 0.3, "pleural effusion": 0.25, "lung lesion": 0.3, "pneumothorax": 0.15,
    "consolidation": 0.2, "lung opacity": 0.15, "support devices": 0.25,
})
"""Probability of each finding family in a non-normal phantom."""

BITS_STORED_CHOICES = (8, 10, 12, 14, 15, 16)
CTR_NORMAL = (0.38, 0.47)
CTR_ENLARGED = (0.55, 0.65)
GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class PhantomConfig:
    """What the sampler draws. Defaults suit a 160-px demo model."""

    size: int = 160                                   # longest side in pixels
    aspect_range: tuple[float, float] = (0.82, 1.22)  # columns / rows
    size_range: tuple[float, float] = (1.0, 1.0)      # longest side as a fraction of `size`
    normal_fraction: float = 0.25                     # phantoms forced to have no finding
    rates: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    ap_fraction: float = 0.3
    lateral_fraction: float = 0.25                    # studies that also get a lateral image
    monochrome1_fraction: float = 0.3
    dx_fraction: float = 0.5                          # DX rather than CR
    noise_level: float = 0.012

    def __post_init__(self) -> None:
        if self.size < 64:
            raise ValueError("size must be at least 64 pixels")
        unknown = set(self.rates) - set(DEFAULT_RATES)
        if unknown:
            raise ValueError(f"unknown finding families {sorted(unknown)}; "
                             f"expected some of {list(DEFAULT_RATES)}")

    def as_dict(self) -> dict[str, object]:
        return {"size": self.size, "aspect_range": list(self.aspect_range),
                "size_range": list(self.size_range), "normal_fraction": self.normal_fraction,
                "rates": dict(self.rates), "ap_fraction": self.ap_fraction,
                "lateral_fraction": self.lateral_fraction,
                "monochrome1_fraction": self.monochrome1_fraction,
                "dx_fraction": self.dx_fraction, "noise_level": self.noise_level}


@dataclass(frozen=True)
class Acquisition:
    """How the phantom is exported as DICOM."""

    modality: str           # CR | DX
    view_position: str      # PA | AP
    photometric: str        # MONOCHROME1 | MONOCHROME2
    bits_stored: int
    lateral_view: str | None  # LL | RL when the study also holds a lateral image


@dataclass(frozen=True)
class FindingTruth:
    """One finding as RadVLM-format truth: label, grounding name, report sentence, boxes."""

    finding: Finding
    sentence: str
    boxes: tuple[BoxTuple, ...]

    @property
    def label(self) -> str:
        return self.finding.label

    @property
    def name(self) -> str:
        return self.finding.name


@dataclass(frozen=True, eq=False)
class Phantom:
    """A frontal phantom, its truth, and what is needed to re-render it."""

    seed: int
    index: int
    anatomy: Anatomy
    findings: tuple[Finding, ...]
    intensity: np.ndarray        # float32 (rows, columns) display sense, 0..1
    acquisition: Acquisition
    labels: dict[str, bool]
    truths: tuple[FindingTruth, ...]
    regions: dict[str, BoxTuple]
    report: str
    cardiothoracic_ratio: float
    exposure: float
    noise_level: float
    footprints: tuple[tuple[np.ndarray, ...], ...] = ()   # per finding: the pixels it drew (one mask per box)

    @property
    def rows(self) -> int:
        return self.anatomy.rows

    @property
    def columns(self) -> int:
        return self.anatomy.columns

    @property
    def pixels(self) -> np.ndarray:
        """8-bit display image (what the PNG holds and the model sees)."""
        return np.rint(self.intensity * 255.0).astype(np.uint8)

    @property
    def texture_seed(self) -> tuple[int, int, int]:
        return (self.seed, self.index, 1)

    @property
    def noise_seed(self) -> tuple[int, int, int]:
        return (self.seed, self.index, 2)

    @property
    def positive_labels(self) -> list[str]:
        return [label for label in LABELS if self.labels[label]]

    def render(self, findings: tuple[Finding, ...] | list[Finding] | None = None,
               anatomy: Anatomy | None = None, noise: bool = True) -> Rendered:
        """Re-render with other findings/anatomy but the same texture and noise."""
        return render_frontal(anatomy or self.anatomy,
                              self.findings if findings is None else findings,
                              self.texture_seed, self.noise_seed if noise else None,
                              self.exposure, self.noise_level)

    def lateral_intensity(self) -> np.ndarray | None:
        """The study's lateral image (float, display sense), or None when it has none."""
        if self.acquisition.lateral_view is None:
            return None
        rng = np.random.default_rng([self.seed, self.index, 3])
        return render_lateral(rng, self.rows, self.columns, self.noise_level)


class PhantomSampler:
    """Random-access phantom source: `sample(index)` is deterministic for (seed, config)."""

    def __init__(self, seed: int = 0, config: PhantomConfig | None = None) -> None:
        if seed < 0:
            raise ValueError("seed must be ≥ 0")
        self.seed = int(seed)
        self.config = config or PhantomConfig()

    def sample(self, index: int) -> Phantom:
        """Draw phantom `index`: geometry, findings, render, truth."""
        if index < 0:
            raise ValueError("index must be ≥ 0")
        cfg = self.config
        rng = np.random.default_rng([self.seed, index, 0])
        rows, columns = self._shape(rng)
        view = "AP" if rng.random() < cfg.ap_fraction else "PA"
        normal = rng.random() < cfg.normal_fraction
        present = {family: (not normal) and rng.random() < cfg.rates.get(family, 0.0)
                   for family in DEFAULT_RATES}
        ctr_range = CTR_ENLARGED if present["cardiomegaly"] else CTR_NORMAL
        anatomy = sample_anatomy(rng, rows, columns, view, float(rng.uniform(*ctr_range)))
        ctr = cardiothoracic_ratio(anatomy.masks)
        findings = self._findings(rng, anatomy, present, ctr)
        acquisition = self._acquisition(rng, cfg, view)
        exposure = float(rng.uniform(0.85, 1.15))
        rendered = render_frontal(anatomy, findings, (self.seed, index, 1),
                                  (self.seed, index, 2), exposure, cfg.noise_level)
        margin = float(np.ceil(1.5 * blur_sigma(anatomy)))
        sentences = {id(f): s for s, f in report_sentences(findings) if f is not None}
        truths = tuple(FindingTruth(f, sentences[id(f)], tuple(truth_boxes(list(fp), margin)))
                       for f, fp in zip(findings, rendered.footprints))
        labels = {label: False for label in LABELS}
        for finding in findings:
            labels[finding.label] = True
        labels[NO_FINDING] = not any(labels[label] for label in ABNORMALITY_LABELS)
        report = " ".join(s for s, _ in report_sentences(findings))
        return Phantom(seed=self.seed, index=index, anatomy=anatomy, findings=findings,
                       intensity=rendered.image, acquisition=acquisition, labels=labels,
                       truths=truths, regions=anatomical_regions(anatomy), report=report,
                       cardiothoracic_ratio=ctr, exposure=exposure,
                       noise_level=cfg.noise_level, footprints=rendered.footprints)

    # ------------------------------------------------------------------ helpers
    def _shape(self, rng: np.random.Generator) -> tuple[int, int]:
        cfg = self.config
        longest = int(round(cfg.size * rng.uniform(*cfg.size_range)))
        low, high = cfg.aspect_range
        aspect = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        if aspect >= 1.0:
            return max(64, int(round(longest / aspect))), longest
        return longest, max(64, int(round(longest * aspect)))

    @staticmethod
    def _acquisition(rng: np.random.Generator, cfg: PhantomConfig, view: str) -> Acquisition:
        modality = "DX" if rng.random() < cfg.dx_fraction else "CR"
        photometric = "MONOCHROME1" if rng.random() < cfg.monochrome1_fraction else "MONOCHROME2"
        bits = int(rng.choice(BITS_STORED_CHOICES))
        lateral = str(rng.choice(["LL", "RL"])) if rng.random() < cfg.lateral_fraction else None
        return Acquisition(modality=modality, view_position=view, photometric=photometric,
                           bits_stored=bits, lateral_view=lateral)

    @staticmethod
    def _findings(rng: np.random.Generator, a: Anatomy, present: dict[str, bool],
                  ctr: float) -> tuple[Finding, ...]:
        """Non-conflicting findings: no effusion on a pneumothorax side, lesions in free lung."""
        findings: list[Finding] = []
        allowed = {side: a.masks.lung(side).copy() for side in SIDES}
        ptx_side = None
        if present["pneumothorax"]:
            ptx_side = str(rng.choice(SIDES))
            ptx = sample_pneumothorax(rng, a, ptx_side)
            air, _ = ptx.regions(a)
            allowed[ptx_side] &= ~dilate(dilate(air))
            findings.append(ptx)
        if present["pleural effusion"]:
            options = [("right",), ("left",), ("right", "left")]
            if ptx_side is not None:
                options = [(s,) for s in SIDES if s != ptx_side]
            effusion = sample_effusion(rng, options[int(rng.integers(len(options)))])
            for side in effusion.sides:
                level = a.cp_y - (effusion.height + 0.15) * a.span
                allowed[side][int(max(level, 0)):] = False
            findings.append(effusion)
        parenchymal_samplers = (("consolidation", sample_consolidation),
                                ("lung opacity", sample_opacity), ("lung lesion", sample_lesion))
        for family, sampler in parenchymal_samplers:
            if not present[family]:
                continue
            side = str(rng.choice(SIDES))
            finding = sampler(rng, a, allowed, side)
            if finding is None:
                other = "left" if side == "right" else "right"
                finding = sampler(rng, a, allowed, other)
            if finding is None:
                continue
            findings.append(finding)
            _block(allowed, a, finding)
        if ctr > 0.5:
            findings.append(Cardiomegaly(ctr=round(ctr, 4)))
        if present["support devices"]:
            count = 1 + int(rng.random() < 0.35)
            chosen = rng.choice(len(DEVICE_NAMES), size=count, replace=False,
                                p=[0.3, 0.3, 0.25, 0.15])
            for k in sorted(int(c) for c in chosen):
                findings.append(sample_device(rng, a, DEVICE_NAMES[k]))
        return tuple(findings)


def _block(allowed: dict[str, np.ndarray], a: Anatomy, finding: Finding) -> None:
    """Remove a placed parenchymal finding's neighbourhood from the free lung."""
    y, x = grid(a.rows, a.columns)
    side = getattr(finding, "side")
    if hasattr(finding, "lobes"):
        cx, cy, r = finding.lobes[0]
        rx = ry = r * 1.6 + 3
    elif hasattr(finding, "radii"):
        (cx, cy), (rx, ry) = finding.centre, finding.radii
        rx, ry = rx * 1.25 + 3, ry * 1.25 + 3
    else:
        (cx, cy), rx = finding.centre, finding.radius + 3
        ry = rx
    allowed[side] &= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 > 1.0


__all__ = ["Acquisition", "DEFAULT_RATES", "FindingTruth", "Phantom", "PhantomConfig",
           "PhantomSampler"]
