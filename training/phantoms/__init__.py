"""Synthetic chest-radiograph phantoms with known truth (issue 8, design §10).

`PhantomSampler(seed).sample(index)` returns an image and its RadVLM-format truth in memory;
`write_phantom_dataset` writes PNG + DICOM + truth + LLaVA instruction records + a manifest.
"""

from training.phantoms.sampler import (
    Acquisition,
    FindingTruth,
    Phantom,
    PhantomConfig,
    PhantomSampler,
)

__all__ = ["Acquisition", "FindingTruth", "Phantom", "PhantomConfig", "PhantomSampler"]
