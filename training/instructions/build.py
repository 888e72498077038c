"""Build the instruction dataset: read sources, render with seeded phrasings, write LLaVA files.

Output folder::

    train.jsonl | train.json     records {"image", "conversations", "id"}, shuffled (seeded)
    test.jsonl  | test.json      the sources' test splits, one pass each, kept apart
    manifest.json                counts per split × component / task / source, skipped inputs,
                                 seed and the job configuration (secrets masked)
    images/site/                 de-identified PNG exports of the site's own images (if any)

Determinism: the RNG of a (component, split, repeat) is ``random.Random("{seed}|{component}|
{split}|{repeat}")`` (string seeds are stable across Python runs), the Chest ImaGenome subset of
a repeat and the final shuffle likewise; nothing depends on dict order or time.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from training.instructions.config import BuildConfig
from training.instructions.mix import COMPONENTS, Component, SourceSet
from training.instructions.render import conversations
from training.sources.errors import MissingSourceFileError
from training.sources.samples import SourceSample

MANIFEST = "manifest.json"


@dataclass
class ComponentReport:
    name: str
    source: str
    task: str
    repeat: int
    status: str = "ok"
    samples: dict[str, int] = field(default_factory=dict)   # split → source samples
    records: dict[str, int] = field(default_factory=dict)   # split → records written


@dataclass
class BuildSummary:
    out_dir: Path
    files: dict[str, Path]
    components: list[ComponentReport]
    counts: dict[str, dict[str, Any]]
    skipped: dict[str, dict[str, int]]


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random("|".join(str(p) for p in (seed, *parts)))


def _select(config: BuildConfig, item: Component, samples: list[SourceSample],
            repeat: int) -> list[SourceSample]:
    cap = config.mix.chest_imagenome_samples
    if item.source != "chest_imagenome" or cap is None or len(samples) <= cap:
        return samples
    picked = sorted(_rng(config.seed, item.name, "subset", repeat).sample(range(len(samples)), cap))
    return [samples[i] for i in picked]


def _records(config: BuildConfig, item: Component, split: str, samples: list[SourceSample],
             repeats: int, bar: tqdm) -> list[dict[str, Any]]:
    records = []
    for repeat in range(1, repeats + 1):
        rng = _rng(config.seed, item.name, split, repeat)
        for index, sample in enumerate(_select(config, item, samples, repeat)):
            records.append({"image": sample.image, "conversations": conversations(sample, rng),
                            "id": f"{item.name}-{split}{repeat}_{index}"})
            bar.update(1)
    return records


def _counts(records: list[dict[str, Any]], owners: list[Component]) -> dict[str, Any]:
    return {"total": len(records),
            "by_component": dict(Counter(c.name for c in owners)),
            "by_task": dict(Counter(c.task for c in owners)),
            "by_source": dict(Counter(c.source for c in owners))}


def _write(path: Path, records: list[dict[str, Any]], output_format: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as handle:
        if output_format == "json":
            json.dump(records, handle, ensure_ascii=False, indent=1)
        else:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def build_dataset(config: BuildConfig, out_dir: Path, *, progress: bool = True,
                  stream: TextIO | None = None) -> BuildSummary:
    """Build the dataset described by ``config`` into ``out_dir`` (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = SourceSet(config, out_dir)
    per_split: dict[str, list[tuple[dict[str, Any], Component]]] = {s: [] for s in config.splits}
    reports = []
    with tqdm(total=0, unit="rec", disable=not progress, file=stream or sys.stderr,
              desc="building") as bar:
        for item in COMPONENTS:
            repeat = getattr(config.mix, item.name)
            report = ComponentReport(item.name, item.source, item.task, repeat)
            reports.append(report)
            if repeat == 0:
                report.status = "disabled (repeat 0)"
                continue
            missing = sources.unconfigured(item)
            if missing:
                report.status = "not configured: " + ", ".join(f"[sources.{m}]" for m in missing)
                continue
            bar.set_description(item.name)
            plan = [("train", list(item.train_splits), repeat)] if "train" in config.splits else []
            if "test" in config.splits and item.has_test:
                plan.append(("test", ["test"], 1))
            for split, source_splits, repeats in plan:
                try:
                    samples = [s for name in source_splits for s in sources.samples(item, name)]
                except MissingSourceFileError as exc:
                    if not item.optional_input:
                        raise
                    report.status = f"no {split} input ({exc.path.name}/ absent)"
                    continue
                report.samples[split] = len(samples)
                bar.total += len(_select(config, item, samples, 1)) * repeats
                bar.refresh()
                records = _records(config, item, split, samples, repeats, bar)
                report.records[split] = len(records)
                per_split[split] += [(record, item) for record in records]
    files, counts = {}, {}
    for split, pairs in per_split.items():
        if split == "train" and config.shuffle:
            _rng(config.seed, "shuffle").shuffle(pairs)
        records = [record for record, _ in pairs]
        files[split] = out_dir / f"{split}.{config.output_format}"
        _write(files[split], records, config.output_format)
        counts[split] = _counts(records, [owner for _, owner in pairs])
    skipped = {source: dict(reasons) for source, reasons in sources.skipped.items() if reasons}
    if config.sources.site:
        skipped["site"] = dict(sources.site().skipped)
    summary = BuildSummary(out_dir, files, reports, counts, skipped)
    _write_manifest(summary, config)
    return summary


def _write_manifest(summary: BuildSummary, config: BuildConfig) -> None:
    manifest = {
        "format": "llava",
        "prompts": "inference.prompts",
        "seed": config.seed,
        "files": {split: path.name for split, path in summary.files.items()},
        "counts": summary.counts,
        "components": [vars(report) for report in summary.components],
        "skipped_inputs": summary.skipped,
        "config": json.loads(config.model_dump_json()),
    }
    (summary.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n",
                                            encoding="utf-8")


def format_summary(summary: BuildSummary) -> str:
    """The table ``radvlm build-dataset`` prints: one row per component, then totals."""
    header = ("component", "task", "repeat", "train samples", "train records", "test records",
              "status")
    rows = [(r.name, r.task, str(r.repeat), str(r.samples.get("train", "-")),
             str(r.records.get("train", "-")), str(r.records.get("test", "-")), r.status)
            for r in summary.components]
    totals = ("total", "", "", "", str(summary.counts.get("train", {}).get("total", "-")),
              str(summary.counts.get("test", {}).get("total", "-")), "")
    widths = [max(len(row[i]) for row in [header, *rows, totals]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    out = [line(header), rule, *(line(row) for row in rows), rule, line(totals)]
    for split, count in summary.counts.items():
        by_task = ", ".join(f"{task} {n}" for task, n in sorted(count["by_task"].items()))
        out.append(f"{split}: {count['total']} records ({by_task or 'none'}) → "
                   f"{summary.files[split]}")
    for source, reasons in summary.skipped.items():
        if reasons:
            out.append(f"{source}: left out " + ", ".join(f"{n} × {why}"
                                                          for why, n in sorted(reasons.items())))
    return "\n".join(out)
