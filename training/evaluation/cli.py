"""``radvlm evaluate``: run a model over a test split and score it, or score a predictions file.

    radvlm evaluate --model DIR --data TEST_JSON --out DIR [--tasks report,classification,grounding,…]
    radvlm evaluate --score PREDICTIONS.jsonl --task grounding|classification|report|conversation

Exit codes as the rest of ``radvlm``: 0 ok, 2 bad input, 3 model problem (raised to the main CLI).
Only the standard library is imported at registration time; the metric packages load when used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_BAD_INPUT = 0, 2
EVAL_MAX_NEW_TOKENS = 1500
"""Upstream evaluates with 1,500 new tokens (multi-box detection answers and conversations are
long); the node's serving default ([model] max_new_tokens) is lower and is not used here."""


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="evaluate a model on a test split, or score a predictions file (paper metrics)",
        description=__doc__.splitlines()[0])
    run = parser.add_argument_group("running a model")
    run.add_argument("--model", type=Path, help="local llava_onevision folder (RadVLM or LLaVA-OneVision); "
                     "default: the configured [model] path (--config), as serve and infer use")
    run.add_argument("--data", type=Path, help="LLaVA-style test split (JSON list or JSONL)")
    run.add_argument("--out", type=Path, help="output folder: predictions-*.jsonl, results.md/json, plots/")
    run.add_argument("--tasks", default="all",
                     help="comma-separated tasks or families (report, classification, grounding, "
                          "anatomical_grounding, abnormality_grounding, phrase_grounding, detection, "
                          "conversation, grounded_conversation, all)")
    run.add_argument("--image-root", type=Path, help="folder the split's image paths are relative to "
                     "(default: the split's folder)")
    run.add_argument("--baseline", default="radvlm", help="prompt adapter (radvlm, llava-onevision, chexagent, "
                     "maira-2; llava-med and radialog are documented only)")
    run.add_argument("--limit", type=int, help="answer at most N new records (resume later)")
    run.add_argument("--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS,
                     help=f"new tokens per answer (default {EVAL_MAX_NEW_TOKENS}, as upstream's evaluation; "
                          "replaces [model] max_new_tokens)")
    run.add_argument("--seed", type=int, default=0, help="seed of the baselines' template draws (CheXagent)")
    run.add_argument("--config", type=Path, help="TOML configuration file ([model] section)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    score = parser.add_argument_group("scoring a predictions file")
    score.add_argument("--score", type=Path, help="predictions JSONL: 'output' + reference per line")
    score.add_argument("--task", choices=("grounding", "classification", "report", "conversation", "grounded_report"),
                       help="grounded_report: RadFact-style logical/spatial precision and recall (needs --judge-url "
                            "and --judge-model for the entailment checks; docs/evaluation.md)")
    score.add_argument("--entailment-prompt", type=Path, help="entailment instructions file with $PREMISE and "
                       "$HYPOTHESIS (default: the shipped training/prompts/radfact_entailment.txt)")
    models = parser.add_argument_group("model-backed metrics (local folders; never downloaded)")
    models.add_argument("--bertscore-model", type=Path, help="distilbert-base-uncased folder")
    models.add_argument("--bertscore-baseline", type=Path, help="BERTScore rescale baseline TSV")
    models.add_argument("--radgraph-model", type=Path, help="radgraph model cache folder (radgraph-xl)")
    models.add_argument("--green-model", type=Path, help="GREEN-radllama2-7b folder")
    models.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                        "(key from RADVLM_JUDGE_API_KEY)")
    models.add_argument("--judge-model", help="judge model name (the paper used gpt-4o)")
    models.add_argument("--judge-prompt", type=Path, help="judge instructions file with $DATA (default: the "
                        "shipped training/prompts/judge.txt, our wording of the paper's rules)")
    parser.set_defaults(handler=cmd_evaluate)


def _report_models(args: argparse.Namespace):
    from training.evaluation.report import ReportModels

    env = ReportModels.from_env()
    return ReportModels(bertscore=args.bertscore_model or env.bertscore,
                        bertscore_baseline=args.bertscore_baseline or env.bertscore_baseline,
                        radgraph=args.radgraph_model or env.radgraph, green=args.green_model or env.green)


