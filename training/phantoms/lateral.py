"""A lateral chest phantom (ViewPosition LL/RL): anterior to the image left, spine on the right.

Laterals exist so a node can be shown skipping them (design §3 "Frontal selection"); they carry
no findings and no boxes, and instruction records are never built from them.
"""

from __future__ import annotations

import numpy as np

from training.phantoms.geometry import blur, grid, smooth_noise, smoothstep


def render_lateral(rng: np.random.Generator, rows: int, columns: int,
                   noise_level: float = 0.012) -> np.ndarray:
    """A float32 (rows, columns) lateral view in display sense, values in [0, 1]."""
    y, x = grid(rows, columns)
    cx = columns * rng.uniform(0.47, 0.53)
    body_rx, body_ry = columns * rng.uniform(0.36, 0.42), rows * 0.75
    body = ((x - cx) / body_rx) ** 2 + ((y - rows * 0.55) / body_ry) ** 2 <= 1.0
    image = np.where(body, np.float32(0.5), np.float32(0.03)).astype(np.float32)
    lung_cx, lung_cy = cx + columns * 0.02, rows * rng.uniform(0.43, 0.47)
    lung_rx, lung_ry = body_rx * 0.78, rows * rng.uniform(0.3, 0.34)
    floor = rows * rng.uniform(0.7, 0.75) + rows * 0.08 * ((x - cx) / body_rx)
    lung = (((x - lung_cx) / lung_rx) ** 2 + ((y - lung_cy) / lung_ry) ** 2 <= 1.0) & (y <= floor)
    t = np.clip((y - (lung_cy - lung_ry)) / (2 * lung_ry), 0, 1)
    image = np.where(lung, 0.2 + 0.08 * t, image)
    heart = (((x - (cx - body_rx * 0.3)) / (body_rx * 0.38)) ** 2
             + ((y - rows * 0.62) / (rows * 0.16)) ** 2 <= 1.0) & body
    image = np.where(heart & (y <= floor + rows * 0.02), np.float32(0.62), image)
    image = np.where(body & (y > floor), np.float32(0.64), image)
    spine_x = cx + body_rx * 0.62
    spine = (np.abs(x - spine_x) <= body_rx * 0.11) & body
    level = (y - rows * 0.1) / (rows * 0.055)
    disc = smoothstep(0.0, 0.12, level - np.floor(level))
    image = image + 0.16 * spine * (0.4 + 0.6 * disc)
    sternum = (np.abs(x - (cx - body_rx * 0.86) - 0.04 * (y - rows * 0.3)) <= columns * 0.012) & (
        y > rows * 0.2) & (y < rows * 0.62)
    image = image + 0.12 * sternum
    image = image + 0.02 * smooth_noise(rng, rows, columns, 8) * lung
    image = blur(image.astype(np.float32), 0.6 * min(rows, columns) / 160.0)
    image = image + rng.normal(0.0, noise_level, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)
