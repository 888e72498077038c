"""Render a frontal phantom: anatomy + findings → float image in display sense (0 black … 1 white).

The render is a pure function of (anatomy, findings, texture seed, noise seed, exposure): the lung
texture and the quantum noise come from their own random streams, so rendering the same phantom
with one finding removed changes only that finding's pixels (the tests rely on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.phantoms import scene as tissue
from training.phantoms.anatomy import SIDES, Anatomy, side_sign
from training.phantoms.findings import Finding
from training.phantoms.geometry import (
    blur,
    grid,
    polyline_points,
    smooth_noise,
    smoothstep,
    stroke,
)
from training.phantoms.scene import Scene

PHASES = ("cut", "overlay", "device")


@dataclass(frozen=True, eq=False)
class Rendered:
    """A rendered frontal image and what each finding drew."""

    image: np.ndarray                          # float32 (rows, columns) in [0, 1]
    footprints: tuple[tuple[np.ndarray, ...], ...]   # per finding (input order), one mask per box
    lung_visible: dict[str, np.ndarray]


def blur_sigma(anatomy: Anatomy) -> float:
    """Detector unsharpness in pixels (scales with the image)."""
    return 0.6 * anatomy.scale


def render_frontal(anatomy: Anatomy, findings: tuple[Finding, ...] | list[Finding],
                   texture_seed: tuple[int, ...], noise_seed: tuple[int, ...] | None,
                   exposure: float = 1.0, noise_level: float = 0.012) -> Rendered:
    """Draw the anatomy, then the findings by phase, bones, devices, blur and noise."""
    a = anatomy
    texture_rng = np.random.default_rng(list(texture_seed))
    scene = Scene(anatomy=a, image=_base(a),
                  lung_visible={side: a.masks.lung(side).copy() for side in SIDES})
    footprints: list[list[np.ndarray]] = [[] for _ in findings]
    _draw_phase(scene, findings, "cut", footprints)
    lung_texture = _lung_texture(a, texture_rng)
    aerated = (scene.lung_visible["right"] | scene.lung_visible["left"]).astype(np.float32)
    scene.image += lung_texture * aerated
    _draw_phase(scene, findings, "overlay", footprints)
    scene.image += _bones(a)
    scene.image += scene.lines
    _draw_phase(scene, findings, "device", footprints)
    image = np.maximum(scene.image, scene.devices)
    image = blur(image, blur_sigma(a))
    if noise_seed is not None and noise_level > 0:
        noise_rng = np.random.default_rng(list(noise_seed))
        image += noise_rng.normal(0.0, noise_level, image.shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0)
    if exposure != 1.0:
        image = image ** np.float32(exposure)
    return Rendered(image=image.astype(np.float32, copy=False),
                    footprints=tuple(tuple(f) for f in footprints),
                    lung_visible=scene.lung_visible)


def _draw_phase(scene: Scene, findings, phase: str, footprints: list[list[np.ndarray]]) -> None:
    for k, finding in enumerate(findings):
        if finding.phase == phase:
            footprints[k].extend(finding.draw(scene))


def _base(a: Anatomy) -> np.ndarray:
    """Air, soft tissue, lungs, mediastinum, heart, abdomen, trachea (no texture, no bones)."""
    y, x = grid(a.rows, a.columns)
    m = a.masks
    image = np.full((a.rows, a.columns), tissue.AIR, dtype=np.float32)
    centrality = 1.0 - np.clip(np.abs(x - a.cx) / a.body_half_width, 0.0, 1.0) ** 2
    soft = tissue.SOFT_TISSUE * (0.82 + 0.18 * centrality)
    image = np.where(m.body, soft, image)
    t = np.clip((y - a.apex_y) / a.span, 0.0, 1.0)
    lung_value = tissue.LUNG + 0.05 * t * t
    lungs = m.lung_right | m.lung_left
    image = np.where(lungs, lung_value, image)
    image = np.where(m.mediastinum | (m.knob & m.body), np.float32(tissue.MEDIASTINUM), image)
    image = np.where(m.abdomen, np.float32(tissue.ABDOMEN), image)
    image = np.where(m.heart & m.body, np.float32(tissue.HEART), image)
    bubble = (((x - (a.cx + 0.45 * a.tw)) / (0.13 * a.tw)) ** 2
              + ((y - (a.dome_left + 0.1 * a.span)) / (0.05 * a.span)) ** 2 <= 1.0) & m.abdomen
    image = np.where(bubble, np.float32(0.3), image)
    image = np.where(m.trachea, np.float32(tissue.TRACHEA), image)
    bronchi = np.zeros_like(image)
    carina = (a.cx + 0.08 * a.mw, a.carina_y)
    for side in SIDES:
        hx, hy = a.hilum(side)
        points = polyline_points(np.array([carina, (hx - side_sign(side) * 0.3 * a.mw, hy)]))
        bronchi = np.maximum(bronchi, stroke(image.shape, points, 0.35 * a.mw))
    image = np.where((bronchi > 0) & (m.mediastinum | lungs), np.float32(tissue.TRACHEA + 0.02),
                     image)
    return image.astype(np.float32)


def _lung_texture(a: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Parenchymal mottle, vessels radiating from the hila, hilar density."""
    y, x = grid(a.rows, a.columns)
    texture = 0.022 * smooth_noise(rng, a.rows, a.columns, cells=9)
    points, values = [], []
    width_scale = max(a.scale, 1.0)
    for side in SIDES:
        sign = side_sign(side)
        hx, hy = a.hilum(side)
        for angle in np.linspace(-1.2, 1.0, 7) + rng.normal(0, 0.12, 7):
            length = (a.tw - a.mw) * rng.uniform(0.55, 0.95)
            branch = _vessel(rng, (hx, hy), sign, float(angle), length)
            points.append(branch)
            values.append(0.11 * (1.0 - np.linspace(0, 1, len(branch))) ** 1.3 + 0.012)
            fork = branch[len(branch) // 2]
            sub = _vessel(rng, tuple(fork), sign, float(angle + rng.choice([-0.45, 0.45])),
                          0.45 * length)
            points.append(sub)
            values.append(0.055 * (1.0 - np.linspace(0, 1, len(sub))) ** 1.3 + 0.01)
        blob = np.exp(-(((x - hx) / (0.1 * a.tw)) ** 2 + ((y - hy) / (0.09 * a.span)) ** 2))
        texture = texture + 0.09 * blob
    vessels = stroke((a.rows, a.columns), np.concatenate(points), 1.0 * width_scale,
                     np.concatenate(values))
    return (texture + vessels).astype(np.float32)


def _vessel(rng: np.random.Generator, start: tuple[float, float], sign: int, angle: float,
            length: float) -> np.ndarray:
    """A gently wiggling polyline from `start`, heading laterally at `angle` (radians)."""
    nodes = [np.array(start, dtype=np.float64)]
    for _ in range(4):
        angle += rng.normal(0.0, 0.15)
        step = np.array([sign * np.cos(angle), np.sin(angle)]) * length / 4.0
        nodes.append(nodes[-1] + step)
    return polyline_points(np.array(nodes), step=0.5)


def _bones(a: Anatomy) -> np.ndarray:
    """Posterior and anterior ribs, clavicles and the thoracic spine (additive densities)."""
    y, x = grid(a.rows, a.columns)
    m = a.masks
    u = np.abs(x - a.cx)
    un = u / a.tw
    start = a.apex_y - (0.4 + 0.5 * a.rib_phase) * a.rib_spacing
    p = (y - start - (a.rib_curvature * un * un - 0.12 * un) * a.span) / a.rib_spacing
    k, f = np.floor(p), p - np.floor(p)
    band = smoothstep(0.0, 0.07, f) * smoothstep(0.36, 0.27, f)
    inside = (k >= 0) & (k < 10) & (u > 0.55 * a.mw) & (u < a.body_half_width * 0.97)
    posterior = 0.075 * band * inside * (1.0 - 0.35 * np.clip(un - 0.7, 0.0, 1.0))
    p2 = (y - (a.apex_y + 0.12 * a.span) + 0.3 * a.span * un) / (1.1 * a.rib_spacing)
    f2 = p2 - np.floor(p2)
    anterior = 0.035 * smoothstep(0.0, 0.08, f2) * smoothstep(0.3, 0.22, f2) * (
        (p2 >= 0) & (p2 < 6) & (un > 0.3) & (un < 1.0))
    clavicles = 0.16 * (m.clavicle_right | m.clavicle_left)
    vertebra = (y - a.apex_y) / (0.075 * a.span)
    disc = smoothstep(0.0, 0.1, vertebra - np.floor(vertebra))
    spine = 0.07 * m.spine * m.body * (0.35 + 0.65 * disc)
    return (posterior + anterior + clavicles + spine).astype(np.float32)
