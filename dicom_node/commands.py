"""`radvlm serve`, `radvlm worker`, `radvlm jobs [list|rerun]`, `radvlm outbox list|retry`.

``add_node_commands(subparsers)`` registers them on the main CLI; each ``cmd_*`` is a thin shell
(argparse namespace → exit code) over a function that tests call directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from config import Settings, load_settings
from dicom_node.errors import NodeError
from dicom_node.jobstore import DELIVERY_STATES, STUDY_STATES, JobStore
from dicom_node.operations import UnknownDeliveryError, UnknownStudyError, delivery_view, retry_deliveries, timeline

# dicom_node.service (and with it torch, transformers, highdicom, fastapi) is imported inside the
# commands that run the node: `radvlm --help` and config errors print in well under a second.

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _time(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")


def _open_store(settings: Settings) -> JobStore:
    from dicom_node.service import jobstore_path

    path = jobstore_path(settings)
    if not path.exists():
        raise NodeError(f"no job store at {path}: has `radvlm serve` run with this data_dir?")
    return JobStore(path)


# ---- functions tests call -------------------------------------------------------------------
def serve(settings: Settings, grace_seconds: float = 30.0, out: TextIO | None = None,
          reload: Callable[[], Settings] | None = None) -> int:
    from dicom_node.service import Node, check_data_dir_free, check_ports

    out = out or sys.stdout  # looked up per call: a default bound at import outlives a closed stream

    check_data_dir_free(settings)  # a second node on one data dir: say that, not "port in use"
    check_ports(settings)  # before the data directory is created: a refused start leaves nothing behind
    node = Node(settings).start()
    print(json.dumps({"event": "ready", "ae_title": settings.node.ae_title, "scp_port": node.scp_port,
                      "http_port": node.http_port, "data_dir": str(settings.node.data_dir)}), file=out, flush=True)
    node.serve_forever(grace_seconds, reload)
    return EXIT_OK


def run_worker(settings: Settings, host: str = "127.0.0.1", port: int = 8000, out: TextIO | None = None,
               stop: threading.Event | None = None) -> int:
    """Serve the chat API alone (no DICOM): an inference endpoint for other nodes or clients.
    Runs until SIGTERM/SIGINT (or ``stop`` is set)."""
    out = out or sys.stdout
    if not settings.api.token:
        raise NodeError("the worker needs a bearer token: set --token, [api] token or RADVLM_API__TOKEN "
                        "(requests carry patient images)")
    from inference.api import create_app
    from inference.chat_service import ChatService
    from inference.model import load_model
    from inference.serving import ThreadedServer

    model = load_model(settings.model)
    service = ChatService.for_model(model, cache_size=settings.api.image_cache_size,
                                    max_batch=settings.inference.max_batch,
                                    max_batch_wait_ms=settings.inference.max_batch_wait_ms)
    app = create_app(service, settings.api, allow_colour=settings.inference.allow_colour)
    try:
        server = ThreadedServer(app, host, port)
    except OSError as exc:
        raise NodeError(f"the worker cannot listen on {host}:{port}: {exc}") from exc
    server.start()
    print(json.dumps({"event": "ready", "url": server.url, "model": model.info.model_id,
                      "version": model.info.version}), file=out, flush=True)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        service.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


def list_jobs(settings: Settings, state: str | None = None, limit: int = 50,
              study_uid: str | None = None) -> list[dict[str, Any]]:
    jobs = _open_store(settings)
    try:
        rows = [jobs.study(study_uid)] if study_uid else jobs.studies(state, limit)
        result = []
        for row in rows:
            if row is None:
                continue
            instances = jobs.instances_of(row["study_instance_uid"])
            result.append({
                "study_instance_uid": row["study_instance_uid"], "state": row["state"], "reason": row["reason"],
                "rule": row["rule"], "selected_sop_instance_uid": row["selected_sop_instance_uid"],
                "routing": json.loads(row["routing"]) if row["routing"] else None,  # the routing rule (docs/operations.md)
                "instances": row["instances"], "attempts": row["attempts"], "interrupted": row["interrupted"],
                "flags": row["flags"], "calling_ae": row["calling_ae"],
                "received": _time(row["first_received_at"]), "updated": _time(row["updated_at"]),
                **_stage_times(jobs, row["study_instance_uid"]),
                "decisions": [{"sop_instance_uid": i["sop_instance_uid"], "decision": i["decision"],
                               "reason": i["reason"]} for i in instances],
                "deliveries": [{"id": d["id"], "destination": d["destination"], "state": d["state"],
                                "tries": d["tries"], "attempts_total": d["attempts_total"],
                                "delivered": d["delivered"], "last_error": d["last_error"], "attempts": d["attempts"]}
                               for d in (delivery_view(jobs, x)
                                         for x in jobs.deliveries(study_uid=row["study_instance_uid"]))],
                "conflicts": [{"sop_instance_uid": c["sop_instance_uid"], "kind": c["kind"], "detail": c["detail"],
                               "at": _time(c["at"])} for c in jobs.conflicts(row["study_instance_uid"])],
            })
        return result
    finally:
        jobs.close()


def _stage_times(jobs: JobStore, study_uid: str) -> dict[str, Any]:
    """``timeline``: the current run's stages with time and seconds to the next; ``states``: the
    time each stage was reached (None: not yet); ``ended``: a skipped/failed end with its reason."""
    line = timeline(jobs, study_uid)
    return {"states": {s["stage"]: s["at"] for s in line["stages"]},
            "timeline": [{k: s[k] for k in ("stage", "at", "seconds_to_next")} for s in line["stages"]],
            "ended": line["ended"], "total_seconds": line["total_seconds"]}


def rerun_studies(settings: Settings, study_uids: Sequence[str]) -> dict[str, str]:
    """Queue finished studies (failed, skipped, written, delivered) for selection and inference again
    with fresh attempt counters; the running node picks them up at its next poll. Returns
    {study: previous state}. Raises NodeError for an unknown study or one still in progress."""
    jobs = _open_store(settings)
    try:
        done = {}
        for uid in study_uids:
            try:
                done[uid] = jobs.rerun_study(uid)
            except KeyError:
                raise NodeError(f"no study {uid} in the job store {jobs.path}") from None
            except ValueError as exc:
                raise NodeError(str(exc)) from None
        return done
    finally:
        jobs.close()


def list_outbox(settings: Settings, state: str | None = None) -> list[dict[str, Any]]:
    """Deliveries; ``tries`` counts the current round, ``attempts`` every try since the first
    (``outbox retry`` starts a new round and keeps them)."""
    jobs = _open_store(settings)
    try:
        return [{"id": d.id, "study_instance_uid": d.study_instance_uid, "destination": d.destination,
                 "kind": d.kind, "state": d.state, "tries": d.tries, "next_attempt": _time(d.next_attempt_at),
                 "delivered": _time(d.delivered_at), "last_error": d.last_error,
                 "attempts_total": view["attempts_total"], "attempts": view["attempts"]}
                for d in jobs.deliveries(state) for view in [delivery_view(jobs, d)]]
    finally:
        jobs.close()


def retry_outbox(settings: Settings, ids: Sequence[int] = (), study_uid: str | None = None,
                 include_delivered: bool = False) -> int:
    """Re-queue dead (or pending, or with --resend delivered) deliveries, keeping their attempt
    history; the running node picks them up at its next poll. Returns how many were queued.
    Raises UnknownDeliveryError / UnknownStudyError (nothing queued) for an unknown id or study."""
    jobs = _open_store(settings)
    try:
        return retry_deliveries(jobs, ids, study_uid, include_delivered)
    finally:
        jobs.close()


# ---- argparse shells ------------------------------------------------------------------------
def quiet_library_loggers() -> None:
    """Libraries' routine INFO lines stay out of the node log: pynetdicom's per-PDU chatter and
    highdicom's "copy attributes of module …" (one per module of every SR/GSPS written)."""
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_library_loggers()
    config = getattr(args, "config", None)
    return serve(_settings(args), grace_seconds=args.grace, reload=lambda: load_settings(config))


