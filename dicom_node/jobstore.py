"""The embedded job store: SQLite in WAL mode under ``node.data_dir``.

One row per received instance, one per study (the job, design §1), one per (study, destination)
delivery, and an append-only ``events`` table of every state change. Every method is one
committed transaction (``synchronous=FULL``), so a state the node reports or acknowledges
survives a crash. Study states::

    received → selected | skipped(reason) → inferring → written → delivered | failed(reason)

Delivery states: pending → sending → delivered | pending (retry, with next_attempt_at) | dead.
Every try of a delivery is kept in ``delivery_attempts`` (outcome ``sending`` while it runs, then
``delivered``, ``retry`` or ``dead``, with its error); ``outbox retry`` starts a new round of tries
(``tries`` counts the current round) and adds a ``requeued`` row, so the history survives.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECEIVED, SELECTED, SKIPPED, INFERRING, WRITTEN, DELIVERED, FAILED = (
    "received", "selected", "skipped", "inferring", "written", "delivered", "failed")
STUDY_STATES = (RECEIVED, SELECTED, SKIPPED, INFERRING, WRITTEN, DELIVERED, FAILED)
PENDING, SENDING, DEAD = "pending", "sending", "dead"
DELIVERY_STATES = (PENDING, SENDING, DELIVERED, DEAD)

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    modality            TEXT,
    transfer_syntax_uid TEXT,
    path                TEXT NOT NULL,
    sha256              TEXT NOT NULL,
    size                INTEGER NOT NULL,
    calling_ae          TEXT,
    received_at         REAL NOT NULL,
    decision            TEXT,
    reason              TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid        TEXT PRIMARY KEY,
    state                     TEXT NOT NULL,
    reason                    TEXT,
    rule                      TEXT,
    selected_sop_instance_uid TEXT,
    patient_hash              TEXT,
    calling_ae                TEXT,
    instances                 INTEGER NOT NULL DEFAULT 0,
    first_received_at         REAL NOT NULL,
    last_received_at          REAL NOT NULL,
    attempts                  INTEGER NOT NULL DEFAULT 0,
    lease_owner               TEXT,
    lease_expires_at          REAL,
    result_dir                TEXT,
    updated_at                REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
CREATE TABLE IF NOT EXISTS deliveries (
    id                 INTEGER PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    destination        TEXT NOT NULL,
    kind               TEXT NOT NULL,
    files              TEXT NOT NULL,
    state              TEXT NOT NULL,
    tries              INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    REAL NOT NULL,
    lease_expires_at   REAL,
    last_error         TEXT,
    created_at         REAL NOT NULL,
    delivered_at       REAL,
    UNIQUE (study_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS events (
    id                 INTEGER PRIMARY KEY,
    at                 REAL NOT NULL,
    study_instance_uid TEXT NOT NULL,
    state              TEXT NOT NULL,
    detail             TEXT
);
CREATE INDEX IF NOT EXISTS events_study ON events(study_instance_uid, id);
CREATE INDEX IF NOT EXISTS events_at ON events(at);
CREATE TABLE IF NOT EXISTS chat_turns (
    id                 INTEGER PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    role               TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text               TEXT NOT NULL,
    boxes              TEXT NOT NULL DEFAULT '[]',
    created_at         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_turns_study ON chat_turns(study_instance_uid, id);
CREATE TABLE IF NOT EXISTS conflicts (
    id                 INTEGER PRIMARY KEY,
    at                 REAL NOT NULL,
    sop_instance_uid   TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    kind               TEXT NOT NULL,
    detail             TEXT NOT NULL,
    path               TEXT,
    sha256             TEXT,
    calling_ae         TEXT
);
CREATE INDEX IF NOT EXISTS conflicts_study ON conflicts(study_instance_uid);
CREATE TABLE IF NOT EXISTS delivery_attempts (
    id                 INTEGER PRIMARY KEY,
    delivery_id        INTEGER NOT NULL,
    study_instance_uid TEXT NOT NULL,
    destination        TEXT NOT NULL,
    try                INTEGER NOT NULL,
    started_at         REAL NOT NULL,
    ended_at           REAL,
    outcome            TEXT NOT NULL,
    error              TEXT
);
CREATE INDEX IF NOT EXISTS delivery_attempts_delivery ON delivery_attempts(delivery_id, id);
CREATE INDEX IF NOT EXISTS delivery_attempts_ended ON delivery_attempts(ended_at);
"""
# columns added after the first release: (table, column, declaration)
MIGRATIONS = (
    ("studies", "interrupted", "INTEGER NOT NULL DEFAULT 0"),
    ("studies", "not_before", "REAL"),
    ("studies", "flags", "TEXT"),
    ("studies", "routing", "TEXT"),  # JSON: the routing rule that decided the study (dicom_node.rules)
)


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    transfer_syntax_uid: str | None
    path: str
    sha256: str
    size: int
    calling_ae: str | None
    patient_hash: str | None


