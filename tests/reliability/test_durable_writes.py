"""The one durable-write helper (inference.durable) and the spool built on it: the write protocol
is observed step by step (fsync of the file before the rename, fsync of the folder after it),
crash points leave no partial final file, and injected disk errors reach the sender as failure
statuses — never Success."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from dicom_node.errors import OutOfSpaceError, SpoolError
from dicom_node.spool import Spool
from inference import durable
from sr_writer import atomic_write
from tests.dicom_samples import make_cr_dataset
from tests.reliability.harness import ScpHarness, send


def _steps(seen: list[tuple[str, str]], final: Path) -> list[str]:
    """The steps in order, the temp file's as 'file', the final name's folder as 'dir'."""
    out = []
    for step, path in seen:
        if step == "fsync-dir":
            out.append(f"fsync-dir:{'parent' if Path(path) == final.parent else Path(path).name}")
        else:
            out.append(step)
    return out


def test_spool_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path):
    spool = Spool(tmp_path / "spool")
    study, sop = "1.2.3", "1.2.3.4"
    with durable.observe() as seen:
        spooled = spool.store(study, sop, b"DICM" * 100)
    assert spooled.outcome == "new" and spooled.path.read_bytes() == b"DICM" * 100
    steps = _steps(seen, spooled.path)
    # new study folder: the spool root is synced too, so the folder entry itself survives
    assert steps == ["write", "fsync", "rename", "fsync-dir:parent", "fsync-dir:spool"], steps
    with durable.observe() as seen:
        spool.store(study, "1.2.3.5", b"x" * 10)
    assert _steps(seen, spool.path_for(study, "1.2.3.5")) == ["write", "fsync", "rename", "fsync-dir:parent"]


def test_fsync_really_runs(tmp_path, monkeypatch):
    """The checkpoints above are only names: count the real os.fsync calls of one spool write."""
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    Spool(tmp_path / "spool").store("1.2.3", "1.2.3.4", b"abc")
    assert len(calls) == 3  # the file, its new folder, the spool root


@pytest.mark.parametrize("step", ["write", "fsync", "rename"])
def test_crash_points_leave_no_partial_final_file(tmp_path, step):
    spool = Spool(tmp_path / "spool")
    final = spool.path_for("1.2.3", "1.2.3.4")
    with durable.inject(step, crash=True), pytest.raises(durable.SimulatedCrash):
        spool.store("1.2.3", "1.2.3.4", b"payload")
    assert not final.exists()
    assert spool.clean_incomplete() <= 1  # the temp file a crash leaves is swept at start-up
    assert list((tmp_path / "spool" / ".incoming").iterdir()) == []


@pytest.mark.parametrize("code, error", [(errno.ENOSPC, OutOfSpaceError), (errno.EIO, SpoolError)])
def test_spool_disk_errors_are_specific_and_leave_nothing(tmp_path, code, error):
    spool = Spool(tmp_path / "spool")
    with durable.inject("fsync", code, match=".incoming"), pytest.raises(error):
        spool.store("1.2.3", "1.2.3.4", b"payload")
    assert not spool.path_for("1.2.3", "1.2.3.4").exists()
    assert list((tmp_path / "spool" / ".incoming").iterdir()) == []


def test_atomic_write_keeps_the_old_file_on_error_and_is_owner_only(tmp_path):
    target = tmp_path / "results" / "sr.dcm"
    atomic_write(target, lambda p: p.write_bytes(b"old"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with durable.inject("rename", errno.EIO), pytest.raises(OSError):
        atomic_write(target, lambda p: p.write_bytes(b"new"))
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["sr.dcm"]


@pytest.mark.parametrize("code, status", [(errno.ENOSPC, 0xA700), (errno.EIO, 0x0110)])
def test_spool_error_is_never_answered_success(tmp_path, code, status):
    node = ScpHarness(tmp_path / "data")
    try:
        ds = make_cr_dataset()
        with durable.inject("write", code, match=".incoming"):
            [answer] = send(node.port, [ds])
        assert answer.status == status
        assert node.jobs.instance(ds.SOPInstanceUID) is None and node.spool_files() == []
        [refused] = node.audit_events("store_refused")
        assert refused["status"] == f"0x{status:04X}" and refused["sop_instance_uid"] == ds.SOPInstanceUID
        # the fault is gone: the same instance is stored and acknowledged
        [answer] = send(node.port, [ds])
        assert answer.status == 0x0000 and node.jobs.instance(ds.SOPInstanceUID) is not None
    finally:
        node.close()


def test_folder_destination_copies_are_owner_only_like_results(tmp_path):
    from config.settings import FolderDestination
    from dicom_node.destinations import send_folder

    source = tmp_path / "results" / "sr.dcm"
    atomic_write(source, lambda p: p.write_bytes(b"SR"))
    with durable.observe() as seen:
        send_folder(FolderDestination(kind="folder", path=tmp_path / "archive"), "1.2.3", [source])
    copy = tmp_path / "archive" / "1.2.3" / "sr.dcm"
    assert copy.read_bytes() == b"SR" and stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert [step for step, _ in seen][:3] == ["write", "fsync", "rename"]
