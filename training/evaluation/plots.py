"""Figures (matplotlib, Agg backend, PNG): per-label F1 bars (paper Figure 4), predicted vs
reference boxes on sample images (Figure 5), histogram of per-reference best IoU."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from inference.errors import InputImageError  # noqa: E402
from inference.image import load_image  # noqa: E402
from inference.parsing import parse_boxes  # noqa: E402


def per_label_f1_rows(classification: Mapping) -> list[tuple[str, int | None, float | None, float | None]]:
    """(label, support, upstream F1 ×100, parser F1 ×100) per label; F1 is None for a label without a
    positive reference (support 0): undefined there, so drawn "n/a", not as F1 = 0."""
    classification = classification.get("all_14", classification)
    upstream, parser = classification["upstream"], classification["parser"]
    supports = upstream.get("support_per_label", {})
    rows = []
    for label in upstream["f1_per_label"]:
        support = supports.get(label)
        defined = support is None or support > 0
        rows.append((label, support, upstream["f1_per_label"][label] * 100 if defined else None,
                     parser["f1_per_label"][label] * 100 if defined else None))
    return rows


def per_label_f1_figure(classification: Mapping):
    """The figure of ``per_label_f1_plot`` (the caller closes it)."""
    rows = per_label_f1_rows(classification)
    macro = classification.get("all_14", classification)
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(rows) + 1.8))
    positions = list(range(len(rows)))
    ax.barh([p - 0.2 for p, r in zip(positions, rows) if r[2] is not None], [r[2] for r in rows if r[2] is not None],
            height=0.4, label="upstream substring rule", color="#4C72B0")
    ax.barh([p + 0.2 for p, r in zip(positions, rows) if r[3] is not None], [r[3] for r in rows if r[3] is not None],
            height=0.4, label="negation-aware parser", color="#DD8452")
    for position, row in zip(positions, rows):
        if row[2] is None:
            ax.text(1, position, "n/a (no positive reference)", va="center", fontsize=8, color="#555555")
    ax.set_yticks(positions, [label if support is None else f"{label} (n={support})"
                              for label, support, _, _ in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("F1 (%)")
    ax.set_title(f"Per-label F1 (macro: {macro['upstream']['f1_macro'] * 100:.1f} upstream, "
                 f"{macro['parser']['f1_macro'] * 100:.1f} parser)")
    # below the axes, never over the bars
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6 / (0.4 * len(rows) + 1.8) * 4), ncol=2, frameon=False)
    return fig


def per_label_f1_plot(classification: Mapping, path: Path) -> Path:
    """Horizontal bars of per-label F1 (×100) under the upstream substring rule and our parser
    (all 14 labels when the metrics carry them, "no finding" included); labels with no positive
    reference are written "n/a", the legend sits below the axes."""
    return _save(per_label_f1_figure(classification), path)


def box_overlay_plot(records: Sequence[Mapping], image_root: Path, path: Path, max_images: int = 4) -> Path:
    """Up to ``max_images`` grounding records drawn as in the paper's Figure 5: the image, the
    reference boxes (green) and the predicted boxes (red, dashed), with what was asked."""
    shown = records[:max_images]
    if not shown:
        raise ValueError("no grounding records to draw")
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False)
    for ax, record in zip(axes[0], shown):
        try:
            image = load_image(Path(image_root) / record["image"])
            pixels = image.pixels
        except (InputImageError, OSError, KeyError):
            pixels = None
        height, width = (pixels.shape if pixels is not None else (100, 100))
        if pixels is not None:
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=255)
        else:
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
        for box in record.get("boxes", []):
            ax.add_patch(_rectangle(box, width, height, "#2ca02c", "-"))
        for box in parse_boxes(str(record.get("output", ""))).boxes:
            ax.add_patch(_rectangle(box.as_list(), width, height, "#d62728", "--"))
        title = str(record.get("label") or record.get("task") or record.get("id"))
        ax.set_title(title[:40], fontsize=8)
        ax.axis("off")
    fig.suptitle("reference (green) vs predicted (red)", fontsize=9)
    return _save(fig, path)


def iou_histogram_figure(values: Sequence[float], title: str = "Best IoU per reference box"):
    """The figure of ``iou_histogram`` (the caller closes it)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.hist(list(values), bins=[i / 10 for i in range(11)], color="#4C72B0", edgecolor="white")
    ax.axvline(0.5, color="#d62728", linestyle="--", label="IoU 0.5")
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_ylabel("reference boxes")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: whole numbers only
    ax.set_title(f"{title} (n={len(values)})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars, not over them
    return fig


def iou_histogram(values: Sequence[float], path: Path, title: str = "Best IoU per reference box") -> Path:
    """Histogram of IoU values in 10 bins over [0, 1], the 0.5 threshold marked, integer count ticks."""
    return _save(iou_histogram_figure(values, title), path)


def _rectangle(box: Sequence[float], width: int, height: int, colour: str, style: str) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box)
    return Rectangle((x1 * width, y1 * height), (x2 - x1) * width, (y2 - y1) * height,
                     fill=False, edgecolor=colour, linestyle=style, linewidth=1.5)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


def write_plots(out_dir: Path, results: Mapping, grounding_records: Sequence[Mapping] | None,
                image_root: Path) -> dict[str, Path]:
    """Every plot the results allow, under ``OUT/plots/``: name → PNG path."""
    from training.evaluation.grounding import mean_best_iou

    plots_dir = Path(out_dir) / "plots"
    plots: dict[str, Path] = {}
    if "classification" in results:
        plots["per_label_f1"] = per_label_f1_plot(results["classification"], plots_dir / "per_label_f1.png")
    if grounding_records:
        plots["box_overlays"] = box_overlay_plot(grounding_records, image_root, plots_dir / "box_overlays.png")
        _, values = mean_best_iou(grounding_records)
        plots["iou_histogram"] = iou_histogram(values, plots_dir / "iou_histogram.png")
    return plots
