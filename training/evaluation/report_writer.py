"""The results file: our metrics beside the paper's (RadVLM, Tables 3–6), as JSON and Markdown."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PaperRow:
    task: str        # our task name
    metric: str      # as shown
    paper: float     # RadVLM's published value
    family: str
    key: tuple[str, ...]  # path into the family's metrics (within by_task[task] for grounding)
    scale: float = 100.0  # ours × scale is comparable with the paper


PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow("report", "BertScore", 51.9, "report", ("bertscore",)),
    PaperRow("report", "ROUGE-L", 25.4, "report", ("rouge_l",)),
    PaperRow("report", "RadGraph F1 (partial)", 18.2, "report", ("radgraph_partial",)),
    PaperRow("report", "GREEN", 27.7, "report", ("green",)),
    PaperRow("classification", "macro-F1, 13 pathologies (upstream substring rule)", 45.8, "classification",
             ("upstream", "f1_macro")),
    PaperRow("anatomical_grounding", "mAP@0.5", 85.8, "grounding", ("by_task", "anatomical_grounding", "mAP_0.5")),
    PaperRow("abnormality_grounding", "mAP@0.5", 34.6, "grounding", ("by_task", "abnormality_grounding", "mAP_0.5")),
    PaperRow("phrase_grounding", "mAP@0.5", 81.8, "grounding", ("by_task", "phrase_grounding", "mAP_0.5")),
    PaperRow("conversation", "LLM judge (/10)", 6.66, "conversation", ("by_task", "conversation", "judge_score"), 1.0),
    PaperRow("grounded_conversation", "LLM judge (/10)", 6.60, "conversation",
             ("by_task", "grounded_conversation", "judge_score"), 1.0),
)
"""The paper's headline numbers. "RadGraph F1" is compared with the partial reward (upstream
computes simple, partial and complete; the paper's table does not say which — assumption)."""

EXTRA_ROWS: tuple[tuple[str, str, str, tuple[str, ...], float], ...] = (
    ("classification", "macro-F1, 13 pathologies (negation-aware parser)", "classification", ("parser", "f1_macro"),
     100.0),
    ("classification", "micro-F1, 13 pathologies (upstream substring rule)", "classification",
     ("upstream", "f1_micro"), 100.0),
    ("classification", "macro-F1, 14 labels incl. no finding (upstream rule; not upstream's row)", "classification",
     ("all_14", "upstream", "f1_macro"), 100.0),
    ("classification", "macro-F1, 14 labels incl. no finding (parser; not upstream's row)", "classification",
     ("all_14", "parser", "f1_macro"), 100.0),
    ("grounding (all)", "mAP@0.5 (upstream)", "grounding", ("mAP_0.5",), 100.0),
    ("grounding (all)", "COCO AP50 (pycocotools)", "grounding", ("coco_AP50",), 100.0),
    ("grounding (all)", "COCO AP@[.5:.95]", "grounding", ("coco_AP",), 100.0),
    ("grounding (all)", "avg IoU, all pairs (upstream)", "grounding", ("avg_iou",), 100.0),
    ("grounding (all)", "mean best IoU per reference box", "grounding", ("mean_iou",), 100.0),
    ("conversation (all)", "LLM judge (/10)", "conversation", ("judge_score",), 1.0),
)


def _lookup(results: Mapping, family: str, key: tuple[str, ...]):
    node = results.get(family)
    for part in key:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _show(value, scale: float) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value * scale:.1f}" if scale != 1.0 else f"{value:.2f}"


def _count(results: Mapping, family: str, key: tuple[str, ...]) -> str:
    if key and key[0] == "by_task":
        n = _lookup(results, family, key[:2] + ("n_samples",))
    else:
        n = _lookup(results, family, ("n_samples",))
    return str(n) if n is not None else "—"


def comparison_rows(results: Mapping) -> list[dict]:
    """One row per paper metric (ours may be "—" when the task was not run) and per extra metric."""
    rows = []
    for row in PAPER_ROWS:
        value = _lookup(results, row.family, row.key)
        rows.append({"task": row.task, "metric": row.metric, "paper": row.paper,
                     "ours": _show(value, row.scale), "n": _count(results, row.family, row.key)})
    for task, metric, family, key, scale in EXTRA_ROWS:
        value = _lookup(results, family, key)
        if value is not None:
            rows.append({"task": task, "metric": metric, "paper": None, "ours": _show(value, scale),
                         "n": _count(results, family, key)})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| task | metric | paper (RadVLM) | ours | n |", "|---|---|---|---|---|"]
    for row in rows:
        paper = "—" if row["paper"] is None else f"{row['paper']:g}"
        lines.append(f"| {row['task']} | {row['metric']} | {paper} | {row['ours']} | {row['n']} |")
    return "\n".join(lines)


def write_results(out_dir: Path, results: Mapping, meta: Mapping, plots: Mapping[str, Path]) -> tuple[Path, Path]:
    """``OUT/results.json`` (all metrics, the comparison rows, run metadata, plot paths) and
    ``OUT/results.md`` (the comparison table, per-label F1 and the plots)."""
    out_dir = Path(out_dir)
    rows = comparison_rows(results)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps({"meta": dict(meta), "comparison": rows, "metrics": results,
                                     "plots": {k: str(v) for k, v in plots.items()}}, indent=2, default=str))
    parts = ["# RadVLM evaluation results", "",
             "Scores ×100 except the judge (/10). Paper: RadVLM (Deperrois et al.), Tables 3–6. "
             "Metrics marked \"not computed\" need a locally supplied model (docs/evaluation.md).", ""]
    parts += [f"- {key}: {value}" for key, value in meta.items()]
    parts += ["", markdown_table(rows), ""]
    classification = results.get("classification")
    if classification:
        per_label = classification.get("all_14", classification)
        parts += ["## Per-label F1 (classification)", "",
                  "Macro-F1 in the table above averages the 13 pathologies (upstream); \"no finding\" "
                  "enters only the 14-label rows.", "", "| label | upstream rule | parser | support |",
                  "|---|---|---|---|"]
        for label, value in per_label["upstream"]["f1_per_label"].items():
            parts.append(f"| {label} | {value * 100:.1f} | {per_label['parser']['f1_per_label'][label] * 100:.1f} "
                         f"| {per_label['upstream']['support_per_label'][label]} |")
        parts.append("")
    conversation = results.get("conversation")
    if conversation and conversation.get("n_invalid") is not None:
        parts += [f"Judge: {conversation.get('n_valid', 0)} valid scores, {conversation['n_invalid']} invalid, "
                  f"{conversation['n_failed']} failed requests.", ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{name}]({Path(path).relative_to(out_dir)})" for name, path in plots.items()]
    md_path.write_text("\n".join(parts) + "\n")
    return json_path, md_path
