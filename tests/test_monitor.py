"""``serve --monitor``: the original's aiomonitor debug console, on loopback by default."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from mail2alert import cli
from mail2alert.testing import CaptureServer, free_port
from tests.helpers import example_managers, listening, wait_until, write_config


def test_the_monitor_listens_on_loopback_port_50101_unless_told_otherwise() -> None:
    args = cli.build_parser().parse_args(["serve", "--monitor"])
    assert args.monitor == "127.0.0.1:50101"


def test_serve_with_a_monitor_answers_on_its_port_and_stops_cleanly(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    port, monitor = free_port(), free_port()
    path = write_config(
        tmp_path / "c.yml",
        remote_port=upstream.port,
        data_dir=data_dir,
        managers=example_managers("mail"),
        local=f"127.0.0.1:{port}",
    )
    log = tmp_path / "serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mail2alert",
                "serve",
                "--config",
                str(path),
                "--monitor",
                f"127.0.0.1:{monitor}",
            ],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(lambda: listening(port) and listening(monitor), what="server and monitor")
        with socket.create_connection(("127.0.0.1", monitor), timeout=5) as conn:
            conn.settimeout(5)
            assert conn.recv(1), "the console greets whoever connects"
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"aiomonitor on 127.0.0.1:{monitor}" in log.read_text()
