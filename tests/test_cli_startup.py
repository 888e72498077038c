"""The `radvlm` command as a terminal user meets it (issue 14 item 5): `--help` and configuration
errors at once (no heavy imports at start-up; benchmarks/bench_cli_startup.py has the figures),
quiet when the reader of stdout goes away (`radvlm jobs | head`), and `radvlm chat` with /help
answered locally and a clean Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dicom_node.jobstore import JobStore
from inference.api_client import CHAT_HELP, chat_loop

ROOT = Path(__file__).resolve().parents[1]
RADVLM = [sys.executable, "-m", "dicom_node.cli"]
HEAVY = ("torch", "transformers", "highdicom", "fastapi", "uvicorn", "matplotlib")


def _timed(args: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    completed = subprocess.run([*RADVLM, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, **kwargs)
    return time.perf_counter() - started, completed


def test_help_and_config_errors_print_at_once(tmp_path, record_property):
    seconds, completed = _timed(["--help"])
    assert completed.returncode == 0 and "usage: radvlm" in completed.stdout
    record_property("radvlm_help_seconds", round(seconds, 3))
    print(f"radvlm --help: {seconds:.3f} s wall")
    assert seconds < 3.0  # generous on a shared CI machine: ~0.4 s CPU, was 6-14 s (benchmarks/bench_cli_startup.py)
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nno_such_key = 1\n")
    seconds, completed = _timed(["jobs", "--config", str(bad)])
    assert completed.returncode == 2 and "node.no_such_key: unknown key" in completed.stderr
    record_property("radvlm_config_error_seconds", round(seconds, 3))
    assert seconds < 3.0


def test_help_imports_no_heavy_library():
    probe = ("import sys\nfrom dicom_node.cli import build_parser\nbuild_parser().format_help()\n"
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def _with_closed_stdout(args: list[str]) -> subprocess.CompletedProcess:
    """Run radvlm with stdout a pipe whose reader has already gone (what `| head` leaves behind)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*RADVLM, *args], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=60)
    finally:
        os.close(write_end)


def test_broken_pipe_is_quiet(tmp_path):
    (tmp_path / "data").mkdir()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    JobStore(tmp_path / "data" / "jobs.sqlite3").close()
    for args in (["jobs", "--config", str(config)], ["outbox", "list", "--config", str(config)], ["--help"]):
        completed = _with_closed_stdout(args)
        assert completed.returncode in (0, 141), (args, completed.returncode)
        assert completed.stderr == "", (args, completed.stderr)


def test_chat_help_and_unknown_commands_stay_local():
    asked: list[str] = []

    def ask(question: str):
        asked.append(question)
        return f"answer to {question}", []

    out = io.StringIO()
    count = chat_loop(ask, "Chatting.", input_stream=io.StringIO("/help\n/frobnicate now\nIs the heart enlarged?\n"
                                                                 "/quit\n"), output_stream=out)
    assert asked == ["Is the heart enlarged?"] and count == 1
    text = out.getvalue()
    assert CHAT_HELP in text and "unknown command '/frobnicate'" in text
    assert "Type /help for help" in text


def test_chat_ctrl_c_while_answering_ends_cleanly():
    def ask(question: str):
        raise KeyboardInterrupt

    out = io.StringIO()
    assert chat_loop(ask, "Chatting.", input_stream=io.StringIO("Is the heart enlarged?\n"), output_stream=out) == 0
    assert out.getvalue().endswith("(interrupted)\n")


def test_ctrl_c_in_radvlm_chat_process(tiny_model_dir: Path, rg1_j2kr: Path):
    """A real SIGINT to `radvlm chat` waiting at its prompt: exit 0, no traceback."""
    process = subprocess.Popen([*RADVLM, "chat", str(rg1_j2kr), "--model", str(tiny_model_dir)], cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                               # a suite started in the background (`cmd &`) inherits SIGINT ignored, and
                               # Python then installs no KeyboardInterrupt handler: give the chat a terminal's default
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    deadline = time.monotonic() + 120
    while b"you> " not in seen and time.monotonic() < deadline:
        chunk = os.read(process.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert b"you> " in seen, seen
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, (process.returncode, err[-2000:])
    assert b"Traceback" not in err and b"(interrupted)" in seen + out


def test_demo_honours_configured_ports(tmp_path, capsys):
    from config.settings import Settings
    from dicom_node.cli import EXIT_OK, main
    from dicom_node.demo import demo_settings
    from tests.conftest_node import free_port

    defaults = demo_settings(Settings(), tmp_path / "a", tmp_path / "b")
    assert defaults.node.port == 0 and defaults.node.http_enabled is False  # default ports: free ones
    scp, web = free_port(), free_port()
    config = tmp_path / "demo.toml"
    config.write_text(f"[node]\nport = {scp}\nhttp_port = {web}\n")
    assert main(["demo", "--count", "1", "--timeout", "180", "--config", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"by C-STORE to port {scp}; viewer and API on http://127.0.0.1:{web}/" in out
