"""Shared fixtures: a tiny random LlavaOnevision built offline once per session, real CR files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from inference.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from config.settings import ModelSettings
    from inference.model import load_model

    return load_model(ModelSettings(path=tiny_model_dir, max_new_tokens=24))


@pytest.fixture(scope="session")
def rg1_j2kr() -> Path:
    """pydicom-data's real chest CR: 1955 rows × 1841 columns, MONOCHROME1, 15-bit, JPEG 2000 lossless."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("RG1_J2KR.dcm"))


@pytest.fixture(scope="session")
def rg1_uncr() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("RG1_UNCR.dcm"))
