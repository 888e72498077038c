"""Controllable findings: each knows its label, its grounding name, how to draw itself, and the
pixels it changed (its footprint, one mask per box).

Draw phases (see `render.render_frontal`):
  "cut"      — a pneumothorax removes aerated lung before the lung texture is drawn;
  "overlay"  — parenchymal and pleural findings on top of lung texture, under the bones;
  "device"   — radio-opaque devices, composited last (max), over everything.
A finding's footprint is what its truth box is computed from (`truth_boxes`), so boxes and pixels
agree by construction; the tests check it against difference images after blur and noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from training.phantoms import scene as tissue
from training.phantoms.anatomy import SIDES, Anatomy, side_sign
from training.phantoms.geometry import (
    BoxTuple,
    box_from_pixels,
    dilate,
    erode,
    grid,
    normalised_box,
    pixel_bbox,
    polyline_points,
    smoothstep,
    stroke,
)
from training.phantoms.scene import Scene

ZONES = ("upper", "mid", "lower")
DEVICE_NAMES = ("endotracheal tube", "nasogastric tube", "central venous catheter", "pacemaker")


@dataclass(frozen=True)
class Finding:
    """Base class: `kind` is the finding family, `label` one of inference.labels.LABELS, `name`
    the phrase used in grounding questions (VinDr-CXR style where one exists)."""

    kind: ClassVar[str] = ""
    label: ClassVar[str] = ""
    phase: ClassVar[str] = "overlay"

    @property
    def name(self) -> str:
        return self.label

    @property
    def side_text(self) -> str | None:
        return None

    def draw(self, scene: Scene) -> list[np.ndarray]:
        """Modify `scene` and return the footprint masks (one per truth box)."""
        raise NotImplementedError

    def attributes(self) -> dict[str, object]:
        """JSON-friendly parameters (for the truth record)."""
        return {key: value for key, value in self.__dict__.items()}


def truth_boxes(footprints: list[np.ndarray], margin: float) -> list[BoxTuple]:
    """Normalised boxes of the footprints, each grown by `margin` pixels (the blur's reach)."""
    boxes = []
    for mask in footprints:
        found = pixel_bbox(mask)
        if found is None:
            continue
        r0, c0, r1, c1 = found
        rows, columns = mask.shape
        boxes.append(box_from_pixels(c0 - margin, r0 - margin, c1 + margin, r1 + margin,
                                     rows, columns))
    return boxes


def zone_of(anatomy: Anatomy, side: str, y: float) -> str:
    """Upper / mid / lower lung zone of height y (thirds of the lung's vertical extent)."""
    box = normalised_box(anatomy.masks.lung(side))
    top, bottom = (box[1] * anatomy.rows, box[3] * anatomy.rows) if box else (0, anatomy.rows)
    third = (bottom - top) / 3.0
    return ZONES[min(2, max(0, int((y - top) // third)))]


# --------------------------------------------------------------------------- cardiomegaly

@dataclass(frozen=True)
class Cardiomegaly(Finding):
    """Enlarged heart: the anatomy's heart width gives CTR > 0.5; the box is the heart."""

    ctr: float
    kind: ClassVar[str] = "cardiomegaly"
    label: ClassVar[str] = "cardiomegaly"

    def draw(self, scene: Scene) -> list[np.ndarray]:
        return [scene.anatomy.masks.heart]


# --------------------------------------------------------------------------- pleural effusion

@dataclass(frozen=True)
class PleuralEffusion(Finding):
    """Fluid in the dependent pleural space: blunts the costophrenic angle and, when larger,
    forms a meniscus that climbs the lateral chest wall and hides the hemidiaphragm."""

    sides: tuple[str, ...]
    size: str            # small | moderate | large
    height: float        # fluid height above the costophrenic angle, in lung spans
    kind: ClassVar[str] = "pleural effusion"
    label: ClassVar[str] = "pleural effusion"

    @property
    def side_text(self) -> str:
        return "bilateral" if len(self.sides) == 2 else self.sides[0]

    def draw(self, scene: Scene) -> list[np.ndarray]:
        a = scene.anatomy
        y, x = grid(a.rows, a.columns)
        footprints = []
        for side in self.sides:
            u = side_sign(side) * (x - a.cx)
            level = a.cp_y - self.height * a.span
            meniscus = level - 0.07 * a.span * np.clip((u - a.mw) / (a.tw - a.mw), 0, 1) ** 2
            region = a.masks.lung(side)
            alpha = smoothstep(0.0, 0.035 * a.span, y - meniscus) * region
            scene.mix(alpha, tissue.FLUID)
            footprints.append(alpha > 0.004)
        return footprints


# --------------------------------------------------------------------------- lung lesion

@dataclass(frozen=True)
class LungLesion(Finding):
    """A nodule (≤ 30 mm) or mass (> 30 mm): one or a few overlapping round blobs in a lung."""

    side: str
    zone: str
    lobes: tuple[tuple[float, float, float], ...]   # (x, y, radius) in pixels
    diameter_mm: float
    kind: ClassVar[str] = "lung lesion"
    label: ClassVar[str] = "lung lesion"

    @property
    def name(self) -> str:
        return "nodule/mass"

    @property
    def side_text(self) -> str:
        return self.side

    @property
    def size(self) -> str:
        if self.diameter_mm > 30.0:
            return "mass"
        return "small nodule" if self.diameter_mm < 15.0 else "nodule"

    def draw(self, scene: Scene) -> list[np.ndarray]:
        a = scene.anatomy
        y, x = grid(a.rows, a.columns)
        alpha = np.zeros((a.rows, a.columns), dtype=np.float32)
        for lx, ly, radius in self.lobes:
            dist = np.hypot(x - lx, y - ly)
            alpha = np.maximum(alpha, smoothstep(radius + 0.6, radius - 0.6, dist))
        scene.image += 0.34 * alpha
        return [alpha > 0.004]


# --------------------------------------------------------------------------- pneumothorax

@dataclass(frozen=True)
class Pneumothorax(Finding):
    """Air between the collapsed lung and the chest wall: a dark rim without lung markings at the
    apex and lateral wall, bounded by the thin white visceral pleural line."""

    side: str
    size: str           # small | large
    depth: float        # rim depth at the apex, pixels
    kind: ClassVar[str] = "pneumothorax"
    label: ClassVar[str] = "pneumothorax"
    phase: ClassVar[str] = "cut"

    @property
    def side_text(self) -> str:
        return self.side

    def regions(self, a: Anatomy) -> tuple[np.ndarray, np.ndarray]:
        """(pneumothorax air, visceral pleural line) masks."""
        lung = a.masks.lung(self.side)
        collapsed = a.lung_shape(self.side, apex_drop=self.depth, shrink=self.depth) & lung
        air = lung & ~collapsed
        line = collapsed & ~erode(collapsed) & dilate(air)
        return air, line

    def draw(self, scene: Scene) -> list[np.ndarray]:
        air, line = self.regions(scene.anatomy)
        scene.lung_visible[self.side] = scene.lung_visible[self.side] & ~air
        scene.image[air] = tissue.PNEUMOTHORAX
        scene.lines += 0.2 * line
        return [air | line]


# --------------------------------------------------------------------------- consolidation / opacity

def _lobulated(a: Anatomy, cx: float, cy: float, rx: float, ry: float, phase: float,
               lobes: int) -> np.ndarray:
    """Normalised radius field of a wavy ellipse (≤ 1 inside)."""
    y, x = grid(a.rows, a.columns)
    dx, dy = (x - cx) / rx, (y - cy) / ry
    theta = np.arctan2(dy, dx)
    return np.hypot(dx, dy) / (1.0 + 0.14 * np.sin(lobes * theta + phase))


@dataclass(frozen=True)
class Consolidation(Finding):
    """Dense, sharply marginated airspace opacity within one lung zone, with air bronchograms."""

    side: str
    zone: str
    centre: tuple[float, float]
    radii: tuple[float, float]
    phase_angle: float
    kind: ClassVar[str] = "consolidation"
    label: ClassVar[str] = "consolidation"

    @property
    def side_text(self) -> str:
        return self.side

    def draw(self, scene: Scene) -> list[np.ndarray]:
        a = scene.anatomy
        field_ = _lobulated(a, *self.centre, *self.radii, self.phase_angle, 3)
        alpha = smoothstep(1.0, 0.9, field_) * scene.lung_visible[self.side]
        scene.mix(alpha, tissue.CONSOLIDATION)
        hx, hy = a.hilum(self.side)
        cx, cy = self.centre
        points = []
        for k in (-1, 0, 1):
            end = (cx + side_sign(self.side) * self.radii[0] * 0.5, cy + k * self.radii[1] * 0.45)
            points.append(polyline_points(np.array([(hx, hy), ((hx + cx) / 2, (hy + cy) / 2),
                                                    end])))
        bronchi = stroke((a.rows, a.columns), np.concatenate(points), 1.0 * max(a.scale, 1.0))
        scene.image -= 0.16 * bronchi * smoothstep(1.0, 0.7, field_) * alpha
        return [alpha > 0.004]


@dataclass(frozen=True)
class LungOpacity(Finding):
    """Hazy, ill-defined increased density (soft edges, markings still visible through it)."""

    side: str
    zone: str
    centre: tuple[float, float]
    radius: float
    kind: ClassVar[str] = "lung opacity"
    label: ClassVar[str] = "lung opacity"

    @property
    def side_text(self) -> str:
        return self.side

    def draw(self, scene: Scene) -> list[np.ndarray]:
        a = scene.anatomy
        y, x = grid(a.rows, a.columns)
        dist = np.hypot(x - self.centre[0], (y - self.centre[1]) * 1.15)
        alpha = smoothstep(self.radius, 0.55 * self.radius, dist) * scene.lung_visible[self.side]
        scene.image += 0.2 * alpha
        return [alpha > 0.02]


# --------------------------------------------------------------------------- support devices

@dataclass(frozen=True)
class SupportDevice(Finding):
    """A radio-opaque tube, line or pacemaker; label "support devices", named by device."""

    device: str
    side: str | None
    points: tuple[tuple[float, float], ...]     # polyline (x, y)
    width: float
    generator: tuple[float, float, float, float] | None = None   # pacemaker can: x0, y0, x1, y1
    kind: ClassVar[str] = "support devices"
    label: ClassVar[str] = "support devices"
    phase: ClassVar[str] = "device"

    @property
    def name(self) -> str:
        return self.device

    @property
    def side_text(self) -> str | None:
        return self.side

    def draw(self, scene: Scene) -> list[np.ndarray]:
        a = scene.anatomy
        shape = (a.rows, a.columns)
        line = polyline_points(np.array(self.points))
        if self.device == "endotracheal tube":
            offset = np.array([[self.width, 0.0]])
            layer = np.maximum(stroke(shape, line - offset, 1.0 * max(a.scale, 1.0)),
                               stroke(shape, line + offset, 1.0 * max(a.scale, 1.0)))
        else:
            layer = stroke(shape, line, self.width)
        if self.generator is not None:
            y, x = grid(*shape)
            x0, y0, x1, y1 = self.generator
            layer = np.maximum(layer, ((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)).astype(
                np.float32))
        scene.devices = np.maximum(scene.devices, tissue.METAL * layer)
        return [layer > 0]


# --------------------------------------------------------------------------- sampling

def _free_point(rng: np.random.Generator, allowed: np.ndarray, radius: float,
                tries: int = 40) -> tuple[float, float] | None:
    """A pixel centre whose disc of `radius` lies inside `allowed`, or None."""
    candidates = np.flatnonzero(allowed)
    if candidates.size == 0:
        return None
    rows, columns = allowed.shape
    reach = int(math.ceil(radius))
    for _ in range(tries):
        flat = int(candidates[rng.integers(candidates.size)])
        r, c = divmod(flat, columns)
        r0, r1, c0, c1 = r - reach, r + reach + 1, c - reach, c + reach + 1
        if r0 < 0 or c0 < 0 or r1 > rows or c1 > columns:
            continue
        dy, dx = np.mgrid[r0:r1, c0:c1]
        disc = (dy - r) ** 2 + (dx - c) ** 2 <= radius * radius
        if allowed[r0:r1, c0:c1][disc].all():
            return c + 0.5, r + 0.5
    return None


def _shrink(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(max(0, steps)):
        mask = erode(mask)
    return mask


def sample_pneumothorax(rng: np.random.Generator, a: Anatomy, side: str) -> Pneumothorax:
    large = rng.random() < 0.5
    depth = a.tw * (rng.uniform(0.17, 0.26) if large else rng.uniform(0.08, 0.12))
    return Pneumothorax(side=side, size="large" if large else "small", depth=float(depth))


def sample_effusion(rng: np.random.Generator, sides: tuple[str, ...]) -> PleuralEffusion:
    size = str(rng.choice(["small", "moderate", "large"], p=[0.4, 0.4, 0.2]))
    height = {"small": (0.10, 0.15), "moderate": (0.24, 0.32), "large": (0.42, 0.52)}[size]
    return PleuralEffusion(sides=sides, size=size, height=float(rng.uniform(*height)))


def sample_lesion(rng: np.random.Generator, a: Anatomy, allowed: dict[str, np.ndarray],
                  side: str) -> LungLesion | None:
    """A nodule or mass fully inside the free aerated lung of `side`."""
    mass = rng.random() < 0.3
    radius_mm = rng.uniform(16.0, 28.0) if mass else rng.uniform(5.0, 13.0)
    radius = max(2.5 * a.scale, radius_mm / a.pixel_spacing_mm)
    centre = _free_point(rng, _shrink(allowed[side], 1), radius + 1.5)
    if centre is None:
        return None
    cx, cy = centre
    lobes = [(cx, cy, radius)]
    if mass:
        for _ in range(2):
            angle = rng.uniform(0, 2 * math.pi)
            lobes.append((cx + 0.35 * radius * math.cos(angle), cy + 0.35 * radius * math.sin(angle),
                          radius * 0.7))
    extent = max(abs(lx - cx) + r for lx, _, r in lobes) * 2
    return LungLesion(side=side, zone=zone_of(a, side, cy),
                      lobes=tuple((float(x), float(y), float(r)) for x, y, r in lobes),
                      diameter_mm=float(extent * a.pixel_spacing_mm))


def _zone_centre(rng: np.random.Generator, a: Anatomy, lung: np.ndarray, side: str,
                 zone: str) -> tuple[float, float] | None:
    box = normalised_box(lung)
    if box is None:
        return None
    top, bottom = box[1] * a.rows, box[3] * a.rows
    third = (bottom - top) / 3.0
    k = ZONES.index(zone)
    y = top + third * (k + rng.uniform(0.35, 0.65))
    u = a.mw + (a.tw - a.mw) * rng.uniform(0.35, 0.6)
    x = a.cx + side_sign(side) * u
    r, c = int(y), int(x)
    if not (0 <= r < a.rows and 0 <= c < a.columns) or not lung[r, c]:
        return None
    return float(x), float(y)


def sample_consolidation(rng: np.random.Generator, a: Anatomy, allowed: dict[str, np.ndarray],
                         side: str) -> Consolidation | None:
    zone = str(rng.choice(ZONES, p=[0.3, 0.25, 0.45]))
    centre = _zone_centre(rng, a, allowed[side], side, zone)
    if centre is None:
        return None
    radii = ((a.tw - a.mw) * rng.uniform(0.25, 0.38), a.span * rng.uniform(0.11, 0.16))
    return Consolidation(side=side, zone=zone, centre=centre,
                         radii=(float(radii[0]), float(radii[1])),
                         phase_angle=float(rng.uniform(0, 2 * math.pi)))


def sample_opacity(rng: np.random.Generator, a: Anatomy, allowed: dict[str, np.ndarray],
                   side: str) -> LungOpacity | None:
    zone = str(rng.choice(ZONES))
    centre = _zone_centre(rng, a, allowed[side], side, zone)
    if centre is None:
        return None
    return LungOpacity(side=side, zone=zone, centre=centre,
                       radius=float((a.tw - a.mw) * rng.uniform(0.3, 0.42)))


def sample_device(rng: np.random.Generator, a: Anatomy, device: str) -> SupportDevice:
    """Plausible course and tip of each device type."""
    s = max(a.scale, 1.0)
    hx, hy = a.heart_centre
    heart_top = hy - a.heart_width / 2 * a.heart_aspect
    if device == "endotracheal tube":
        x = a.cx + 0.08 * a.mw
        tip = a.carina_y - a.span * rng.uniform(0.05, 0.1)
        return SupportDevice(device=device, side=None, points=((x, 0.0), (x, tip)),
                             width=float(0.18 * a.mw))
    if device == "nasogastric tube":
        floor = float(a.diaphragm_y(np.array([a.cx + 0.3 * a.tw]))[0])
        x0 = a.cx + 0.22 * a.mw
        points = ((x0, 0.0), (x0 + 0.1 * a.mw, a.carina_y), (a.cx + 0.45 * a.mw, a.dome_left),
                  (a.cx + 0.3 * a.tw, floor + 0.06 * a.span),
                  (a.cx + rng.uniform(0.45, 0.6) * a.tw, floor + 0.1 * a.span))
        return SupportDevice(device=device, side=None, points=points, width=1.4 * s)
    if device == "central venous catheter":
        side = str(rng.choice(SIDES))
        sign = side_sign(side)
        tip_y = heart_top + a.span * rng.uniform(-0.02, 0.05)
        points = ((a.cx + sign * 1.0 * a.tw, a.apex_y + 0.06 * a.span),
                  (a.cx + sign * 0.45 * a.tw, a.apex_y + 0.16 * a.span),
                  (a.cx - 0.55 * a.mw, a.carina_y + 0.02 * a.span),
                  (a.cx - 0.6 * a.mw, tip_y))
        return SupportDevice(device=device, side=side, points=points, width=1.2 * s)
    if device == "pacemaker":
        gx, gy = a.cx + 0.68 * a.tw, a.apex_y + 0.16 * a.span
        w, h = 0.14 * a.tw, 0.09 * a.span
        points = ((gx - w, gy), (a.cx + 0.3 * a.tw, a.apex_y + 0.18 * a.span),
                  (a.cx - 0.5 * a.mw, a.carina_y + 0.05 * a.span),
                  (a.cx - 0.55 * a.mw, heart_top + 0.05 * a.span),
                  (hx + 0.3 * a.heart_width / 2, hy + 0.35 * a.heart_width / 2 * a.heart_aspect))
        return SupportDevice(device=device, side="left", points=points, width=1.2 * s,
                             generator=(gx - w, gy - h, gx + w, gy + h))
    raise ValueError(f"unknown device {device!r}")
