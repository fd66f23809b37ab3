"""``make run``'s demo (examples/run_demo.py) and ``mail2alert capture``, as a newcomer
meets them."""

from __future__ import annotations

import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from pathlib import Path

from mail2alert.testing import free_port
from tests.helpers import listening, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "run_demo.py"


def _occupied() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, int(holder.getsockname()[1])


def test_a_busy_port_is_named_in_one_line_with_the_make_variable_and_nothing_starts(
    tmp_path: Path,
) -> None:
    holder, port = _occupied()
    smtp = free_port()
    # Every other port is chosen free too: the defaults (8025, 9025) may be taken here.
    others = [f"--{name}-port={free_port()}" for name in ("sink", "http")]
    with holder:
        done = subprocess.run(
            [
                sys.executable,
                str(DEMO),
                "--smtp-port",
                str(smtp),
                "--gocd-port",
                str(port),
                *others,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"make run: port {port} for the stand-in GoCD (url) is in use; stop what uses it, "
        "or choose another port: make run GOCD_PORT=<port>"
    ]
    assert "Traceback" not in done.stdout
    assert "stand-in GoCD on" not in done.stdout
    assert not listening(smtp)


def test_capture_on_a_busy_port_says_so_in_one_line_without_a_traceback() -> None:
    holder, port = _occupied()
    with holder:
        done = subprocess.run(
            [sys.executable, "-m", "mail2alert", "capture", "--listen", f"localhost:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr == (
        f"mail2alert: capture: cannot listen on localhost:{port}: in use; "
        "choose another with --listen HOST:PORT\n"
    )


def _send(port: int, sample: str, to: str) -> None:
    """What the README's one-liner does: a sample of examples/mail from GoCD's sender."""
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("go@example.com", [to], (ROOT / "examples" / "mail" / sample).read_bytes())


def test_the_demo_on_chosen_ports_routes_the_readmes_broken_stage_to_cat(tmp_path: Path) -> None:
    # A copy of examples/, so that the demo's outbox (beside its configuration) is made here.
    examples = shutil.copytree(ROOT / "examples", tmp_path / "examples")
    ports = {name: free_port() for name in ("smtp", "sink", "gocd", "http")}
    demo = subprocess.Popen(
        [sys.executable, str(examples / "run_demo.py")]
        + [f"--{n}-port={p}" for n, p in ports.items()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    lines: list[str] = []
    assert demo.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: listening(ports["smtp"]) and listening(ports["sink"]), what="demo")
        _send(ports["smtp"], "stage-broken.eml", "mail2alert@example.com")
        wait_until(lambda: any("RCPT TO: <cat@example.com>" in x for x in lines), what="sink")
        # The README: the same mail again within duplicate-window is not delivered twice.
        _send(ports["smtp"], "stage-broken.eml", "mail2alert@example.com")
        wait_until(lambda: any(": duplicate of " in x for x in lines), what="a duplicate")
        # ...and the backup sample, from GoCD's sender to the admin address, reaches sys@.
        _send(ports["smtp"], "backup-completed.eml", "admin@example.com")
        wait_until(lambda: any("RCPT TO: <sys@example.com>" in x for x in lines), what="backup")
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 0
        reader.join(10)
        demo.stdout.close()
    assert sum("RCPT TO: <cat@example.com>" in x for x in lines) == 1
    assert any(f"stand-in GoCD on localhost:{ports['gocd']}" in x for x in lines)
    assert (examples / "mail2alert-data" / "outbox.sqlite3").is_file()
    assert not any("Traceback" in x for x in lines)
