"""Small numpy helpers shared by the phantom modules: pixel grids, masks → boxes, strokes, blur.

Conventions: arrays are (rows, columns); pixel (r, c) covers [c, c+1) × [r, r+1) in image
coordinates, its centre is at (c + 0.5, r + 0.5). A normalised box [x1, y1, x2, y2] of a mask is
its pixel-edge bounding box divided by (columns, rows) — design §3, so ``x·Columns`` maps back to
the DICOM sub-pixel coordinate of the mask's edge.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

BoxTuple = tuple[float, float, float, float]


@lru_cache(maxsize=64)
def centres(n: int) -> np.ndarray:
    """Pixel-centre coordinates 0.5, 1.5, … n − 0.5 (read-only float32)."""
    values = np.arange(n, dtype=np.float32) + np.float32(0.5)
    values.flags.writeable = False
    return values


def grid(rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Open grids (y as (rows, 1), x as (1, columns)) of pixel centres, for broadcasting."""
    return centres(rows)[:, None], centres(columns)[None, :]


def pixel_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1) with exclusive ends of the True pixels, None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def normalised_box(mask: np.ndarray) -> BoxTuple | None:
    """The mask's pixel-edge bounding box as [x1, y1, x2, y2] in [0, 1]; None when empty."""
    found = pixel_bbox(mask)
    if found is None:
        return None
    r0, c0, r1, c1 = found
    rows, columns = mask.shape
    return (c0 / columns, r0 / rows, c1 / columns, r1 / rows)


def box_from_pixels(x1: float, y1: float, x2: float, y2: float, rows: int,
                    columns: int) -> BoxTuple:
    """A pixel-coordinate rectangle clipped to the image and normalised."""
    x1, x2 = sorted((min(max(x1, 0.0), columns), min(max(x2, 0.0), columns)))
    y1, y2 = sorted((min(max(y1, 0.0), rows), min(max(y2, 0.0), rows)))
    return (x1 / columns, y1 / rows, x2 / columns, y2 / rows)


def union_box(boxes: list[BoxTuple]) -> BoxTuple:
    """The smallest box enclosing all `boxes`."""
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite 0→1 step between edge0 and edge1 (float32)."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32, copy=False)


@lru_cache(maxsize=64)
def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """(n, cells) linear-interpolation weights from `cells` control points spread over n pixels."""
    pos = (np.arange(n) + 0.5) / n * (cells - 1)
    left = np.clip(np.floor(pos).astype(int), 0, cells - 2)
    frac = pos - left
    matrix = np.zeros((n, cells), dtype=np.float32)
    matrix[np.arange(n), left] = 1.0 - frac
    matrix[np.arange(n), left + 1] = frac
    matrix.flags.writeable = False
    return matrix


def smooth_noise(rng: np.random.Generator, rows: int, columns: int, cells: int = 7) -> np.ndarray:
    """Low-frequency noise (≈ unit variance at the control points), bilinear between them."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return _interp_matrix(rows, cells) @ coarse @ _interp_matrix(columns, cells).T


@lru_cache(maxsize=16)
def _gauss_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (sigma in pixels; ≤ 0 returns a copy)."""
    if sigma <= 0:
        return image.copy()
    kernel = _gauss_kernel(round(float(sigma), 3))
    radius = len(kernel) // 2
    rows, columns = image.shape
    padded = np.pad(image, ((radius, radius), (0, 0)), mode="edge")
    out = kernel[0] * padded[0:rows]
    for k in range(1, len(kernel)):
        out = out + kernel[k] * padded[k:k + rows]
    padded = np.pad(out, ((0, 0), (radius, radius)), mode="edge")
    result = kernel[0] * padded[:, 0:columns]
    for k in range(1, len(kernel)):
        result = result + kernel[k] * padded[:, k:k + columns]
    return result.astype(np.float32, copy=False)


@lru_cache(maxsize=16)
def _disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    reach = int(np.ceil(radius))
    dy, dx = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    keep = dy ** 2 + dx ** 2 <= radius ** 2 + 1e-6
    return dy[keep].astype(np.int64), dx[keep].astype(np.int64)


def polyline_points(points: np.ndarray, step: float = 0.4) -> np.ndarray:
    """Points every ~`step` pixels along the polyline through `points` ((n, 2) as x, y)."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 2:
        return points
    lengths = np.hypot(*np.diff(points, axis=0).T)
    arc = np.concatenate(([0.0], np.cumsum(lengths)))
    count = max(2, int(np.ceil(arc[-1] / step)) + 1)
    where = np.linspace(0.0, arc[-1], count)
    return np.column_stack((np.interp(where, arc, points[:, 0]), np.interp(where, arc, points[:, 1])))


def stroke(shape: tuple[int, int], points: np.ndarray, width: float,
           values: np.ndarray | float = 1.0) -> np.ndarray:
    """A float32 layer with the dense point list (x, y) drawn as a line `width` pixels wide.

    Each pixel takes the largest value of the points that reach it (`values` per point or one
    number), so a tapering intensity along a vessel or tube is easy to express.
    """
    rows, columns = shape
    layer = np.zeros(rows * columns, dtype=np.float32)
    dy, dx = _disc_offsets(max(width / 2.0, 0.5))
    px = np.floor(points[:, 0]).astype(np.int64)[:, None] + dx[None, :]
    py = np.floor(points[:, 1]).astype(np.int64)[:, None] + dy[None, :]
    vals = np.broadcast_to(np.asarray(values, dtype=np.float32).reshape(-1, 1)
                           if np.ndim(values) else np.float32(values), px.shape)
    inside = (px >= 0) & (px < columns) & (py >= 0) & (py < rows)
    np.maximum.at(layer, (py[inside] * columns + px[inside]), vals[inside])
    return layer.reshape(rows, columns)


def erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (pixels outside the image count as False)."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def dilate(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary dilation."""
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:-1, :] |= mask[1:, :]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out