def cmd_rules(args: argparse.Namespace) -> int:
    from dicom_node.rules import explain_files

    verdicts = explain_files(_settings(args).rules, args.files, args.calling_ae)
    if args.json:
        print(json.dumps([v.as_dict() for v in verdicts], indent=2))
    else:
        for verdict in verdicts:
            print("\n".join(verdict.lines()))
    return EXIT_BAD_INPUT if any(v.match is None for v in verdicts) else EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = _settings(args)
    settings.model.path = args.model
    if args.token:
        settings.api.token = args.token
    return run_worker(settings, args.host, args.port)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c) or "-")) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c) or "-").ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.action == "rerun":
        if not args.studies:
            print("radvlm jobs rerun: give one or more Study Instance UIDs", file=sys.stderr)
            return EXIT_BAD_INPUT
        for uid, was in rerun_studies(_settings(args), args.studies).items():
            print(f"study {uid} ({was}) queued for selection and inference again")
        return EXIT_OK
    if args.studies:
        print("radvlm jobs: Study Instance UIDs are only taken by `radvlm jobs rerun` (use --study UID)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = list_jobs(_settings(args), args.state, args.limit, args.study)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, ["study_instance_uid", "state", "rule", "instances", "updated", "flags", "reason"]))
        if args.study:
            for row in rows:
                print(_study_details(row))
        conflicts = [(r["study_instance_uid"], c) for r in rows for c in r["conflicts"]]
        for study, c in conflicts:
            print(f"conflict in study {study}: {c['detail']} ({c['at']})")
    return EXIT_OK


def _study_details(row: dict[str, Any]) -> str:
    """``radvlm jobs --study UID`` without --json: decisions per instance, timeline, deliveries."""
    lines = ["", "instances:"]
    lines += [f"  {d['sop_instance_uid']}  {d['decision'] or 'undecided'}: {d['reason'] or '-'}"
              for d in row["decisions"]] or ["  (none)"]
    lines += ["timeline:"]
    for stage in row["timeline"]:
        took = "" if stage["seconds_to_next"] is None else f"  (+{stage['seconds_to_next']:.1f}s to next)"
        lines.append(f"  {stage['stage']:<10} {stage['at'] or '-'}{took}")
    if row["ended"]:
        lines.append(f"  {row['ended']['state']:<10} {row['ended']['at']}: {row['ended']['reason'] or '-'}")
    lines += ["deliveries:"] + ([] if row["deliveries"] else ["  (none)"])
    for d in row["deliveries"]:
        lines.append(f"  #{d['id']} {d['destination']}: {d['state']}, {d['attempts_total']} attempts"
                     + (f", last error: {d['last_error']}" if d["last_error"] else ""))
        lines += [f"    try {a['try']} {a['started']} {a['outcome']}" + (f": {a['error']}" if a["error"] else "")
                  for a in d["attempts"]]
    return "\n".join(lines)


def cmd_outbox(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.outbox_command == "retry":
        if not (args.ids or args.study or args.all_dead):
            print("radvlm outbox retry: give delivery ids, --study UID or --all-dead", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            count = retry_outbox(settings, args.ids, args.study, args.resend)
        except (UnknownDeliveryError, UnknownStudyError) as exc:
            print(f"radvlm outbox retry: {exc.args[0]}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{count} deliveries queued again")
        return EXIT_OK
    rows = list_outbox(settings, args.state)
    print(json.dumps(rows, indent=2) if args.json else
          _table(rows, ["id", "study_instance_uid", "destination", "state", "tries", "next_attempt", "last_error"]))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """`radvlm demo`: node + held-out phantoms + SR/FHIR read-back + evaluation (dicom_node/demo.py)."""
    logging.getLogger().setLevel(getattr(logging, args.log_level.upper()))  # handlers: dicom_node.cli.main
    quiet_library_loggers()
    from dicom_node.demo import run_demo

    settings = _settings(args)
    if args.model:
        settings.model.path = args.model
    result = run_demo(args.count, args.seed, settings, work_dir=args.keep, timeout=args.timeout)
    if args.json:
        print(json.dumps({"metrics": result.metrics, "seconds": result.seconds,
                          "studies": [vars(s) | {"regions": [vars(r) for r in s.regions]} for s in result.studies]},
                         indent=2, default=str))
    return EXIT_OK if result.completed else EXIT_NODE


def add_node_commands(subparsers: argparse._SubParsersAction) -> None:
    serve_p = subparsers.add_parser("serve", help="run the DICOM node (SCP, workers, outbox, /healthz, /metrics)")
    serve_p.add_argument("--config", type=Path, help="TOML settings file (default: $RADVLM_CONFIG or embedded)")
    serve_p.add_argument("--grace", type=float, default=30.0, help="seconds to let running jobs finish on SIGTERM")
    serve_p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve_p.set_defaults(handler=cmd_serve)

    worker_p = subparsers.add_parser("worker", help="serve the OpenAI-compatible chat API of a local model "
                                     "(no DICOM; an inference endpoint)")
    worker_p.add_argument("--model", type=Path, required=True, help="local llava_onevision folder")
    worker_p.add_argument("--config", type=Path, help="TOML settings file ([model], [api] sections)")
    worker_p.add_argument("--host", default="127.0.0.1")
    worker_p.add_argument("--port", type=int, default=8000)
    worker_p.add_argument("--token", help="bearer token clients must send (default: [api] token / RADVLM_API__TOKEN)")
    worker_p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    worker_p.set_defaults(handler=cmd_worker)

    rules_p = subparsers.add_parser("rules", help="routing rules: `radvlm rules test FILE.dcm…` shows which rule"
                                    " matches each file and why")
    rules_sub = rules_p.add_subparsers(dest="rules_command", required=True)
    rules_test = rules_sub.add_parser("test", help="which routing rule matches each DICOM file, and why")
    rules_test.add_argument("files", nargs="+", type=Path, metavar="FILE.dcm")
    rules_test.add_argument("--config", type=Path, help="TOML settings file (default: $RADVLM_CONFIG or embedded)")
    rules_test.add_argument("--calling-ae", help="the sender's AE title to assume (CallingAETitle conditions)")
    rules_test.add_argument("--json", action="store_true")
    rules_test.set_defaults(handler=cmd_rules)

    jobs_p = subparsers.add_parser("jobs", help="list studies with their state and recorded reasons; "
                                   "`radvlm jobs rerun UID…` runs finished or failed studies again")
    jobs_p.add_argument("action", nargs="?", default="list", choices=("list", "rerun"),
                        help="list (default) or rerun: queue the given studies for selection and inference again")
    jobs_p.add_argument("studies", nargs="*", metavar="STUDY_UID", help="with rerun: Study Instance UIDs")
    jobs_p.add_argument("--config", type=Path)
    jobs_p.add_argument("--state", choices=STUDY_STATES)
    jobs_p.add_argument("--study", help="one Study Instance UID, with per-instance decisions")
    jobs_p.add_argument("--limit", type=int, default=50)
    jobs_p.add_argument("--json", action="store_true")
    jobs_p.set_defaults(handler=cmd_jobs)

    outbox_p = subparsers.add_parser("outbox", help="list or re-send result deliveries")
    outbox_sub = outbox_p.add_subparsers(dest="outbox_command", required=True)
    list_p = outbox_sub.add_parser("list", help="deliveries with state, tries and last error")
    list_p.add_argument("--config", type=Path)
    list_p.add_argument("--state", choices=DELIVERY_STATES)
    list_p.add_argument("--json", action="store_true")
    list_p.set_defaults(handler=cmd_outbox)
    retry_p = outbox_sub.add_parser("retry", help="queue dead-lettered deliveries again")
    retry_p.add_argument("--config", type=Path)
    retry_p.add_argument("ids", nargs="*", type=int, help="delivery ids from `radvlm outbox list`")
    retry_p.add_argument("--study", help="all deliveries of one Study Instance UID")
    retry_p.add_argument("--all-dead", action="store_true", help="every dead-lettered delivery")
    retry_p.add_argument("--resend", action="store_true", help="also re-send deliveries already delivered")
    retry_p.set_defaults(handler=cmd_outbox)

    demo_p = subparsers.add_parser("demo", help="the whole chain on held-out synthetic phantoms: node, C-STORE, "
                                   "SR/FHIR read-back vs truth, evaluation metrics (demo model)")
    demo_p.add_argument("--count", type=int, default=16, help="held-out phantom studies to send")
    demo_p.add_argument("--seed", type=int, default=1000, help="phantom seed (the demo model trained on seeds 1–3)")
    demo_p.add_argument("--model", type=Path, help="model folder (default: [model] path, the shipped demo model)")
    demo_p.add_argument("--config", type=Path, help="TOML settings file (the node still runs in a temp dir)")
    demo_p.add_argument("--keep", type=Path, help="work in this folder and keep it (phantoms, node data, outputs)")
    demo_p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the node's results")
    demo_p.add_argument("--json", action="store_true", help="also print the results as JSON")
    demo_p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    demo_p.set_defaults(handler=cmd_demo)
