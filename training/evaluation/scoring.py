"""Scoring a set of prediction records per task family (no model needed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from training.evaluation.records import FAMILIES, family_of, read_predictions
from training.evaluation.report import ReportModels, report_metrics


def score_records(records: Iterable[Mapping], family: str, models: ReportModels | None = None,
                  judge_client=None, output_dir: Path | None = None) -> dict:
    """The metrics of one family over ``records`` (each with ``output`` and the reference:
    ``boxes`` / ``labels`` / ``txt`` / ``conversation``). Grounding and conversation records that
    carry a ``task`` are also scored per task (``by_task``), since the paper reports anatomical,
    abnormality and phrase grounding, and standard and grounded conversations, separately."""
    records = list(records)
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}")
    if not records:
        raise ValueError(f"no {family} records to score")
    if family == "grounding":
        from training.evaluation.grounding import grounding_metrics

        result = grounding_metrics(records)
        result["by_task"] = _by_task(records, grounding_metrics)
        return result
    if family == "classification":
        from training.evaluation.classification import classification_metrics

        return classification_metrics(records)
    if family == "report":
        for record in records:
            if "output" not in record or "txt" not in record:
                raise KeyError("both 'output' and 'txt' must be in every report record")
        return report_metrics([r["txt"] for r in records], [r["output"] for r in records], models, output_dir)
    from training.evaluation.judge import judge_conversations

    result = judge_conversations(records, judge_client)
    tasks = sorted({str(record["task"]) for record in records if record.get("task")})
    if judge_client is not None and tasks:
        result["by_task"] = {}
        for task in tasks:
            valid = [score for record, score in zip(records, result["scores"])
                     if record.get("task") == task and score is not None]
            result["by_task"][task] = {
                "n_samples": sum(1 for record in records if record.get("task") == task), "n_valid": len(valid),
                "judge_score": sum(valid) / len(valid) if valid else "not computed: no valid judge score"}
    return result


def _by_task(records: list[Mapping], metric) -> dict:
    tasks = sorted({str(record["task"]) for record in records if record.get("task")})
    return {task: metric([record for record in records if record.get("task") == task]) for task in tasks}


def score_run(out_dir: Path, models: ReportModels | None = None, judge_client=None) -> dict:
    """Scores of every ``predictions-{family}.jsonl`` in ``out_dir``: family → metrics."""
    results = {}
    for family in FAMILIES:
        path = Path(out_dir) / f"predictions-{family}.jsonl"
        if path.is_file():
            records = read_predictions(path)
            for record in records:
                if record.get("task") and family_of(str(record["task"])) != family:
                    raise ValueError(f"{path}: record {record.get('id')!r} is a {record['task']} record")
            if records:
                results[family] = score_records(records, family, models, judge_client, Path(out_dir))
    return results
