"""Small grayscale ModelImages for model tests (no DICOM decoding involved)."""

from __future__ import annotations

import numpy as np

from inference.image import ModelImage
from inference.result import SourceImage


def gradient_image(rows: int = 150, columns: int = 120, seed: int = 0) -> ModelImage:
    """A portrait image with structure (gradient + a bright block + noise), like a small radiograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    pixels = (x * 100 / columns + y * 80 / rows + rng.normal(0, 10, (rows, columns))).clip(0, 255)
    pixels[rows // 3: rows // 2, columns // 4: columns // 2] = 230
    return ModelImage(pixels=pixels.astype(np.uint8),
                      source=SourceImage(rows=rows, columns=columns, sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
                                         study_instance_uid="1.2.826.0.1.3680043.8.498.2"))
