"""Model folders shipped inside the package (package data, present in editable and wheel installs).

``phantom-v1/``: a small LlavaOnevision trained from scratch by `radvlm train` on synthetic chest
phantoms (config/train-phantom-demo.toml, then -stage2.toml and -stage3.toml) — the embedded default of ``[model] path`` so that a fresh
install runs the whole chain (`radvlm demo`). Synthetic-phantom model for demonstration and
testing; NOT for clinical use.
"""

from __future__ import annotations

from pathlib import Path

PHANTOM_V1 = Path(__file__).resolve().parent / "phantom-v1"
