"""The mutable drawing state a render pass hands to each finding, and the tissue intensities.

Intensities are display values in MONOCHROME2 sense (0 black = air, 1 white = metal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.phantoms.anatomy import Anatomy

AIR = 0.03
SOFT_TISSUE = 0.47
LUNG = 0.15
PNEUMOTHORAX = 0.06
MEDIASTINUM = 0.68
HEART = 0.70
ABDOMEN = 0.64
TRACHEA = 0.36
FLUID = 0.63
CONSOLIDATION = 0.56
METAL = 0.95


@dataclass
class Scene:
    """What findings read and modify during one render pass."""

    anatomy: Anatomy
    image: np.ndarray                      # float32 display intensities, before bones
    lung_visible: dict[str, np.ndarray]    # aerated lung per side (pneumothorax cuts it)
    lines: np.ndarray = field(init=False)  # thin additive lines drawn over the bones
    devices: np.ndarray = field(init=False)  # radio-opaque material (max-composited last)

    def __post_init__(self) -> None:
        self.lines = np.zeros_like(self.image)
        self.devices = np.zeros_like(self.image)

    def mix(self, alpha: np.ndarray, value: float | np.ndarray) -> None:
        """Blend the image towards `value` with per-pixel weight `alpha` (0..1)."""
        self.image += alpha * (value - self.image)
