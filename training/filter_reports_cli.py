"""``radvlm filter-reports --config BUILD.toml --url URL --model NAME``: a thin shell over
:func:`training.filter_reports.filter_reports`, reading the sources of a ``build-dataset`` job file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_SOME_KEPT, EXIT_BAD_INPUT = 0, 1, 2


def cmd_filter_reports(args: argparse.Namespace) -> int:
    from config import ConfigError, load_typed_config
    from training.conversations import APIError, EndpointSettings
    from training.filter_reports import FilterError, filter_reports, items_from_config
    from training.instructions import BuildConfig
    from training.prompts import PromptFileError, load_prompt
    from training.sources.errors import SourceError

    try:
        config = load_typed_config(BuildConfig, args.config, environ={}).resolved(args.config.parent.resolve())
        endpoint = EndpointSettings(url=args.url, model=args.model, api_key_env=args.api_key_env,
                                    timeout_s=args.timeout, temperature=0.0, max_tokens=args.max_tokens,
                                    max_attempts=args.max_attempts, backoff_s=args.backoff)
        prompt = load_prompt("filter_reports", args.prompt, required=("REPORT",))
        items = items_from_config(config, [s.strip() for s in args.sources.split(",") if s.strip()],
                                  [s.strip() for s in args.splits.split(",") if s.strip()])
        summary = filter_reports(items, endpoint, prompt=prompt, retry_failed=args.retry_failed, limit=args.limit,
                                 progress=not args.no_progress)
    except (ConfigError, SourceError, FilterError, PromptFileError, APIError, ValueError) as exc:
        print(f"radvlm filter-reports: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    counts = summary.counts
    print(f"filtered {counts['filtered']}, removed (nothing left) {counts['removed']}, original kept "
          f"{counts['original_kept']}, already done {counts['already_done']}, requests {summary.requests}; "
          f"model {args.model}, prompt sha256 {prompt.sha256[:12]}")
    for reason, n in sorted(summary.reasons.items()):
        print(f"  original kept ({reason}): {n}")
    return EXIT_SOME_KEPT if counts["original_kept"] else EXIT_OK


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "filter-reports", help="remove mentions of prior studies from report targets with an LLM endpoint",
        description="Write <dataset>/filtered_reports/ for the MIMIC-CXR and CheXpert-Plus sources of a "
                    "build-dataset job file (the builder reads it with report_source = \"filtered_reports\"). "
                    "Resumable; see docs/datasets.md.")
    parser.add_argument("--config", type=Path, required=True, help="the build-dataset TOML job file")
    parser.add_argument("--url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="model name at that endpoint (the paper used gpt-4o)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--sources", default="mimic_cxr,chexpert_plus", help="comma-separated sources")
    parser.add_argument("--splits", default="train,test", help="comma-separated splits (the paper: train and test)")
    parser.add_argument("--prompt", type=Path, help="instructions file with $REPORT (default: the shipped "
                        "training/prompts/filter_reports.txt, our wording of the paper's rule)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--max-attempts", type=int, default=3, help="tries per report before keeping the original")
    parser.add_argument("--backoff", type=float, default=2.0, help="first wait between tries (doubles)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--limit", type=int, help="ask at most N reports this run")
    parser.add_argument("--retry-failed", action="store_true", help="ask again the reports whose original was kept")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=cmd_filter_reports)
