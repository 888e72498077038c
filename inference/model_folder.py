"""Checks that a local Hugging Face ``llava_onevision`` folder (the RadVLM release format) is
complete before anything heavy is loaded, and fingerprints its weights.

A missing or incomplete folder is a ``ModelFolderError`` that names every missing piece, so a
PACS administrator can fix the installation in one go.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from inference.errors import ModelFolderError

_HASH_CHUNK = 8 * 1024 * 1024


def _weight_files(folder: Path, missing: list[str]) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            missing.append(f"a readable weight_map in {index.name} ({exc})")
            return []
        shards = [folder / name for name in shard_names]
        missing.extend(f"weight shard {shard.name} (listed in {index.name})"
                       for shard in shards if not shard.is_file())
        return shards
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    missing.append("weights (model.safetensors or model.safetensors.index.json with its shards)")
    return []


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                if json.loads(path.read_text()).get("chat_template"):
                    return True
            except ValueError:
                continue
    return False


def _has_image_processor_config(folder: Path) -> bool:
    if (folder / "preprocessor_config.json").is_file():
        return True
    processor_config = folder / "processor_config.json"
    if processor_config.is_file():
        try:
            return "image_processor" in json.loads(processor_config.read_text())
        except ValueError:
            return False
    return False


def check_model_folder(folder: Path) -> list[Path]:
    """Validate ``folder`` and return its weight files; raise ModelFolderError naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {folder} does not exist: set [model] path (or RADVLM_MODEL__PATH) to a local "
            "Hugging Face llava_onevision folder, e.g. the RadVLM release, or create a test model with "
            "`radvlm tiny-model DIR`")
    missing: list[str] = []
    config_path = folder / "config.json"
    if not config_path.is_file():
        missing.append("config.json")
    else:
        try:
            model_type = json.loads(config_path.read_text()).get("model_type")
        except ValueError as exc:
            raise ModelFolderError(f"{config_path} is not valid JSON: {exc}") from exc
        if model_type != "llava_onevision":
            raise ModelFolderError(
                f"{config_path} declares model_type {model_type!r}; RadVLM weights are 'llava_onevision'")
    weights = _weight_files(folder, missing)
    if not (folder / "tokenizer.json").is_file() and not (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        missing.append("tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if not _has_image_processor_config(folder):
        missing.append("image processor settings (preprocessor_config.json or processor_config.json)")
    if not _has_chat_template(folder):
        missing.append("chat template (chat_template.jinja / chat_template.json)")
    if missing:
        raise ModelFolderError(f"model folder {folder} is incomplete; missing: " + "; ".join(missing))
    return weights


def _hash_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "radvlm" / "weights-sha256.json"


def files_sha256(paths: Sequence[Path]) -> str:
    """SHA-256 of the files' bytes, concatenated in the given order (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(weight_files: list[Path]) -> str:
    """SHA-256 over the weight files' bytes in name order (one digest for a sharded model).

    Hashing 16 GB takes about a minute, so digests are cached per (path, size, mtime) in
    ``$XDG_CACHE_HOME/radvlm/weights-sha256.json``; a changed file is hashed again.
    """
    files = sorted(Path(f).resolve() for f in weight_files)
    key = "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    cache_path = _hash_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    value = files_sha256(files)
    cache[key] = value
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(cache_path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return value
