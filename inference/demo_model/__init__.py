"""Model folders shipped inside the package (package data, present in editable and wheel installs).

``phantom-v1/``: a small LlavaOnevision trained from scratch on synthetic chest phantoms by five stages
(config/train-phantom-demo.toml, -stage2.toml, -stage3.toml: `radvlm train`; -stage4-vision.toml: the
vision tower alone, training/demo_vision.py; -stage5.toml: `radvlm train`) — the embedded default of ``[model] path`` so that a fresh
install runs the whole chain (`radvlm demo`). Synthetic-phantom model for demonstration and
testing; NOT for clinical use.
"""

from __future__ import annotations

from pathlib import Path

PHANTOM_V1 = Path(__file__).resolve().parent / "phantom-v1"

DEMONSTRATION_VERSION_PREFIX = "phantom-"
"""``radvlm_version`` prefix of phantom-trained folders (the demo model, its base and stages)."""


def _shipped_weights_sha256() -> str | None:
    """The shipped model's weights hash as recorded in its ``metrics.json`` by `training.demo_model`."""
    import json

    try:
        return str(json.loads((PHANTOM_V1 / "metrics.json").read_text())["weights_sha256"])
    except (OSError, ValueError, KeyError):
        return None


def demonstration_reason(folder: Path | str, weights_hash: str | None = None) -> str | None:
    """Why the model folder ``folder`` is the shipped phantom demonstration model, or None.

    Decided, in this order, by: the resolved path (any spelling, symlinks included) is the shipped
    ``phantom-v1`` folder; its ``config.json`` declares a ``radvlm_version`` starting with
    ``phantom-`` (every phantom-trained folder); its weights hash (``weights_hash`` when the caller
    has it, else computed only when the weight file has the shipped file's size) equals the one
    recorded in the shipped ``metrics.json`` — a renamed copy of the demo model.
    """
    import json

    folder = Path(folder)
    try:
        resolved = folder.resolve()
    except OSError:
        return None
    if resolved == PHANTOM_V1:
        return f"{folder} is the shipped phantom demo model" + ("" if folder == PHANTOM_V1 else f" ({PHANTOM_V1})")
    try:
        declared = json.loads((folder / "config.json").read_text()).get("radvlm_version")
    except (OSError, ValueError, AttributeError):
        declared = None
    if isinstance(declared, str) and declared.startswith(DEMONSTRATION_VERSION_PREFIX):
        return f"{folder} declares radvlm_version {declared!r}, a model trained on synthetic phantoms"
    shipped = _shipped_weights_sha256()
    if shipped is None:
        return None
    if weights_hash is None:
        weights, reference = folder / "model.safetensors", PHANTOM_V1 / "model.safetensors"
        try:
            if not weights.is_file() or weights.stat().st_size != reference.stat().st_size:
                return None
        except OSError:
            return None
        from inference.model_folder import weights_sha256

        weights_hash = weights_sha256([weights])
    if weights_hash == shipped:
        return f"{folder} holds the weights of the shipped phantom demo model (sha256 {shipped[:16]}…)"
    return None
