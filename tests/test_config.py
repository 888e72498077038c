from pathlib import Path

import pytest

from config import ConfigError, Settings, load_settings


def test_embedded_defaults_are_valid_and_safe():
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.model.device == "auto"
    assert settings.inference.prefix_reuse is True


def test_toml_file_then_environment_override(tmp_path: Path):
    path = tmp_path / "radvlm.toml"
    path.write_text('[model]\npath = "/weights/radvlm"\nmax_new_tokens = 128\n'
                    '[inference]\ntasks = ["report"]\n')
    settings = load_settings(path, environ={"RADVLM_MODEL__MAX_NEW_TOKENS": "64",
                                            "RADVLM_INFERENCE__TASKS": '["report", "grounding"]'})
    assert settings.model.path == Path("/weights/radvlm")
    assert settings.model.max_new_tokens == 64
    assert settings.inference.tasks == ["report", "grounding"]


def test_config_path_from_environment(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\ndevice = "cpu"\n')
    assert load_settings(environ={"RADVLM_CONFIG": str(path)}).model.device == "cpu"


def test_unknown_key_names_its_path(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\npaht = 'x'\n")
    with pytest.raises(ConfigError, match=r"model\.paht: unknown key"):
        load_settings(path, environ={})


def test_bad_value_names_its_path(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nmax_new_tokens = -3\n")
    with pytest.raises(ConfigError, match=r"model\.max_new_tokens"):
        load_settings(path, environ={})


def test_unknown_environment_key_fails():
    with pytest.raises(ConfigError, match=r"inference\.colour: unknown key"):
        load_settings(environ={"RADVLM_INFERENCE__COLOUR": "1"})


def test_bad_environment_value_fails():
    with pytest.raises(ConfigError, match=r"model\.device"):
        load_settings(environ={"RADVLM_MODEL__DEVICE": "tpu"})


def test_missing_and_invalid_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken, environ={})


def test_readme_configuration_example_is_valid(tmp_path: Path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```toml", 1)[1].split("```", 1)[0]
    path = tmp_path / "readme.toml"
    path.write_text(example)
    settings = load_settings(path, environ={})
    assert settings.node.ae_title == "RADVLM" and settings.destinations[0].kind == "dicom"
