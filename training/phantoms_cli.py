"""`radvlm phantoms`: write synthetic chest phantoms (PNG, DICOM, truth, instructions, manifest).

A thin shell over `training.phantoms.dataset.write_phantom_dataset`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.phantoms.records import TASKS, checked_regions


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `radvlm phantoms` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "phantoms", help="generate synthetic chest phantoms with known truth (PNG, DICOM, "
                         "RadVLM truth, LLaVA instructions)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--count", type=int, required=True, help="number of phantoms")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed → same bytes)")
    parser.add_argument("--start", type=int, default=0,
                        help="first phantom index (a disjoint range gives held-out phantoms)")
    parser.add_argument("--size", type=int, default=160, help="longest image side in pixels")
    parser.add_argument("--normal-fraction", type=float, default=0.25,
                        help="share of phantoms without any finding")
    parser.add_argument("--lateral-fraction", type=float, default=0.25,
                        help="share of studies that also get a lateral (LL/RL) image")
    parser.add_argument("--dicom-scale", type=int, default=1,
                        help="DICOM pixel matrix = image × this factor (boxes stay relative)")
    parser.add_argument("--no-dicom", action="store_true", help="skip DICOM export")
    parser.add_argument("--no-png", action="store_true", help="skip PNG export")
    parser.add_argument("--variants", choices=["random", "canonical"], default="random",
                        help="prompt/answer phrasings: random per question, or always the first")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated instruction tasks (default all: {','.join(TASKS)})")
    parser.add_argument("--regions", default="",
                        help="comma-separated anatomical regions to ask about (default: all the phantom "
                             "draws); e.g. the demo model's eight: right lung,left lung,cardiac "
                             "silhouette,mediastinum,trachea,spine,right hemidiaphragm,left hemidiaphragm")
    parser.set_defaults(handler=cmd_phantoms, func=cmd_phantoms)


def cmd_phantoms(args: argparse.Namespace) -> int:
    from training.phantoms.dataset import write_phantom_dataset
    from training.phantoms.sampler import PhantomConfig

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"radvlm phantoms: unknown task(s) {sorted(unknown)}")
    try:
        regions = checked_regions(args.regions.split(","))
    except ValueError as error:
        raise SystemExit(f"radvlm phantoms: {error}") from None
    config = PhantomConfig(size=args.size, normal_fraction=args.normal_fraction,
                           lateral_fraction=args.lateral_fraction)
    summary = write_phantom_dataset(
        args.out, args.count, args.seed, start=args.start, config=config,
        dicom=not args.no_dicom, png=not args.no_png, dicom_scale=args.dicom_scale,
        variants=args.variants, tasks=tasks, regions=regions or None)
    print(f"{summary.count} phantoms ({summary.dicom_files} DICOM files, {summary.laterals} "
          f"laterals, {summary.instructions} instruction records) written to {summary.out} "
          f"in {summary.seconds:.1f}s; synthetic data, not patient images")
    return 0
