"""The evaluation runner end to end on the tiny model and a fixture split; resume; --score; plots; baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.cli import main as radvlm_main
from inference.prompts import (
    CLASSIFICATION_PROMPT,
    REPORT_PROMPT,
    abnormality_grounding_prompt,
    anatomical_grounding_prompt,
    phrase_grounding_prompt,
)
from tests.dicom_samples import make_cr_dataset, write
from training.evaluation.baselines import ADAPTERS, BaselineUnavailableError, LlavaOnevisionAnswerer, check_runnable
from training.evaluation.cli import evaluate
from training.evaluation.records import infer_task, read_predictions


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def fixture_split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (96, 80)), ("b.png", (64, 72))):
        Image.fromarray(rng.integers(0, 255, size=size, dtype=np.uint8), mode="L").save(root / "images" / name)
    write(make_cr_dataset(rows=64, columns=56, photometric="MONOCHROME1"), root / "images" / "c.dcm")
    records = [
        {"id": "rep-a", "image": "images/a.png", "txt": "Heart size is normal. No pleural effusion.",
         "conversations": _turns(REPORT_PROMPT, "Heart size is normal. No pleural effusion.")},
        {"id": "cls-a", "image": "images/a.png", "labels": ["cardiomegaly"],
         "conversations": _turns(CLASSIFICATION_PROMPT, "Yes, there is one abnormality identified: cardiomegaly.")},
        {"id": "ana-a", "image": "images/a.png", "boxes": [[0.1, 0.1, 0.45, 0.8]],
         "conversations": _turns(anatomical_grounding_prompt("right lung"),
                                 "The right lung is located at the coordinates [0.1, 0.1, 0.45, 0.8] on the image.")},
        {"id": "abn-b", "image": "images/b.png",
         "conversations": _turns(abnormality_grounding_prompt("cardiomegaly"),
                                 "The cardiomegaly is located at the coordinates [0.3, 0.4, 0.7, 0.8] on the image.")},
        {"id": "cls-b", "image": "images/b.png",
         "conversations": _turns(CLASSIFICATION_PROMPT, "No abnormalities or lesions are detected on this Chest X-ray.")},
        {"id": "phr-c", "image": "images/c.dcm",
         "conversations": _turns(phrase_grounding_prompt("small left pleural effusion"),
                                 "This sentence is located at the coordinates [0.6, 0.6, 0.9, 0.95] on the image.")},
        {"id": "conv-c", "image": "images/c.dcm", "labels": ["pleural effusion"], "txt": "Small left effusion.",
         "view": "PA", "conversations": _turns("Is there an effusion?", "Yes, on the left.")
            + [{"from": "human", "value": "Is it large?"}, {"from": "gpt", "value": "No, it is small."}]},
        {"id": "gone", "image": "images/missing.png",
         "conversations": _turns(REPORT_PROMPT, "Normal chest.")},
    ]
    (root / "test.json").write_text(json.dumps(records, indent=1))
    return root / "test.json"


def test_tasks_are_inferred_from_the_questions(fixture_split: Path):
    records = {r["id"]: r for r in json.loads(fixture_split.read_text())}
    assert [infer_task(records[i]) for i in ("rep-a", "cls-a", "ana-a", "abn-b", "phr-c", "conv-c")] == [
        "report", "classification", "anatomical_grounding", "abnormality_grounding", "phrase_grounding",
        "conversation"]


def test_runner_end_to_end_resumable_with_results_and_plots(tiny_model, fixture_split: Path, tmp_path: Path):
    out = tmp_path / "eval"
    answerer = LlavaOnevisionAnswerer(tiny_model, max_new_tokens=12)
    kwargs = dict(answerer=answerer, progress=False)
    evaluate(None, fixture_split, out, limit=3, **kwargs)
    first = sum(len(read_predictions(p)) for p in out.glob("predictions-*.jsonl"))
    assert first == 3
    # a killed run can leave a torn last line: it is cut off and the run resumes after the good lines
    grounding = out / "predictions-grounding.jsonl"
    with grounding.open("a") as handle:
        handle.write('{"id": "torn", "outp')
    results, json_path, md_path, plots = evaluate(None, fixture_split, out, **kwargs)
    meta = json.loads(json_path.read_text())["meta"]
    assert meta["already answered (resumed)"] == 3 and meta["answered this run"] == 4 and meta["image errors"] == 1
    assert "missing.png" in (out / "errors.jsonl").read_text()

    lines = {r["id"]: r for p in out.glob("predictions-*.jsonl") for r in read_predictions(p)}
    assert set(lines) == {"rep-a", "cls-a", "ana-a", "abn-b", "cls-b", "phr-c", "conv-c"}
    assert lines["ana-a"]["boxes"] == [[0.1, 0.1, 0.45, 0.8]] and lines["ana-a"]["label"] == "right lung"
    assert lines["abn-b"]["boxes"] == [[0.3, 0.4, 0.7, 0.8]]          # read from the expected answer
    assert lines["cls-b"]["labels"] == ["no finding"]
    assert lines["rep-a"]["txt"].startswith("Heart size") and isinstance(lines["rep-a"]["output"], str)
    assert len(lines["conv-c"]["output"]) == 2 and lines["conv-c"]["conversation"][0]["from"] == "human"
    assert {line["model"] for line in lines.values()} == {"tiny-model0 tiny-random-seed0"}

    assert set(results) == {"report", "classification", "grounding", "conversation"}
    assert set(results["grounding"]["by_task"]) == {"anatomical_grounding", "abnormality_grounding", "phrase_grounding"}
    assert 0.0 <= results["grounding"]["mAP_0.5"] <= 1.0
    assert results["report"]["bertscore"].startswith("not computed")
    assert results["conversation"]["judge_score"].startswith("not computed")
    markdown = md_path.read_text()
    assert "| anatomical_grounding | mAP@0.5 | 85.8 |" in markdown and "| report | ROUGE-L | 25.4 |" in markdown
    for name in ("per_label_f1", "box_overlays", "iou_histogram"):
        with Image.open(plots[name]) as image:
            assert image.format == "PNG" and image.size[0] > 100
    print("\n" + markdown)   # the results table of the fixture split (pytest -s shows it)

    # a third run has nothing left to answer
    _, json_path, _, _ = evaluate(None, fixture_split, out, **kwargs)
    assert json.loads(json_path.read_text())["meta"]["answered this run"] == 0


def test_score_mode_prints_metrics_json(tmp_path: Path, capsys):
    path = tmp_path / "pred.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"output": "The left lung is located at the coordinates [0.5, 0.1, 0.9, 0.9] on the image.",
         "boxes": [[0.5, 0.1, 0.9, 0.9]]},
        {"output": "The trachea is at [0.4, 0.0, 0.6, 0.3].", "boxes": [[0.0, 0.5, 0.2, 0.9]]}]) + "\n")
    assert radvlm_main(["evaluate", "--score", str(path), "--task", "grounding"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["mAP_0.5"] == pytest.approx(0.5) and metrics["avg_iou"] == pytest.approx(0.5)
    assert radvlm_main(["evaluate", "--score", str(path), "--task", "classification"]) == 2   # no 'labels'
    assert "labels" in capsys.readouterr().err


def test_baseline_adapters(tiny_model, fixture_split: Path, tmp_path: Path):
    chexagent = ADAPTERS["chexagent"]
    from training.evaluation.baselines import CHEXAGENT_ABNORMALITY_GROUNDING, CHEXAGENT_REGION_GROUNDING

    asked = [chexagent.question("abnormality_grounding", "Where is the x located?", "cardiomegaly", key=f"r{i}")
             for i in range(40)]
    allowed = {t.format("cardiomegaly") for t in CHEXAGENT_ABNORMALITY_GROUNDING}
    assert set(asked) <= allowed and len(set(asked)) > 3                  # sampled among the ten templates
    assert asked == [chexagent.question("abnormality_grounding", "q", "cardiomegaly", key=f"r{i}")
                     for i in range(40)]                                  # same seed + id → same question
    import dataclasses
    reseeded = dataclasses.replace(chexagent, seed=1)
    assert asked != [reseeded.question("abnormality_grounding", "q", "cardiomegaly", key=f"r{i}") for i in range(40)]
    assert {chexagent.question("anatomical_grounding", "q", "left lung", key=f"r{i}") for i in range(20)} == {
        t.format("left lung") for t in CHEXAGENT_REGION_GROUNDING}
    assert ADAPTERS["llava-onevision"].checkpoint == "llava-hf/llava-onevision-qwen2-7b-si-hf"
    assert chexagent.convert_answer("abnormality_grounding", "<|ref|>x<|/ref|><|box|> (12,30),(48,77) <|/box|>") == \
        "[0.12, 0.30, 0.48, 0.77]"
    assert chexagent.convert_answer("abnormality_grounding", "no box") == ""
    assert ADAPTERS["radialog"].question("report", "Provide a radiology report", None) == \
        "Write a radiology report for this X-Ray."
    with pytest.raises(BaselineUnavailableError, match="LLAVA_Biovil"):
        check_runnable("radialog")
    # LLaVA-OneVision with RadVLM's prompts: same architecture, runs through the same runner
    out = tmp_path / "llava-ov"
    results, _, _, _ = evaluate(None, fixture_split, out, tasks=["classification"], baseline="llava-onevision",
                                answerer=LlavaOnevisionAnswerer(tiny_model, max_new_tokens=8), progress=False)
    lines = read_predictions(out / "predictions-classification.jsonl")
    assert {line["baseline"] for line in lines} == {"llava-onevision"} and len(lines) == 2
    assert lines[0]["instr"] == CLASSIFICATION_PROMPT and results["classification"]["n_samples"] == 2


def test_evaluate_defaults_to_upstream_max_new_tokens():
    import argparse

    from training.evaluation.cli import EVAL_MAX_NEW_TOKENS, add_command

    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--model", "m", "--data", "d", "--out", "o"])
    assert args.max_new_tokens == EVAL_MAX_NEW_TOKENS == 1500 and args.seed == 0


def test_evaluate_defaults_to_the_configured_model(tiny_model_dir: Path, fixture_split: Path, tmp_path: Path,
                                                    capsys):
    config = tmp_path / "radvlm.toml"
    config.write_text(f'[model]\npath = "{tiny_model_dir}"\n')
    out = tmp_path / "out"
    assert radvlm_main(["evaluate", "--config", str(config), "--data", str(fixture_split), "--out", str(out),
                        "--tasks", "classification", "--limit", "1", "--max-new-tokens", "4", "--no-progress"]) == 0
    assert f"model {tiny_model_dir}" in capsys.readouterr().err
    assert list(out.glob("predictions-*.jsonl"))


def test_plots_zero_support_is_na_counts_are_integers_legend_off_the_bars():
    import matplotlib.pyplot as plt

    from training.evaluation.plots import iou_histogram_figure, per_label_f1_figure, per_label_f1_rows

    metrics = {side: {"f1_macro": 0.5, "f1_per_label": {"Cardiomegaly": 0.8, "Edema": 0.0, "Pneumothorax": 0.0},
                      "support_per_label": {"Cardiomegaly": 3, "Edema": 2, "Pneumothorax": 0}}
               for side in ("upstream", "parser")}
    rows = per_label_f1_rows(metrics)
    assert rows[1] == ("Edema", 2, 0.0, 0.0) and rows[2] == ("Pneumothorax", 0, None, None)
    fig = per_label_f1_figure(metrics)
    try:
        ax = fig.axes[0]
        assert len(ax.patches) == 4  # two labels with support × two rules; none drawn for Pneumothorax
        assert [t.get_text() for t in ax.texts] == ["n/a (no positive reference)"]
        fig.canvas.draw()
        legend = ax.get_legend().get_window_extent()
        axes_box = ax.get_window_extent()
        assert legend.y1 <= axes_box.y0  # below the axes
    finally:
        plt.close(fig)
    fig = iou_histogram_figure([0.1, 0.55, 0.6])
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        assert all(float(tick).is_integer() for tick in ax.get_yticks())
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    finally:
        plt.close(fig)
