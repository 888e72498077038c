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


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Debian Chromium driven by Selenium (no browser download); the browser console is
    kept for ``driver.get_log("browser")`` (the web viewer and OHIF end-to-end tests)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian chromium / chromium-driver not installed (scripts/apt-packages.txt)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
