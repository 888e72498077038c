"""Frontal chest anatomy of a phantom: geometry parameters, masks, and the anatomical-region boxes.

The geometry is drawn in pixel units of the final image (rows × columns). Patient's right is on
the image left (standard PA/AP display), so "right lung" is the lung with x < midline. Each lung
is built row by row (medial border at the mediastinum, lateral border at the inner rib cage, a
rounded apex cap) and cut by its hemidiaphragm dome, which meets the lateral border at the
costophrenic angle. The heart is an ellipse sitting on the diaphragm, shifted to the patient's
left; its width is set from the cardiothoracic ratio (CTR) the sampler chose.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from training.phantoms.geometry import BoxTuple, box_from_pixels, centres, grid, normalised_box

SIDES = ("right", "left")
"""Patient sides; "right" is drawn on the image left."""


def side_sign(side: str) -> int:
    """−1 for the patient's right (image left), +1 for the left: u = sign·(x − midline) ≥ 0."""
    if side not in SIDES:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    return -1 if side == "right" else 1


@dataclass(frozen=True)
class Anatomy:
    """Geometry of one frontal phantom, in pixels. Frozen: findings derive modified copies."""

    rows: int
    columns: int
    view: str                 # "PA" or "AP"
    cx: float                 # midline x
    tw: float                 # half width of the thorax (inner rib cage) at the costophrenic level
    mw: float                 # half width of the mediastinum
    apex_y: float             # top of the lung apices
    cp_y: float               # costophrenic angles (lowest lateral lung point)
    dome_right: float         # peak of the right hemidiaphragm
    dome_left: float          # peak of the left hemidiaphragm
    heart_width: float        # transverse cardiac diameter (the ellipse's width)
    heart_right_fraction: float   # share of the heart width right of the midline
    heart_aspect: float       # vertical / horizontal semi-axis
    body_half_width: float
    neck_half_width: float
    shoulder_y: float
    clavicle_drop: float      # how far (in spans) the medial clavicle end lies below the apex
    rib_spacing: float
    rib_curvature: float
    rib_phase: float
    pixel_spacing_mm: float   # physical size of one pixel (thorax ≈ 280–330 mm wide)

    # ------------------------------------------------------------------ derived scalars
    @property
    def span(self) -> float:
        """Apex → costophrenic angle height."""
        return self.cp_y - self.apex_y

    @property
    def scale(self) -> float:
        """Pixels per nominal 160-px image (line widths scale with it)."""
        return min(self.rows, self.columns) / 160.0

    def dome_peak(self, side: str) -> float:
        return self.dome_right if side == "right" else self.dome_left

    @property
    def hilum_y(self) -> float:
        return self.apex_y + 0.42 * self.span

    @property
    def carina_y(self) -> float:
        return self.apex_y + 0.27 * self.span

    def hilum(self, side: str) -> tuple[float, float]:
        """(x, y) of a hilum: just lateral to the mediastinum, at about 40 % of the lung height."""
        return (self.cx + side_sign(side) * (self.mw + 0.13 * self.tw), self.hilum_y)

    @property
    def heart_centre(self) -> tuple[float, float]:
        x = self.cx - self.heart_right_fraction * self.heart_width + self.heart_width / 2.0
        ry = self.heart_width / 2.0 * self.heart_aspect
        lowest_floor = min(self.diaphragm_y(np.array([x - self.heart_width / 2,
                                                      x + self.heart_width / 2, x])))
        return x, float(lowest_floor - 0.3 * ry)

    @property
    def knob(self) -> tuple[float, float, float]:
        """Aortic knob circle (x, y, radius), bulging into the left upper lung."""
        return (self.cx + 1.05 * self.mw, self.apex_y + 0.24 * self.span, 0.5 * self.mw)

    def with_heart_width(self, width: float) -> Anatomy:
        """A copy with another transverse cardiac diameter (normal ↔ cardiomegaly)."""
        return replace(self, heart_width=float(width))

    # ------------------------------------------------------------------ profiles
    def diaphragm_y(self, x: np.ndarray) -> np.ndarray:
        """Height of the diaphragm at each x: right dome left of the midline, left dome right."""
        x = np.asarray(x, dtype=np.float32)
        result = np.empty_like(x)
        for side in SIDES:
            u = side_sign(side) * (x - self.cx)
            chosen = u >= 0 if side == "left" else u > 0
            result[chosen] = self._dome(u[chosen], side)
        return result

    def _dome(self, u: np.ndarray, side: str) -> np.ndarray:
        peak = self.dome_peak(side)
        peak_u = 0.45 * self.tw
        lateral = peak + (self.cp_y - peak) * ((u - peak_u) / (self.tw - peak_u)) ** 2
        medial = peak + 0.12 * self.span * ((peak_u - u) / peak_u) ** 2
        return np.where(u >= peak_u, lateral, medial).astype(np.float32)

    def lung_shape(self, side: str, apex_drop: float = 0.0, shrink: float = 0.0) -> np.ndarray:
        """Boolean mask of one lung's outline (before the heart and aortic knob are cut out).

        `apex_drop` and `shrink` (pixels) give a collapsed lung for a pneumothorax: the apex is
        lowered and the lateral border pulled in, fully at the apex and tapering to nothing at
        85 % of the lung height.
        """
        sign = side_sign(side)
        y = centres(self.rows)
        u = sign * (centres(self.columns) - self.cx)
        t = np.clip((y - self.apex_y) / self.span, 0.0, 1.0)
        u_hi = self.tw * (0.94 + 0.06 * t)
        if shrink:
            u_hi = u_hi - shrink * np.clip((0.85 - t) / 0.85, 0.0, 1.0)
        u_lo = np.full_like(u_hi, self.mw)
        apex = self.apex_y + apex_drop
        cap_h = 0.28 * self.span
        q = np.clip((apex + cap_h - y) / cap_h, 0.0, 1.0)
        half = np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0))
        centre, radius = (u_lo + u_hi) / 2.0, (u_hi - u_lo) / 2.0
        u_lo, u_hi = centre - radius * half, centre + radius * half
        u_hi = np.where(y < apex, -1.0, u_hi)
        floor = self._dome(u, side)
        return ((u[None, :] >= u_lo[:, None]) & (u[None, :] <= u_hi[:, None])
                & (y[:, None] <= floor[None, :]) & (u[None, :] > 0))

    @cached_property
    def masks(self) -> AnatomyMasks:
        return AnatomyMasks.build(self)


