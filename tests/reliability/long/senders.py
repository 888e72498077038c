"""K concurrent senders × N instances each to a running `radvlm serve` (tiny model, loopback,
folder destination with SR + FHIR bundle), issue 12's "4 senders × 250" figure.

Each sender has its own calling AE title and association and sends its own studies (2 instances
each: PA + lateral). Figures: acknowledged, recorded in the job store, lost (acknowledged but not
recorded: must be 0), studies delivered, duplicates (a study with other than exactly one SR in the
destination: must be 0), ingest rate in instances per second, time until every study is terminal,
peak RSS of the node process (VmHWM).

Run: .venv/bin/python -m tests.reliability.long.senders [SENDERS=4] [PER_SENDER=250]
"""

from __future__ import annotations

import collections
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from inference.tiny import build_tiny_model
from tests.dicom_samples import chest_phantom, make_cr_dataset
from tests.reliability.long.node_proc import TERMINAL, Serve, db, stream, write_config


def main(senders: int = 4, per_sender: int = 250) -> int:
    work = Path(tempfile.mkdtemp(prefix="long-senders-"))
    config = write_config(work, build_tiny_model(work / "model", seed=0))
    batches = []
    for _ in range(senders):
        batch = []
        for _ in range(per_sender // 2):
            study = make_cr_dataset().StudyInstanceUID
            batch += [make_cr_dataset(rows=64, columns=64, pixel_array=chest_phantom(64, 64), view_position=v,
                                      study_instance_uid=study) for v in ("PA", "LL")]
        batches.append(batch)
    studies = {str(ds.StudyInstanceUID) for batch in batches for ds in batch}
    sent = sum(len(b) for b in batches)
    node = Serve(config)
    peak_sampled = 0
    try:
        acked: list[list[str]] = [[] for _ in batches]
        answers: list[dict[str, int]] = [{} for _ in batches]
        threads = [threading.Thread(target=stream, args=(node.port, b, acked[i], answers[i], f"SENDER{i + 1}"),
                                    daemon=True) for i, b in enumerate(batches)]
        started = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and time.monotonic() - started < 1800:
            peak_sampled = max(peak_sampled, node.memory()["VmRSS"])
            time.sleep(0.2)
        ingest = time.monotonic() - started
        deadline = time.monotonic() + 1800
        data = work / "data"
        while time.monotonic() < deadline:
            peak_sampled = max(peak_sampled, node.memory()["VmRSS"])
            done = {s for s, state in db(data, "SELECT study_instance_uid, state FROM studies") if state in TERMINAL}
            if done >= studies:
                break
            time.sleep(0.5)
        total = time.monotonic() - started
        memory = node.memory()
        all_acked = [uid for a in acked for uid in a]
        recorded = {uid for (uid,) in db(data, "SELECT sop_instance_uid FROM instances")}
        states = collections.Counter(state for _, state in db(data, "SELECT study_instance_uid, state FROM studies"))
    finally:
        code = node.term()
    sr_counts = {s: len(list((work / "out" / s).glob("*.dcm"))) if (work / "out" / s).is_dir() else 0
                 for s in studies}
    bundles = sum(1 for s in studies if (work / "out" / s / "bundle.json").is_file())
    duplicates = sum(1 for n in sr_counts.values() if n > 1)
    missing_sr = sum(1 for n in sr_counts.values() if n == 0)
    status_total: collections.Counter[str] = collections.Counter()
    for a in answers:
        status_total.update(a)
    lost = len([uid for uid in all_acked if uid not in recorded])
    print(f"senders {senders} × {per_sender} instances = {sent} sent ({len(studies)} studies of 2); "
          f"answers {dict(status_total)}")
    print(f"acknowledged {len(all_acked)}, recorded {len(recorded)}, lost {lost}; studies {dict(states)}; "
          f"SR files {sum(sr_counts.values())} (studies with >1 SR: {duplicates}, with none: {missing_sr}); "
          f"FHIR bundles {bundles}")
    print(f"ingest {ingest:.1f}s = {len(all_acked) / ingest:.1f} instances/s; all studies terminal after "
          f"{total:.1f}s; node peak RSS {memory['VmHWM'] / 2**20:.0f} MiB (sampled max {peak_sampled / 2**20:.0f}"
          f" MiB); node exit {code}")
    ok = (lost == 0 and len(all_acked) == sent and duplicates == 0 and missing_sr == 0
          and states.get("delivered", 0) == len(studies) and code == 0)
    print("OK" if ok else "FAILED")
    shutil.rmtree(work, ignore_errors=True) if ok else print(f"kept {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:])))
