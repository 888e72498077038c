"""The node's configuration contract (issue 4 §7): the documented TOML shape loads, mistakes are
reported with the key path."""

from __future__ import annotations

import pytest

from config import ConfigError, load_settings
from config.settings import DicomDestination, FolderDestination

CONTRACT = """
[node]
ae_title = "RADVLM"
port = 11112
bind = "0.0.0.0"
data_dir = "./radvlm-data"
allowed_calling_ae_titles = []   # empty = any

[model]
path = "/models/radvlm"

[[destinations]]
kind = "dicom"
host = "127.0.0.1"
port = 4242
ae_title = "ORTHANC"

[[destinations]]
kind = "folder"
path = "./radvlm-out"
"""


def test_documented_shape_loads(tmp_path):
    cfg = tmp_path / "radvlm.toml"
    cfg.write_text(CONTRACT)
    settings = load_settings(cfg, environ={"RADVLM_NODE__QUIET_PERIOD_SECONDS": "2.5"})
    assert settings.node.ae_title == "RADVLM" and settings.node.port == 11112
    assert settings.node.quiet_period_seconds == 2.5
    dicom, folder = settings.destinations
    assert isinstance(dicom, DicomDestination) and dicom.ae_title == "ORTHANC"
    assert isinstance(folder, FolderDestination)
    assert settings.node.tls.enabled is False and settings.node.min_free_space_mb == 1024


@pytest.mark.parametrize("snippet, message", [
    ('[[destinations]]\nkind = "ftp"\npath = "x"\n', "destinations.0"),
    ('[[destinations]]\nkind = "dicom"\nhost = "h"\nport = 4242\n', "ae_title"),
    ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "node.ae_title"),
    ('[node]\nae_title = "BAD\\\\AE"\n', "node.ae_title"),
    ('[node.tls]\nenabled = true\n', "certificate and private_key"),
    ('[node]\nprot = 1\n', "node.prot: unknown key"),
])
def test_mistakes_name_the_key(tmp_path, snippet, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(snippet)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ={})
    assert message in str(err.value)