@dataclass(frozen=True, eq=False)
class AnatomyMasks:
    """Boolean masks of the drawn structures (rows × columns)."""

    lung_right: np.ndarray
    lung_left: np.ndarray
    heart: np.ndarray
    heart_ellipse: np.ndarray
    knob: np.ndarray
    mediastinum: np.ndarray
    trachea: np.ndarray
    spine: np.ndarray
    body: np.ndarray
    abdomen: np.ndarray
    clavicle_right: np.ndarray
    clavicle_left: np.ndarray

    def lung(self, side: str) -> np.ndarray:
        return self.lung_right if side == "right" else self.lung_left

    def clavicle(self, side: str) -> np.ndarray:
        return self.clavicle_right if side == "right" else self.clavicle_left

    @staticmethod
    def build(a: Anatomy) -> AnatomyMasks:
        y, x = grid(a.rows, a.columns)
        floor = a.diaphragm_y(centres(a.columns))[None, :]
        hx, hy = a.heart_centre
        rx = a.heart_width / 2.0
        ry = rx * a.heart_aspect
        heart_ellipse = ((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2 <= 1.0
        heart = heart_ellipse & (y <= floor + 0.02 * a.span)
        kx, ky, kr = a.knob
        knob = (x - kx) ** 2 + (y - ky) ** 2 <= kr * kr
        lungs = {side: a.lung_shape(side) & ~heart_ellipse & ~knob for side in SIDES}
        body_half = np.where(
            y < a.shoulder_y,
            a.neck_half_width + (a.body_half_width - a.neck_half_width)
            * np.clip((y - (a.shoulder_y - 0.12 * a.rows)) / (0.12 * a.rows), 0.0, 1.0),
            a.body_half_width)
        body = np.abs(x - a.cx) <= body_half
        mediastinum = (np.abs(x - a.cx) <= a.mw) & (y <= floor) & body
        trachea_half = 0.3 * a.mw
        trachea = (np.abs(x - a.cx - 0.08 * a.mw) <= trachea_half) & (y <= a.carina_y)
        spine = np.abs(x - a.cx) <= 0.6 * a.mw
        abdomen = body & (y > floor) & (np.abs(x - a.cx) <= a.body_half_width)
        clavicles = {side: _segment_mask(a, *clavicle_segment(a, side), 0.022 * a.rows)
                     for side in SIDES}
        return AnatomyMasks(lung_right=lungs["right"], lung_left=lungs["left"], heart=heart,
                            heart_ellipse=heart_ellipse, knob=knob, mediastinum=mediastinum,
                            trachea=trachea & body, spine=spine, body=body, abdomen=abdomen,
                            clavicle_right=clavicles["right"], clavicle_left=clavicles["left"])


def clavicle_segment(a: Anatomy, side: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Medial and lateral clavicle ends (x, y); flatter and higher on AP views."""
    sign = side_sign(side)
    medial = (a.cx + sign * 0.45 * a.mw, a.apex_y + a.clavicle_drop * a.span)
    rise = 0.06 if a.view == "AP" else 0.13
    lateral = (a.cx + sign * 1.08 * a.tw, medial[1] - rise * a.span)
    return medial, lateral


def _segment_mask(a: Anatomy, p: tuple[float, float], q: tuple[float, float],
                  thickness: float) -> np.ndarray:
    """Pixels within thickness/2 of the segment p–q (a capsule), tapering at the lateral end."""
    y, x = grid(a.rows, a.columns)
    (px, py), (qx, qy) = p, q
    dx, dy = qx - px, qy - py
    t = np.clip(((x - px) * dx + (y - py) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    dist = np.hypot(x - (px + t * dx), y - (py + t * dy))
    return dist <= thickness / 2.0 * (1.0 - 0.35 * t)


def cardiothoracic_ratio(masks: AnatomyMasks) -> float:
    """CTR measured on the masks: widest heart extent / widest inner thorax (lungs) extent."""
    heart_cols = np.flatnonzero(masks.heart.any(axis=0))
    heart_width = heart_cols[-1] - heart_cols[0] + 1
    lungs = masks.lung_right | masks.lung_left
    filled = lungs.any(axis=1)
    first = np.argmax(lungs, axis=1)
    last = lungs.shape[1] - 1 - np.argmax(lungs[:, ::-1], axis=1)
    widths = (last - first + 1)[filled]
    return float(heart_width / max(widths))


def sample_anatomy(rng: np.random.Generator, rows: int, columns: int, view: str,
                   ctr: float) -> Anatomy:
    """Random but plausible frontal geometry whose heart gives about the CTR asked for."""
    tw = columns * rng.uniform(0.34, 0.40)
    apex_y = rows * rng.uniform(0.09, 0.16)
    cp_y = rows * rng.uniform(0.76, 0.84)
    span = cp_y - apex_y
    dome_right = cp_y - span * rng.uniform(0.13, 0.19)
    dome_left = dome_right + span * rng.uniform(0.0, 0.04)
    body = tw * rng.uniform(1.12, 1.24)
    thorax_width = 2.0 * tw
    return Anatomy(
        rows=rows, columns=columns, view=view,
        cx=columns * (0.5 + rng.normal(0.0, 0.012)),
        tw=float(tw), mw=float(tw * rng.uniform(0.15, 0.19)),
        apex_y=float(apex_y), cp_y=float(cp_y),
        dome_right=float(dome_right), dome_left=float(dome_left),
        heart_width=float(ctr * thorax_width),
        heart_right_fraction=float(rng.uniform(0.30, 0.37)),
        heart_aspect=float(rng.uniform(0.72, 0.86)),
        body_half_width=float(body), neck_half_width=float(tw * rng.uniform(0.42, 0.5)),
        shoulder_y=float(apex_y + span * rng.uniform(0.0, 0.08)),
        clavicle_drop=float(rng.uniform(0.10, 0.16) if view == "PA" else rng.uniform(0.02, 0.07)),
        rib_spacing=float(span * rng.uniform(0.095, 0.11)),
        rib_curvature=float(rng.uniform(0.32, 0.45)),
        rib_phase=float(rng.uniform(0.0, 1.0)),
        pixel_spacing_mm=float(rng.uniform(280.0, 330.0) / thorax_width),
    )


# ---------------------------------------------------------------------- anatomical regions

def _rows_box(mask: np.ndarray, r0: float, r1: float) -> BoxTuple | None:
    """Box of the part of `mask` between rows r0 and r1 (pixel edges)."""
    part = np.zeros_like(mask)
    lo, hi = int(np.floor(max(r0, 0))), int(np.ceil(min(r1, mask.shape[0])))
    part[lo:hi] = mask[lo:hi]
    return normalised_box(part)


def _point_box(a: Anatomy, x: float, y: float, half_w: float, half_h: float) -> BoxTuple:
    return box_from_pixels(x - half_w, y - half_h, x + half_w, y + half_h, a.rows, a.columns)


def anatomical_regions(a: Anatomy) -> dict[str, BoxTuple]:
    """Boxes of the anatomical regions this phantom draws, keyed by Chest ImaGenome names
    (`inference.prompts.ANATOMICAL_REGIONS`); regions not drawn (cavoatrial junction, descending
    aorta) are left out so a model is never taught an invisible target."""
    m = a.masks
    regions: dict[str, BoxTuple] = {}
    for side in SIDES:
        lung = m.lung(side)
        bbox = normalised_box(lung)
        if bbox is None:
            continue
        regions[f"{side} lung"] = bbox
        top, bottom = bbox[1] * a.rows, bbox[3] * a.rows
        height = bottom - top
        for k, zone in enumerate(("upper", "mid", "lower")):
            zone_box = _rows_box(lung, top + k * height / 3.0, top + (k + 1) * height / 3.0)
            if zone_box is not None:
                regions[f"{side} {zone} lung zone"] = zone_box
        apical = _rows_box(lung, top, top + 0.18 * height)
        if apical is not None:
            regions[f"{side} apical zone"] = apical
        sign = side_sign(side)
        hx, hy = a.hilum(side)
        regions[f"{side} hilar structures"] = _point_box(
            a, hx + sign * 0.07 * a.tw, hy, 0.12 * a.tw, 0.09 * a.span)
        regions[f"{side} costophrenic angle"] = _point_box(
            a, a.cx + sign * a.tw * 0.97, a.cp_y - 0.02 * a.span, 0.1 * a.tw, 0.07 * a.span)
        u_medial = max(a.mw, 0.0)
        x_medial, x_lateral = a.cx + sign * u_medial, a.cx + sign * a.tw
        regions[f"{side} hemidiaphragm"] = box_from_pixels(
            min(x_medial, x_lateral), a.dome_peak(side) - 0.03 * a.span,
            max(x_medial, x_lateral), a.cp_y + 0.02 * a.span, a.rows, a.columns)
        clavicle = normalised_box(m.clavicle(side))
        if clavicle is not None:
            regions[f"{side} clavicle"] = clavicle
    heart_box = normalised_box(m.heart)
    if heart_box is not None:
        regions["cardiac silhouette"] = heart_box
        x_mid = a.cx / a.columns
        regions["right cardiac silhouette"] = (heart_box[0], heart_box[1], x_mid, heart_box[3])
        regions["left cardiac silhouette"] = (x_mid, heart_box[1], heart_box[2], heart_box[3])
        hx, hy = a.heart_centre
        rx = a.heart_width / 2.0
        ry = rx * a.heart_aspect
        bottom = heart_box[3] * a.rows
        for side in SIDES:
            sign = side_sign(side)
            angle_x = hx + sign * rx * 0.82
            regions[f"{side} cardiophrenic angle"] = _point_box(
                a, angle_x, bottom - 0.03 * a.span, 0.08 * a.tw, 0.06 * a.span)
        regions["right atrium"] = box_from_pixels(
            hx - rx, hy - 0.45 * ry, a.cx - 0.1 * a.mw, bottom, a.rows, a.columns)
    top_heart = (heart_box[1] * a.rows) if heart_box else a.dome_right
    regions["trachea"] = normalised_box(m.trachea) or (0.0, 0.0, 1.0, 1.0)
    regions["carina"] = _point_box(a, a.cx + 0.08 * a.mw, a.carina_y, 0.45 * a.mw, 0.05 * a.span)
    regions["spine"] = box_from_pixels(a.cx - 0.6 * a.mw, a.apex_y - 0.05 * a.span,
                                       a.cx + 0.6 * a.mw, max(a.dome_right, a.dome_left),
                                       a.rows, a.columns)
    kx, ky, kr = a.knob
    regions["aortic arch"] = box_from_pixels(kx - kr, ky - kr, kx + kr, ky + kr,
                                             a.rows, a.columns)
    upper = box_from_pixels(a.cx - a.mw, a.apex_y, max(a.cx + a.mw, kx + kr), top_heart,
                            a.rows, a.columns)
    regions["upper mediastinum"] = upper
    if heart_box is not None:
        regions["mediastinum"] = (min(upper[0], heart_box[0]), upper[1],
                                  max(upper[2], heart_box[2]), heart_box[3])
    regions["svc"] = box_from_pixels(a.cx - a.mw, a.carina_y - 0.08 * a.span,
                                     a.cx - 0.35 * a.mw, top_heart + 0.04 * a.span,
                                     a.rows, a.columns)
    abdomen = normalised_box(m.abdomen)
    if abdomen is not None:
        x_mid = a.cx / a.columns
        regions["abdomen"] = abdomen
        regions["right upper abdomen"] = (abdomen[0], abdomen[1], x_mid, abdomen[3])
        regions["left upper abdomen"] = (x_mid, abdomen[1], abdomen[2], abdomen[3])
    return regions
