"""The RadVLM instruction dataset (paper Table 1 mix) in LLaVA format.

- `config`: the typed job file of ``radvlm build-dataset`` (sources, repeat factors, seed).
- `mix`: the components of the mix (source × task), their upstream repeat factors and splits.
- `render`: one `SourceSample` + a seeded RNG → LLaVA ``conversations`` with the phrasings of
  ``inference.prompts`` (re-drawn for every repeat).
- `build`: reads the sources, renders, writes ``train.jsonl`` / ``test.jsonl`` and
  ``manifest.json``, and returns a summary.
"""

from training.instructions.build import BuildSummary, build_dataset, format_summary
from training.instructions.config import BuildConfig

__all__ = ["BuildConfig", "BuildSummary", "build_dataset", "format_summary"]
