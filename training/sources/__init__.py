"""Readers of the seven public chest X-ray datasets RadVLM was trained on, one module each.

Each reader takes a dataset folder laid out as the dataset ships it (plus the few files upstream
RadVLM derives, named as upstream names them) and returns `SourceSample` objects: ground truth
per image and task, boxes normalised to the original image. The instruction builder
(`training.instructions`) turns them into LLaVA conversations. A missing or malformed file raises
`SourceError` naming the file and the column. docs/datasets.md lists the expected layouts.
"""

from training.sources.errors import MissingSourceFileError, SourceError, SourceFormatError
from training.sources.samples import SourceSample, Turn

__all__ = ["MissingSourceFileError", "SourceError", "SourceFormatError", "SourceSample", "Turn"]
