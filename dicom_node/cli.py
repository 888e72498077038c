"""The `radvlm` command line. Each subcommand is a thin shell over functions tests call directly.

Exit codes: 0 ok; 2 bad input (file, configuration, arguments); 3 model problem (missing or
incomplete weights, processor, load failure); 4 node problem (port in use, data directory locked,
no job store) — each with a one-line reason on stderr; 130 interrupted (Ctrl-C); 141 the reader of
stdout went away (``radvlm jobs | head``), silently.

Start-up stays light: heavy libraries (torch, transformers, highdicom, fastapi) are imported inside
the subcommand functions, so ``--help`` and configuration errors print at once
(benchmarks/bench_cli_startup.py measures it; tests/test_cli_startup.py bounds it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from config import ConfigError, Settings, load_settings
from dicom_node.errors import NodeError
from inference.errors import InputImageError, ModelError
from sr_writer.errors import WriterError

EXIT_OK, EXIT_BAD_INPUT, EXIT_MODEL, EXIT_NODE = 0, 2, 3, 4
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE, as a shell reports them

# Packages that add subcommands: (module, function taking argparse's subparsers).
COMMAND_PROVIDERS = (
    ("dicom_node.commands", "add_node_commands"),
    ("training.commands", "add_training_commands"),
)


class UsageError(Exception):
    """Bad command-line arguments (exit code 2)."""


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(getattr(args, "config", None))
    if getattr(args, "model", None):
        settings.model.path = Path(args.model)
    if getattr(args, "tasks", None):
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        unknown = set(tasks) - {"report", "classification", "grounding"}
        if unknown:
            raise UsageError(f"--tasks: unknown task(s) {sorted(unknown)}; use report,classification,grounding")
        settings.inference.tasks = tasks
    return settings


def format_result(result) -> str:
    """A short human-readable rendering of a StudyResult."""
    source = result.source
    lines = [f"*** {result.notice} ***",
             f"model:    {result.model.model_id} (version {result.model.version}, "
             f"weights sha256 {result.model.weights_sha256[:16]}…)",
             f"source:   {source.file_name or '-'}  SOP Instance UID {source.sop_instance_uid or '-'}  "
             f"{source.columns}×{source.rows} (columns×rows)"]
    if result.findings_text is not None:
        lines.append(f"findings: {result.findings_text or '(empty answer)'}")
    if result.labels:
        lines.append("labels:   " + (", ".join(result.positive_labels) or "none present"))
    for region in result.regions:
        boxes = "; ".join(
            f"[{b.x1:.3f}, {b.y1:.3f}, {b.x2:.3f}, {b.y2:.3f}] → pixels "
            + "({:.1f}, {:.1f}, {:.1f}, {:.1f})".format(*b.to_pixels(source.columns, source.rows))
            for b in region.boxes) or "no box"
        lines.append(f"region:   {region.task} {region.query!r}: {boxes}")
        lines.extend(f"          dropped: {reason}" for reason in region.dropped)
    lines.append("timings:  " + ", ".join(f"{task} {seconds:.3f}s" for task, seconds in result.timings.items()))
    return "\n".join(lines)


def not_a_frontal_chest(path: Path) -> str | None:
    """Why the node would skip the DICOM file ``path`` (lateral, decubitus or unknown view, not a
    chest, multi-frame …) as its selector decides (``dicom_node.selector.classify``), or None for a
    frontal chest radiograph. PNG/JPEG files carry no header to judge: None."""
    from pydicom.errors import InvalidDicomError

    from dicom_node.selector import FRONTAL, Candidate, classify, read_header

    try:
        header = read_header(path)
    except (InvalidDicomError, OSError, ValueError):
        return None  # not DICOM: load_image reports what is wrong with it
    decision = classify(Candidate(str(header.get("SOPInstanceUID", "")), header))
    return None if decision.decision == FRONTAL else decision.reason


def cmd_infer(args: argparse.Namespace) -> int:
    from inference.image import load_image
    from inference.model import load_model
    from inference.tasks import run_study

    settings = _settings(args)
    skipped = not_a_frontal_chest(args.file)
    if skipped:
        if not args.force:
            raise UsageError(f"{args.file} is not a frontal chest radiograph ({skipped}); the node skips such "
                             "images and the model was trained only on frontal chest X-rays. Use --force to "
                             "analyse it anyway")
        print(f"radvlm: warning: {args.file} is not a frontal chest radiograph ({skipped}); analysing it "
              "anyway (--force): the answers are not meaningful", file=sys.stderr)
    image = load_image(args.file, allow_colour=settings.inference.allow_colour,
                       max_pixels=settings.inference.max_image_pixels)
    model = load_model(settings.model)
    result = run_study(model, image, settings.inference)
    if args.sr or args.gsps or args.fhir:
        import pydicom

        from sr_writer import write_outputs

        source = pydicom.dcmread(args.file)
        write_outputs(result, source, settings.sr, sr_path=args.sr, gsps_path=args.gsps, fhir_path=args.fhir)
    print(result.model_dump_json(indent=2) if args.json else format_result(result))
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    if args.url:
        import os

        from inference.api_client import ApiClientError, ChatApiClient, image_url_for_file, run_remote_chat

        if (args.file is None) == (args.study is None):
            raise UsageError("radvlm chat --url: give either an image FILE or --study UID")
        image_url = f"dicom:study/{args.study}" if args.study else image_url_for_file(args.file)
        client = ChatApiClient(args.url, args.token or os.environ.get("RADVLM_API__TOKEN"))
        try:
            run_remote_chat(client, image_url, input_stream=sys.stdin, output_stream=sys.stdout)
        except ApiClientError as exc:
            print(f"radvlm: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return EXIT_OK
    from inference.chat import run_terminal_chat
    from inference.image import load_image
    from inference.model import load_model

    if args.file is None or args.study:
        raise UsageError("radvlm chat: give an image FILE (--study needs --url of a running node)")
    settings = _settings(args)
    image = load_image(args.file, allow_colour=settings.inference.allow_colour,
                       max_pixels=settings.inference.max_image_pixels)
    model = load_model(settings.model)
    run_terminal_chat(model, image, input_stream=sys.stdin, output_stream=sys.stdout)
    return EXIT_OK


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from inference.tiny import build_tiny_model

    out = build_tiny_model(args.out_dir, seed=args.seed)
    print(f"tiny random LlavaOnevision written to {out} (random weights: for tests and smoke runs only)")
    return EXIT_OK


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from inference.onnx_vision import export_vision_onnx

    out = export_vision_onnx(args.model, args.out, opset=args.opset)
    print(f"vision tower + projector exported to {out} (dynamic tile count); use it with "
          f"[model] vision_backend = \"onnxruntime\" and onnx_dir = \"{args.out}\"")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radvlm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    infer = sub.add_parser("infer", help="run the RadVLM task plan on one DICOM/PNG/JPEG file")
    infer.add_argument("file", type=Path)
    infer.add_argument("--model", type=Path, help="local llava_onevision folder (overrides [model] path)")
    infer.add_argument("--config", type=Path, help="TOML configuration file")
    infer.add_argument("--tasks", help="comma-separated: report,classification,grounding")
    infer.add_argument("--json", action="store_true", help="print the typed result as JSON")
    infer.add_argument("--sr", type=Path, help="write a TID 1500 Comprehensive 3D SR here")
    infer.add_argument("--gsps", type=Path, help="write a grayscale softcopy presentation state here")
    infer.add_argument("--fhir", type=Path, help="write a FHIR R4 transaction Bundle (JSON) here")
    infer.add_argument("--force", action="store_true",
                       help="analyse a DICOM image the node would skip (lateral or unknown view, not a chest); "
                            "without it such a file is refused with exit code 2")
    infer.set_defaults(handler=cmd_infer)

    chat = sub.add_parser("chat", help="multi-turn conversation about one image in the terminal "
                          "(local model, or a running node/worker with --url)")
    chat.add_argument("file", type=Path, nargs="?", help="DICOM/PNG/JPEG image")
    chat.add_argument("--model", type=Path)
    chat.add_argument("--config", type=Path)
    chat.add_argument("--url", help="OpenAI-compatible API of a running node or worker, e.g. http://127.0.0.1:8089")
    chat.add_argument("--token", help="bearer token of that API (default: $RADVLM_API__TOKEN)")
    chat.add_argument("--study", help="with --url: a Study Instance UID the node received, instead of FILE")
    chat.set_defaults(handler=cmd_chat)

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight model folder (tests, smoke runs)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=cmd_tiny_model)

    onnx = sub.add_parser("export-onnx", help="export the vision tower + projector to ONNX (onnxruntime image "
                          "encoder, [model] vision_backend)")
    onnx.add_argument("--model", type=Path, required=True, help="local llava_onevision folder")
    onnx.add_argument("--out", type=Path, required=True, help="folder for vision.onnx and vision.json")
    onnx.add_argument("--opset", type=int, default=17)
    onnx.set_defaults(handler=cmd_export_onnx)

    for module_name, function_name in COMMAND_PROVIDERS:
        if importlib.util.find_spec(module_name) is not None:
            getattr(importlib.import_module(module_name), function_name)(sub)
    return parser


def _quiet_stdout() -> None:
    """stdout's reader is gone: point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (tests): nothing to redirect
        pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # inside the try: a reader that left shows here, not at the interpreter's exit
            sys.stdout.flush()
    except BrokenPipeError:  # `radvlm jobs | head`: the reader has what it wanted
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("radvlm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # "copy attributes of module …" per SR/GSPS
    logging.getLogger("radvlm.access").setLevel(logging.INFO)  # the API's access log (no PHI) is on by default
    try:
        return args.handler(args)
    except (InputImageError, WriterError, ConfigError, UsageError, FileNotFoundError, IsADirectoryError) as exc:
        print(f"radvlm: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelError as exc:
        print(f"radvlm: model problem: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_MODEL
    except NodeError as exc:
        print(f"radvlm: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_NODE


if __name__ == "__main__":
    sys.exit(main())
