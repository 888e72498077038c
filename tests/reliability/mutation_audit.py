"""Mutation audit of the node failure paths (issue 12): apply each mutation, run the test that must kill it,
restore the line exactly. Run: .venv/bin/python tests/reliability/mutation_audit.py [INDEX ...]
(about 3 minutes on 2 cores). Every row must say KILLED and restored=True."""
import subprocess, sys, os, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
R = "tests/reliability/"
M = [
 ("fsync of the spool file removed", "inference/durable.py",
  '        checkpoint("fsync", tmp)\n        os.fsync(fd)\n', '        checkpoint("fsync", tmp)\n        pass\n',
  [R + "test_durable_writes.py::test_fsync_really_runs"]),
 ("fsync of the directory removed (fsync_dir body)", "inference/durable.py",
  '    try:\n        os.fsync(fd)\n    finally:\n        os.close(fd)\n', '    try:\n        pass\n    finally:\n        os.close(fd)\n',
  [R + "test_durable_writes.py::test_fsync_really_runs"]),
 ("fsync of the directory after the rename removed (place)", "inference/durable.py",
  '    fsync_dir(final.parent)\n    if sync_parent_of_folder:', '    pass\n    if sync_parent_of_folder:',
  [R + "test_durable_writes.py::test_spool_fsyncs_the_file_before_the_rename_and_the_folder_after"]),
 ("SQLite synchronous=OFF", "dicom_node/jobstore.py",
  'PRAGMA synchronous=FULL', 'PRAGMA synchronous=OFF',
  [R + "test_store_statuses.py::test_job_store_runs_with_synchronous_full"]),
 ("Success answered on a spool/job-store error (0x0110 path)", "dicom_node/scp.py",
  '                PROCESSING_FAILURE, "spool error" if spooled is None', '                SUCCESS, "spool error" if spooled is None',
  [R + "test_durable_writes.py::test_spool_error_is_never_answered_success", R + "test_store_statuses.py::test_job_store_error_is_never_answered_success_and_leaves_no_orphan"]),
 ("Success answered when the spool runs out of space while writing", "dicom_node/scp.py",
  '                OUT_OF_RESOURCES, "out of space", comment="out of disk space"), "out of space while writing")',
  '                SUCCESS, "out of space", comment="out of disk space"), "out of space while writing")',
  [R + "test_durable_writes.py::test_spool_error_is_never_answered_success"]),
 ("A900 UID-mismatch check off", "dicom_node/scp.py",
  '        if sop_class != request_sop_class or sop_instance != request_sop_instance:', '        if False:',
  [R + "test_store_statuses.py::test_dataset_uid_differing_from_the_request_is_refused_a900"]),
 ("A700 during shutdown off", "dicom_node/scp.py",
  '        if not self._accepting.is_set():\n            log.warning("refused an instance from %s: the node is shutting down"',
  '        if False:\n            log.warning("refused an instance from %s: the node is shutting down"',
  [R + "test_store_statuses.py::test_shutdown_refuses_with_a700_and_audits", R + "test_store_statuses.py::test_instances_arriving_during_node_stop_are_refused_not_lost"]),
 ("permanent errors retried instead of dead-lettered", "dicom_node/outbox.py",
  '            permanent = isinstance(exc, (PermanentDeliveryError, DestinationNotConfiguredError))', '            permanent = False',
  [R + "test_delivery_policy.py::test_permanent_refusal_is_dead_lettered_at_the_first_try"]),
 ("non-exponential (linear) backoff", "dicom_node/outbox.py",
  '    delay = min(cap, base * (2 ** max(tries - 1, 0)))', '    delay = min(cap, base * max(tries, 1))',
  [R + "test_delivery_policy.py::test_backoff_doubles_per_try_up_to_the_cap", R + "test_delivery_policy.py::test_outbox_schedules_retries_exponentially"]),
 ("lease renewal disabled", "dicom_node/worker.py",
  '                renewed = self.jobs.renew_lease(job, self.settings.node.lease_seconds)', '                renewed = True',
  [R + "test_node_recovery.py::test_lease_is_renewed_while_a_slow_model_runs"]),
 ("peer C-STORE failure status accepted as stored", "dicom_node/destinations.py",
  '            if code not in STORE_OK:', '            if False:',
  [R + "test_delivery_policy.py::test_peer_failure_status_is_not_taken_as_stored"]),
 ("selector FOR PROCESSING / DERIVED ranking ignored", "dicom_node/selector.py",
  'else 2, int(processing),\n            int(derived), -pixels', 'else 2, 0,\n            0, -pixels',
  [R + "test_selection_policy.py::test_for_presentation_is_chosen_over_a_larger_earlier_for_processing_image", R + "test_selection_policy.py::test_original_is_chosen_over_a_larger_earlier_derived_image"]),
 ("IoU threshold 0.3 instead of 0.5 (evaluation)", "training/evaluation/grounding.py",
  'iou_threshold: float = 0.5) -> float:', 'iou_threshold: float = 0.3) -> float:',
  [R + "test_selection_policy.py::test_iou_threshold_is_one_half"]),
]
only = sys.argv[1:]
env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
for i, (name, rel, old, new, tests) in enumerate(M):
    if only and str(i) not in only:
        continue
    path = ROOT / rel
    original = path.read_text()
    assert original.count(old) == 1, (name, original.count(old))
    path.write_text(original.replace(old, new))
    try:
        t0 = time.time()
        r = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        outcome = r.stdout.strip().splitlines()[-1]
    finally:
        now = path.read_text()
        assert now.count(new) == 1
        path.write_text(now.replace(new, old))
    restored = path.read_text().count(new) == 0 and path.read_text().count(old) == 1
    print(f"{i}|{name}|{rel}|{' + '.join(t.split('::')[1] for t in tests)}|{'KILLED' if r.returncode else 'SURVIVED'}|{outcome}|restored={restored}|{time.time()-t0:.0f}s", flush=True)