@dataclass(frozen=True)
class InstanceDecision:
    sop_instance_uid: str
    decision: str
    reason: str


@dataclass(frozen=True)
class Job:
    study_instance_uid: str
    sop_instance_uid: str
    path: Path
    attempts: int  # this run's number: processing errors + interrupted runs + 1
    owner: str
    errors: int = 0  # processing errors before this run (bounded by node.max_inference_attempts)
    routing: str | None = None  # JSON of the study's routing rule match (tasks, destinations), None: defaults


@dataclass(frozen=True)
class Delivery:
    id: int
    study_instance_uid: str
    destination: str
    kind: str
    files: tuple[str, ...]
    state: str
    tries: int
    next_attempt_at: float
    last_error: str | None
    delivered_at: float | None


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(row["id"], row["study_instance_uid"], row["destination"], row["kind"],
                    tuple(json.loads(row["files"])), row["state"], row["tries"], row["next_attempt_at"],
                    row["last_error"], row["delivered_at"])


class JobStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(SCHEMA)
            for table, column, declaration in MIGRATIONS:
                present = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        self.inject: Callable[[str], None] | None = None
        """Test seam: called with the operation name before every write transaction; raising
        there (e.g. ``sqlite3.OperationalError("disk I/O error")``) simulates a failing job store."""

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        if self.inject is not None:
            self.inject(sys._getframe(2).f_code.co_name)
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @staticmethod
    def _event(cur: sqlite3.Cursor, study: str, state: str, detail: str | None = None, now: float | None = None) -> None:
        cur.execute("INSERT INTO events(at, study_instance_uid, state, detail) VALUES (?,?,?,?)",
                    (now or time.time(), study, state, detail))

    # ---- ingest -------------------------------------------------------------------------------
    def record_instance(self, rec: InstanceRecord, now: float | None = None,
                        notes: list[str] | None = None) -> str:
        """Record a spooled instance; returns 'new', 'duplicate', 'late' (study already past selection)
        or 'other-study' (the SOP Instance UID is known in another study: nothing recorded but the
        conflict, the caller refuses the instance). A second patient under one Study Instance UID is
        flagged on the study (``flags``, an event) and noted in ``notes``."""
        now = now or time.time()
        with self._tx() as cur:
            cur.execute(
                "INSERT OR IGNORE INTO instances(sop_instance_uid, sop_class_uid, study_instance_uid,"
                " series_instance_uid, modality, transfer_syntax_uid, path, sha256, size, calling_ae, received_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (rec.sop_instance_uid, rec.sop_class_uid, rec.study_instance_uid, rec.series_instance_uid,
                 rec.modality, rec.transfer_syntax_uid, rec.path, rec.sha256, rec.size, rec.calling_ae, now))
            if cur.rowcount == 0:
                first = cur.execute("SELECT study_instance_uid FROM instances WHERE sop_instance_uid=?",
                                    (rec.sop_instance_uid,)).fetchone()
                if first is not None and first[0] != rec.study_instance_uid:
                    detail = (f"SOP Instance UID {rec.sop_instance_uid} sent again as part of study "
                              f"{rec.study_instance_uid} (from {rec.calling_ae or 'unknown AE'}); refused")
                    self._conflict(cur, rec, first[0], "other-study", detail, now)
                    self._conflict(cur, rec, rec.study_instance_uid, "other-study",
                                   f"SOP Instance UID {rec.sop_instance_uid} already received in study {first[0]};"
                                   " refused", now)
                    return "other-study"
                return "duplicate"
            study = cur.execute("SELECT state, patient_hash FROM studies WHERE study_instance_uid=?",
                                (rec.study_instance_uid,)).fetchone()
            if study is not None and study["patient_hash"] != rec.patient_hash:
                flag = "second patient under this Study Instance UID"
                cur.execute("UPDATE studies SET flags=? WHERE study_instance_uid=?", (flag, rec.study_instance_uid))
                self._event(cur, rec.study_instance_uid, "flagged",
                            f"{flag}: instance {rec.sop_instance_uid} has another patient identity", now)
                if notes is not None:
                    notes.append(flag)
            if study is None:
                cur.execute(
                    "INSERT INTO studies(study_instance_uid, state, patient_hash, calling_ae, instances,"
                    " first_received_at, last_received_at, updated_at) VALUES (?,?,?,?,1,?,?,?)",
                    (rec.study_instance_uid, RECEIVED, rec.patient_hash, rec.calling_ae, now, now, now))
                self._event(cur, rec.study_instance_uid, RECEIVED, rec.sop_instance_uid, now)
                return "new"
            if study["state"] in (RECEIVED, SKIPPED):
                cur.execute(
                    "UPDATE studies SET state=?, reason=NULL, rule=NULL, instances=instances+1,"
                    " last_received_at=?, updated_at=? WHERE study_instance_uid=?",
                    (RECEIVED, now, now, rec.study_instance_uid))
                if study["state"] == SKIPPED:
                    self._event(cur, rec.study_instance_uid, RECEIVED, "reopened by a new instance", now)
                return "new"
            cur.execute("UPDATE instances SET decision='late', reason=? WHERE sop_instance_uid=?",
                        (f"arrived after the study was {study['state']}; not considered", rec.sop_instance_uid))
            cur.execute("UPDATE studies SET instances=instances+1, updated_at=? WHERE study_instance_uid=?",
                        (now, rec.study_instance_uid))
            return "late"

    def _conflict(self, cur: sqlite3.Cursor, rec: InstanceRecord, study: str, kind: str, detail: str,
                  now: float) -> None:
        cur.execute("INSERT INTO conflicts(at, sop_instance_uid, study_instance_uid, kind, detail, path, sha256,"
                    " calling_ae) VALUES (?,?,?,?,?,?,?,?)",
                    (now, rec.sop_instance_uid, study, kind, detail, rec.path, rec.sha256, rec.calling_ae))
        self._event(cur, study, "conflict", detail, now)

    def record_conflict(self, rec: InstanceRecord, kind: str, detail: str) -> None:
        """A different object with a known SOP Instance UID of the same study (kept under spool/conflicts/)."""
        with self._tx() as cur:
            self._conflict(cur, rec, rec.study_instance_uid, kind, detail, time.time())

    def conflicts(self, study_uid: str) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM conflicts WHERE study_instance_uid=? ORDER BY id", (study_uid,))

    def is_recorded(self, path: Path | str) -> bool:
        """Whether a spool file is the recorded copy of its instance (start-up orphan sweep)."""
        path = Path(path)
        rows = self._read("SELECT path FROM instances WHERE sop_instance_uid=?", (path.stem,))
        return bool(rows) and Path(rows[0]["path"]) == path

    # ---- selection ----------------------------------------------------------------------------
    def studies_ready(self, quiet_seconds: float, now: float | None = None) -> list[tuple[str, float]]:
        now = now or time.time()
        rows = self._read("SELECT study_instance_uid, last_received_at FROM studies WHERE state=?"
                          " AND last_received_at<=? ORDER BY last_received_at", (RECEIVED, now - quiet_seconds))
        return [(r["study_instance_uid"], r["last_received_at"]) for r in rows]

    def instances_of(self, study_uid: str) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM instances WHERE study_instance_uid=? AND (decision IS NULL OR"
                          " decision!='late') ORDER BY received_at", (study_uid,))

    def apply_selection(self, study_uid: str, seen_last_received_at: float, chosen: str | None, rule: str,
                        reason: str, decisions: Sequence[InstanceDecision], routing: str | None = None) -> bool:
        """Commit a selection unless an instance arrived meanwhile (then the study waits again).
        ``routing``: JSON of the routing rule that decided the study (``dicom_node.rules``)."""
        now = time.time()
        with self._tx() as cur:
            cur.execute("UPDATE studies SET state=?, selected_sop_instance_uid=?, rule=?, reason=?, routing=?,"
                        " updated_at=? WHERE study_instance_uid=? AND state=? AND last_received_at=?",
                        (SELECTED if chosen else SKIPPED, chosen, rule, reason, routing, now, study_uid, RECEIVED,
                         seen_last_received_at))
            if cur.rowcount == 0:
                return False
            for d in decisions:
                cur.execute("UPDATE instances SET decision=?, reason=? WHERE sop_instance_uid=?",
                            (d.decision, d.reason, d.sop_instance_uid))
            self._event(cur, study_uid, SELECTED if chosen else SKIPPED, f"{rule}: {reason}", now)
            return True

    def apply_forward(self, study_uid: str, seen_last_received_at: float, rule: str, reason: str,
                      decisions: Sequence[InstanceDecision], routing: str,
                      deliveries: Sequence[tuple[str, str, Sequence[str]]]) -> bool:
        """A routing rule forwards the study's source instances without inference: the study goes
        straight to 'written' with one delivery per (destination name, kind, source files); the
        outbox then makes it 'delivered' (or 'failed'). Not committed when an instance arrived meanwhile."""
        now = time.time()
        with self._tx() as cur:
            cur.execute("UPDATE studies SET state=?, selected_sop_instance_uid=NULL, rule=?, reason=?, routing=?,"
                        " updated_at=? WHERE study_instance_uid=? AND state=? AND last_received_at=?",
                        (WRITTEN, rule, reason, routing, now, study_uid, RECEIVED, seen_last_received_at))
            if cur.rowcount == 0:
                return False
            for d in decisions:
                cur.execute("UPDATE instances SET decision=?, reason=? WHERE sop_instance_uid=?",
                            (d.decision, d.reason, d.sop_instance_uid))
            self._event(cur, study_uid, WRITTEN, f"{rule}: {reason}", now)
            for name, kind, files in deliveries:
                cur.execute(
                    "INSERT INTO deliveries(study_instance_uid, destination, kind, files, state, tries,"
                    " next_attempt_at, created_at) VALUES (?,?,?,?,?,0,?,?)"
                    " ON CONFLICT(study_instance_uid, destination) DO UPDATE SET kind=excluded.kind,"
                    " files=excluded.files, state=excluded.state, tries=0, next_attempt_at=excluded.next_attempt_at,"
                    " last_error=NULL, lease_expires_at=NULL, delivered_at=NULL",
                    (study_uid, name, kind, json.dumps(list(files)), PENDING, now, now))
            return True

    def fail_study(self, study_uid: str, reason: str) -> bool:
        """A study that cannot be decided (selection raised): terminal, with its reason; the others go on."""
        now = time.time()
        with self._tx() as cur:
            cur.execute("UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_instance_uid=? AND state=?",
                        (FAILED, reason, now, study_uid, RECEIVED))
            if cur.rowcount:
                self._event(cur, study_uid, FAILED, reason, now)
            return cur.rowcount == 1

    def rerun_study(self, study_uid: str) -> str:
        """Queue a finished study (failed, skipped, written or delivered) for selection and inference
        again, with fresh attempt counters; late instances are considered too. Returns the state it
        was in. Raises KeyError (unknown study) or ValueError (still in progress)."""
        now = time.time()
        with self._tx() as cur:
            row = cur.execute("SELECT state FROM studies WHERE study_instance_uid=?", (study_uid,)).fetchone()
            if row is None:
                raise KeyError(study_uid)
            if row["state"] in (RECEIVED, SELECTED, INFERRING):
                raise ValueError(f"study {study_uid} is {row['state']}: already queued or in progress")
            cur.execute("UPDATE studies SET state=?, reason=NULL, rule=NULL, routing=NULL, selected_sop_instance_uid=NULL,"
                        " attempts=0, interrupted=0, not_before=NULL, lease_owner=NULL, lease_expires_at=NULL,"
                        " updated_at=? WHERE study_instance_uid=?", (RECEIVED, now, study_uid))
            cur.execute("UPDATE instances SET decision=NULL, reason=NULL WHERE study_instance_uid=?", (study_uid,))
            self._event(cur, study_uid, RECEIVED, f"re-run requested (was {row['state']})", now)
            return str(row["state"])

    # ---- inference jobs -----------------------------------------------------------------------
    def claim_job(self, owner: str, lease_seconds: float, max_attempts: int = 3,
                  max_interrupted: int = 5) -> Job | None:
        """Take the oldest selected study (or one whose lease expired). A claim counts as an
        interrupted run until the run ends (written, failed, retried, released or deferred): runs cut
        short by a node crash stay counted and end the study after ``max_interrupted``; processing
        errors are counted by :meth:`retry_job` and bounded by ``max_attempts``."""
        now = time.time()
        with self._tx() as cur:
            while True:
                row = cur.execute(
                    "SELECT s.study_instance_uid, s.selected_sop_instance_uid, s.attempts, s.interrupted, s.routing, i.path"
                    " FROM studies s JOIN instances i ON i.sop_instance_uid = s.selected_sop_instance_uid"
                    " WHERE (s.state=? AND (s.not_before IS NULL OR s.not_before<=?))"
                    " OR (s.state=? AND s.lease_expires_at<?)"
                    " ORDER BY s.last_received_at LIMIT 1", (SELECTED, now, INFERRING, now)).fetchone()
                if row is None:
                    return None
                study = row["study_instance_uid"]
                reason = None
                if row["interrupted"] >= max_interrupted:
                    reason = (f"inference did not complete after {row['interrupted']} attempts: each was interrupted"
                              " (the node stopped or crashed, or the lease expired, while this study was inferred)")
                elif row["attempts"] >= max_attempts:
                    reason = f"inference failed {row['attempts']} times (processing errors)"
                if reason is not None:
                    cur.execute("UPDATE studies SET state=?, reason=?, lease_owner=NULL, lease_expires_at=NULL,"
                                " updated_at=? WHERE study_instance_uid=?", (FAILED, reason, now, study))
                    self._event(cur, study, FAILED, reason, now)
                    continue
                run = row["attempts"] + row["interrupted"] + 1
                cur.execute("UPDATE studies SET state=?, lease_owner=?, lease_expires_at=?, interrupted=interrupted+1,"
                            " not_before=NULL, updated_at=? WHERE study_instance_uid=?",
                            (INFERRING, owner, now + lease_seconds, now, study))
                self._event(cur, study, INFERRING, f"attempt {run} by {owner}", now)
                return Job(study, row["selected_sop_instance_uid"], Path(row["path"]), run, owner, row["attempts"],
                           row["routing"])

    def renew_lease(self, job: Job, lease_seconds: float) -> bool:
        with self._tx() as cur:
            cur.execute("UPDATE studies SET lease_expires_at=? WHERE study_instance_uid=? AND lease_owner=?"
                        " AND state=?", (time.time() + lease_seconds, job.study_instance_uid, job.owner, INFERRING))
            return cur.rowcount == 1

    def _finish_job(self, cur: sqlite3.Cursor, job: Job, state: str, reason: str | None,
                    result_dir: str | None = None) -> bool:
        now = time.time()
        cur.execute("UPDATE studies SET state=?, reason=?, result_dir=COALESCE(?, result_dir), lease_owner=NULL,"
                    " lease_expires_at=NULL, interrupted=MAX(interrupted-1, 0), updated_at=?"
                    " WHERE study_instance_uid=? AND lease_owner=? AND state=?",
                    (state, reason, result_dir, now, job.study_instance_uid, job.owner, INFERRING))
        if cur.rowcount != 1:
            return False
        self._event(cur, job.study_instance_uid, state, reason, now)
        return True

    def mark_written(self, job: Job, result_dir: str,
                     deliveries: Sequence[tuple[str, str, Sequence[str]]]) -> bool:
        """Results are on disk: queue one delivery per (destination name, kind, files)."""
        now = time.time()
        with self._tx() as cur:
            if not self._finish_job(cur, job, WRITTEN, None, result_dir):
                return False
            for name, kind, files in deliveries:
                cur.execute(
                    "INSERT INTO deliveries(study_instance_uid, destination, kind, files, state, tries,"
                    " next_attempt_at, created_at) VALUES (?,?,?,?,?,0,?,?)"
                    " ON CONFLICT(study_instance_uid, destination) DO UPDATE SET kind=excluded.kind,"
                    " files=excluded.files, state=excluded.state, tries=0, next_attempt_at=excluded.next_attempt_at,"
                    " last_error=NULL, lease_expires_at=NULL, delivered_at=NULL",
                    (job.study_instance_uid, name, kind, json.dumps(list(files)), PENDING, now, now))
            return True

    def mark_failed(self, job: Job, reason: str) -> bool:
        with self._tx() as cur:
            return self._finish_job(cur, job, FAILED, reason)

    def retry_job(self, job: Job, reason: str) -> bool:
        """A processing error: back to 'selected' with the error counted (failed after max attempts)."""
        with self._tx() as cur:
            cur.execute("UPDATE studies SET state=?, reason=?, lease_owner=NULL, lease_expires_at=NULL,"
                        " attempts=attempts+1, interrupted=MAX(interrupted-1, 0), updated_at=?"
                        " WHERE study_instance_uid=? AND lease_owner=? AND state=?",
                        (SELECTED, reason, time.time(), job.study_instance_uid, job.owner, INFERRING))
            if cur.rowcount:
                self._event(cur, job.study_instance_uid, SELECTED, f"retry: {reason}")
            return cur.rowcount == 1

    def defer_job(self, job: Job, reason: str, seconds: float) -> bool:
        """Not the study's fault (disk full, I/O error): back to 'selected', taken again after
        ``seconds``, not counted as an attempt."""
        now = time.time()
        with self._tx() as cur:
            cur.execute("UPDATE studies SET state=?, reason=?, lease_owner=NULL, lease_expires_at=NULL,"
                        " interrupted=MAX(interrupted-1, 0), not_before=?, updated_at=?"
                        " WHERE study_instance_uid=? AND lease_owner=? AND state=?",
                        (SELECTED, reason, now + seconds, now, job.study_instance_uid, job.owner, INFERRING))
            if cur.rowcount:
                self._event(cur, job.study_instance_uid, SELECTED, f"deferred {seconds:.0f}s: {reason}", now)
            return cur.rowcount == 1

    def set_instance_decision(self, sop_instance_uid: str, decision: str, reason: str) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE instances SET decision=?, reason=? WHERE sop_instance_uid=?",
                        (decision, reason, sop_instance_uid))

    def release_job(self, job: Job, reason: str) -> bool:
        """Give a job back (shutdown): it is taken again without counting as an attempt."""
        with self._tx() as cur:
            cur.execute("UPDATE studies SET state=?, lease_owner=NULL, lease_expires_at=NULL,"
                        " interrupted=MAX(interrupted-1, 0),"
                        " updated_at=? WHERE study_instance_uid=? AND lease_owner=? AND state=?",
                        (SELECTED, time.time(), job.study_instance_uid, job.owner, INFERRING))
            if cur.rowcount:
                self._event(cur, job.study_instance_uid, SELECTED, f"lease released: {reason}")
            return cur.rowcount == 1

    def release_all_leases(self) -> tuple[int, int]:
        """At start-up (this process holds the data-dir lock): nobody else can be working."""
        now = time.time()
        with self._tx() as cur:
            stale = [r[0] for r in cur.execute("SELECT study_instance_uid FROM studies WHERE state=?", (INFERRING,))]
            cur.execute("UPDATE studies SET state=?, lease_owner=NULL, lease_expires_at=NULL, updated_at=?"
                        " WHERE state=?", (SELECTED, now, INFERRING))
            for study in stale:
                self._event(cur, study, SELECTED, "lease of a stopped node released at start-up", now)
            cur.execute("UPDATE deliveries SET state=?, lease_expires_at=NULL WHERE state=?", (PENDING, SENDING))
            return len(stale), cur.rowcount

    # ---- deliveries ---------------------------------------------------------------------------
    def claim_delivery(self, lease_seconds: float, now: float | None = None, *, destination: str | None = None,
                       exclude: Sequence[str] = ()) -> Delivery | None:
        """The next due delivery (to ``destination`` only, or to none of ``exclude``), leased."""
        now = now or time.time()
        where, args = "", []
        if destination is not None:
            where, args = " AND destination=?", [destination]
        elif exclude:
            where, args = f" AND destination NOT IN ({','.join('?' * len(exclude))})", list(exclude)
        with self._tx() as cur:
            row = cur.execute(
                "SELECT * FROM deliveries WHERE ((state=? AND next_attempt_at<=?) OR (state=? AND lease_expires_at<?))"
                + where + " ORDER BY next_attempt_at LIMIT 1", (PENDING, now, SENDING, now, *args)).fetchone()
            if row is None:
                return None
            cur.execute("UPDATE deliveries SET state=?, tries=tries+1, lease_expires_at=? WHERE id=?",
                        (SENDING, now + lease_seconds, row["id"]))
            claimed = _delivery(cur.execute("SELECT * FROM deliveries WHERE id=?", (row["id"],)).fetchone())
            if row["state"] == SENDING:  # the lease of an earlier try expired: that try ended unknown
                cur.execute("UPDATE delivery_attempts SET ended_at=?, outcome='retry', error=?"
                            " WHERE delivery_id=? AND outcome=?",
                            (now, "lease expired (the sender stopped or hung)", claimed.id, SENDING))
            cur.execute("INSERT INTO delivery_attempts(delivery_id, study_instance_uid, destination, try, started_at,"
                        " outcome) VALUES (?,?,?,?,?,?)",
                        (claimed.id, claimed.study_instance_uid, claimed.destination, claimed.tries, now, SENDING))
            return claimed

    @staticmethod
    def _end_attempt(cur: sqlite3.Cursor, delivery: Delivery, outcome: str, error: str | None, now: float) -> None:
        cur.execute("UPDATE delivery_attempts SET ended_at=?, outcome=?, error=? WHERE id=(SELECT MAX(id) FROM"
                    " delivery_attempts WHERE delivery_id=? AND outcome=?)",
                    (now, outcome, error, delivery.id, SENDING))
        if cur.rowcount == 0:  # claimed before attempts were recorded (older job store)
            cur.execute("INSERT INTO delivery_attempts(delivery_id, study_instance_uid, destination, try,"
                        " started_at, ended_at, outcome, error) VALUES (?,?,?,?,?,?,?,?)",
                        (delivery.id, delivery.study_instance_uid, delivery.destination, delivery.tries, now, now,
                         outcome, error))

    def _update_study_after_delivery(self, cur: sqlite3.Cursor, study: str) -> None:
        # a delivery once delivered (of the current results: a rerun clears delivered_at) counts as
        # delivered whatever a later re-send does: a re-send that fails (e.g. to a destination since
        # renamed) does not flip a delivered study to failed, it shows on the delivery instead
        states = [DELIVERED if r[1] is not None else r[0] for r in
                  cur.execute("SELECT state, delivered_at FROM deliveries WHERE study_instance_uid=?", (study,))]
        current = cur.execute("SELECT state FROM studies WHERE study_instance_uid=?", (study,)).fetchone()
        if current is None or current[0] not in (WRITTEN, DELIVERED, FAILED):
            return
        if states and all(s == DELIVERED for s in states):
            new, reason = DELIVERED, None
        elif DEAD in states:
            dead = [r[0] for r in cur.execute("SELECT destination FROM deliveries WHERE study_instance_uid=? AND"
                                              " state=? AND delivered_at IS NULL", (study, DEAD))]
            new, reason = FAILED, "delivery dead-lettered: " + ", ".join(dead)
        else:
            new, reason = WRITTEN, None
        if new != current[0]:
            cur.execute("UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_instance_uid=?",
                        (new, reason, time.time(), study))
            self._event(cur, study, new, reason)

    def delivery_succeeded(self, delivery: Delivery) -> None:
        now = time.time()
        with self._tx() as cur:
            cur.execute("UPDATE deliveries SET state=?, delivered_at=?, last_error=NULL, lease_expires_at=NULL"
                        " WHERE id=?", (DELIVERED, now, delivery.id))
            self._end_attempt(cur, delivery, DELIVERED, None, now)
            self._update_study_after_delivery(cur, delivery.study_instance_uid)

    def delivery_failed(self, delivery: Delivery, error: str, retry_at: float | None) -> None:
        """``retry_at`` None = dead-letter (tries exhausted or a permanent refusal)."""
        with self._tx() as cur:
            cur.execute("UPDATE deliveries SET state=?, last_error=?, next_attempt_at=COALESCE(?, next_attempt_at),"
                        " lease_expires_at=NULL WHERE id=?",
                        (DEAD if retry_at is None else PENDING, error[:2000], retry_at, delivery.id))
            self._end_attempt(cur, delivery, DEAD if retry_at is None else "retry", error[:2000], time.time())
            self._update_study_after_delivery(cur, delivery.study_instance_uid)

    def retry_deliveries(self, ids: Sequence[int] = (), study_uid: str | None = None,
                         include_delivered: bool = False) -> int:
        """Put dead (or, on request, delivered) deliveries back to pending with a fresh round of tries
        (``tries`` restarts; every earlier try stays in ``delivery_attempts``, a ``requeued`` row marks
        the retry). Without ids or a study, every dead delivery is re-queued."""
        states = [DEAD, PENDING] + ([DELIVERED] if include_delivered else [])
        sql = f"SELECT id, study_instance_uid FROM deliveries WHERE state IN ({','.join('?' * len(states))})"
        params: list[Any] = list(states)
        if ids:
            sql += f" AND id IN ({','.join('?' * len(ids))})"
            params += list(ids)
        if study_uid:
            sql += " AND study_instance_uid=?"
            params.append(study_uid)
        now = time.time()
        with self._tx() as cur:
            rows = cur.execute(sql, params).fetchall()
            for row in rows:
                previous = cur.execute("SELECT * FROM deliveries WHERE id=?", (row["id"],)).fetchone()
                cur.execute("UPDATE deliveries SET state=?, tries=0, next_attempt_at=? WHERE id=?",
                            (PENDING, now, row["id"]))
                cur.execute("INSERT INTO delivery_attempts(delivery_id, study_instance_uid, destination, try,"
                            " started_at, ended_at, outcome, error) VALUES (?,?,?,?,?,?,?,?)",
                            (row["id"], row["study_instance_uid"], previous["destination"], previous["tries"], now,
                             now, "requeued", f"was {previous['state']} after {previous['tries']} tries"))
            for study in {r["study_instance_uid"] for r in rows}:
                self._update_study_after_delivery(cur, study)
            return len(rows)

    def delivery_attempts(self, delivery_id: int | None = None, study_uid: str | None = None) -> list[sqlite3.Row]:
        """Every recorded try (and re-queue) of one delivery or of a study's deliveries, oldest first."""
        if delivery_id is not None:
            return self._read("SELECT * FROM delivery_attempts WHERE delivery_id=? ORDER BY id", (delivery_id,))
        return self._read("SELECT * FROM delivery_attempts WHERE study_instance_uid=? ORDER BY id", (study_uid,))

    def delivery(self, delivery_id: int) -> Delivery | None:
        rows = self._read("SELECT * FROM deliveries WHERE id=?", (delivery_id,))
        return _delivery(rows[0]) if rows else None

    def throughput(self, since: float) -> dict[str, int]:
        """Studies that reached written / delivered / skipped / failed, and delivery tries ended, since ``since``."""
        studies = {r[0]: r[1] for r in self._read(
            "SELECT state, COUNT(DISTINCT study_instance_uid) FROM events WHERE at>=? AND state IN (?,?,?,?)"
            " GROUP BY state", (since, WRITTEN, DELIVERED, SKIPPED, FAILED))}
        tries = {r[0]: r[1] for r in self._read(
            "SELECT outcome, COUNT(*) FROM delivery_attempts WHERE ended_at>=? AND outcome!='requeued'"
            " GROUP BY outcome", (since,))}
        return {**{f"studies_{s}": studies.get(s, 0) for s in (WRITTEN, DELIVERED, SKIPPED, FAILED)},
                **{f"delivery_tries_{o}": tries.get(o, 0) for o in (DELIVERED, "retry", DEAD)}}

    def deliveries(self, state: str | None = None, study_uid: str | None = None) -> list[Delivery]:
        sql, params = "SELECT * FROM deliveries WHERE 1=1", []
        if state:
            sql += " AND state=?"
            params.append(state)
        if study_uid:
            sql += " AND study_instance_uid=?"
            params.append(study_uid)
        return [_delivery(r) for r in self._read(sql + " ORDER BY id", params)]

    # ---- reporting ----------------------------------------------------------------------------
    def study(self, study_uid: str) -> sqlite3.Row | None:
        rows = self._read("SELECT * FROM studies WHERE study_instance_uid=?", (study_uid,))
        return rows[0] if rows else None

    def studies(self, state: str | None = None, limit: int = 100) -> list[sqlite3.Row]:
        if state:
            return self._read("SELECT * FROM studies WHERE state=? ORDER BY updated_at DESC LIMIT ?", (state, limit))
        return self._read("SELECT * FROM studies ORDER BY updated_at DESC LIMIT ?", (limit,))

    def instance(self, sop_instance_uid: str) -> sqlite3.Row | None:
        rows = self._read("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
        return rows[0] if rows else None

    # ---- conversations (web viewer) -----------------------------------------------------------
    def chat_turns(self, study_uid: str) -> list[dict[str, Any]]:
        """The saved conversation about a study, oldest first: role, text, boxes, created_at."""
        rows = self._read("SELECT role, text, boxes, created_at FROM chat_turns WHERE study_instance_uid=?"
                          " ORDER BY id", (study_uid,))
        return [{"role": r["role"], "text": r["text"], "boxes": json.loads(r["boxes"]),
                 "created_at": r["created_at"]} for r in rows]

    def add_chat_exchange(self, study_uid: str, question: str, answer: str,
                          boxes: Sequence[Sequence[float]]) -> None:
        """Append one question and its answer (one transaction: a conversation never ends on a user turn)."""
        now = time.time()
        with self._tx() as cur:
            cur.execute("INSERT INTO chat_turns(study_instance_uid, role, text, created_at) VALUES (?,?,?,?)",
                        (study_uid, "user", question, now))
            cur.execute("INSERT INTO chat_turns(study_instance_uid, role, text, boxes, created_at)"
                        " VALUES (?,?,?,?,?)", (study_uid, "assistant", answer, json.dumps([list(b) for b in boxes]),
                                                now))

    def clear_chat(self, study_uid: str) -> int:
        with self._tx() as cur:
            cur.execute("DELETE FROM chat_turns WHERE study_instance_uid=?", (study_uid,))
            return cur.rowcount

    def events(self, study_uid: str) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM events WHERE study_instance_uid=? ORDER BY id", (study_uid,))

    def counts(self) -> dict[str, dict[str, int]]:
        studies = {s: 0 for s in STUDY_STATES}
        studies.update({r[0]: r[1] for r in self._read("SELECT state, COUNT(*) FROM studies GROUP BY state")})
        deliveries = {s: 0 for s in DELIVERY_STATES}
        deliveries.update({r[0]: r[1] for r in self._read("SELECT state, COUNT(*) FROM deliveries GROUP BY state")})
        instances = {r[0] or "pending": r[1] for r in
                     self._read("SELECT decision, COUNT(*) FROM instances GROUP BY decision")}
        return {"studies": studies, "deliveries": deliveries, "instances": instances}