def _judge(args: argparse.Namespace):
    from training.evaluation.judge import JudgeClient

    if bool(args.judge_url) != bool(args.judge_model):
        raise ValueError("--judge-url and --judge-model go together")
    if not args.judge_url:
        return None
    from training.evaluation.judge import judge_prompt

    judge_prompt(args.judge_prompt)   # a missing or placeholder-less file stops before any request
    return JudgeClient(args.judge_url, args.judge_model, prompt_path=args.judge_prompt)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluation.baselines import BaselineUnavailableError
    from training.evaluation.judge import JudgeError
    from training.evaluation.records import SplitFormatError

    try:
        if args.score is not None:
            if args.task is None:
                raise ValueError("--score needs --task grounding|classification|report|conversation|grounded_report")
            return score_file(args.score, args.task, _report_models(args), _judge(args), args.entailment_prompt)
        if args.data is None or args.out is None:
            raise ValueError("give --data and --out (--model defaults to the configured [model] path), "
                             "or --score FILE --task T")
        from config import load_settings

        settings = load_settings(args.config).model
        if args.model is not None:
            settings.path = args.model
        print(f"radvlm evaluate: model {settings.path}", file=sys.stderr)
        settings.max_new_tokens = args.max_new_tokens
        results, json_path, md_path, plots = evaluate(
            settings, args.data, args.out, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            image_root=args.image_root, baseline=args.baseline, limit=args.limit,
            progress=not args.no_progress, models=_report_models(args), judge_client=_judge(args),
            seed=args.seed)
        print(md_path.read_text())
        print(f"results: {json_path} and {md_path}; plots: {', '.join(str(p) for p in plots.values()) or 'none'}")
        return EXIT_OK
    except (SplitFormatError, BaselineUnavailableError, JudgeError, ValueError, KeyError, FileNotFoundError) as exc:
        # PromptFileError is a ValueError
        print(f"radvlm evaluate: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT


def score_file(path: Path, family: str, models=None, judge_client=None, entailment_prompt: Path | None = None) -> int:
    """Print the metrics of a predictions file as JSON (the ``--score`` mode)."""
    from training.evaluation.records import read_predictions
    from training.evaluation.scoring import score_records

    if family == "grounded_report":
        from training.evaluation.grounded_report import LLMEntailment, grounded_report_metrics
        from training.evaluation.grounded_report import entailment_prompt as load

        prompt = load(entailment_prompt)
        entails = LLMEntailment(judge_client, prompt) if judge_client is not None else None
        metrics = grounded_report_metrics(read_predictions(path), entails)
        print(json.dumps(metrics, indent=2, default=str))
        return EXIT_OK
    metrics = score_records(read_predictions(path), family, models, judge_client, Path(path).parent)
    print(json.dumps(metrics, indent=2, default=str))
    return EXIT_OK


def evaluate(model_settings, data: Path, out: Path, tasks=("all",), image_root: Path | None = None,
             baseline: str = "radvlm", limit: int | None = None, progress: bool = True, models=None,
             judge_client=None, answerer=None, seed: int = 0):
    """Run (resumably), score, write results and plots. ``answerer`` overrides model loading
    (tests, remote-code baselines). Returns (results, results.json, results.md, plots)."""
    from training.evaluation.baselines import (
        CheXagentAnswerer,
        LlavaOnevisionAnswerer,
        Maira2Answerer,
        adapter,
        check_runnable,
    )
    from training.evaluation.plots import write_plots
    from training.evaluation.records import expand_tasks, read_predictions
    from training.evaluation.report_writer import write_results
    from training.evaluation.runner import predictions_path, run_evaluation
    from training.evaluation.scoring import score_run

    import dataclasses

    chosen = dataclasses.replace(adapter(baseline), seed=seed)
    check_runnable(baseline)
    if answerer is None:
        if baseline == "chexagent":
            answerer = CheXagentAnswerer(Path(model_settings.path), max_new_tokens=model_settings.max_new_tokens)
        elif baseline == "maira-2":
            answerer = Maira2Answerer(Path(model_settings.path), max_new_tokens=model_settings.max_new_tokens)
        else:
            from inference.model import load_model

            answerer = LlavaOnevisionAnswerer(load_model(model_settings))
    image_root = Path(image_root) if image_root else Path(data).parent
    summary = run_evaluation(data, out, answerer, chosen, expand_tasks(tasks), image_root, limit, progress)
    results = score_run(out, models, judge_client)
    grounding_file = predictions_path(out, "grounding")
    grounding_records = read_predictions(grounding_file) if grounding_file.is_file() else None
    plots = write_plots(out, results, grounding_records, image_root)
    meta = {"model": answerer.model_id, "baseline": baseline, "data": str(data), "seed": seed,
            "max_new_tokens": getattr(model_settings, "max_new_tokens", None),
            "answered this run": summary.answered, "already answered (resumed)": summary.skipped_done,
            "image errors": summary.errors, "run seconds": round(summary.seconds, 2)}
    json_path, md_path = write_results(out, results, meta, plots)
    return results, json_path, md_path, plots
