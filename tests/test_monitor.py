"""``serve --monitor``: the original's aiomonitor debug console, on loopback only.

The console is a Python shell as the service user with every secret in reach, so any
address that is not loopback is refused before anything starts, and all three of its ports
listen on the loopback host given.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from mail2alert import cli, supervisor
from mail2alert.errors import StartupError
from mail2alert.testing import CaptureServer, free_port, free_ports
from tests.helpers import example_managers, listening, serve_command, wait_until, write_config

#: Loopback, but not the 127.0.0.1 everything else listens on: a port found open here and
#: closed there was bound to this host, not to every address.
ELSEWHERE = "127.0.0.3"


def a_config(tmp_path: Path, remote_port: int, port: int = 0) -> Path:
    return write_config(
        tmp_path / "c.yml",
        remote_port=remote_port,
        data_dir=tmp_path / "data",
        managers=example_managers("mail"),
        local=f"127.0.0.1:{port}",
    )


#: Telnet's "my terminal is a vt100" (RFC 1091), which the monitor waits for before its prompt.
TERMINAL_TYPE = b"\xff\xfa\x18\x00vt100\xff\xf0"


def read_until(conn: socket.socket, marker: bytes) -> bytes:
    """What ``conn`` sends up to and including ``marker``; fails after 15 s without it."""
    seen = b""
    deadline = time.monotonic() + 15
    conn.settimeout(5)
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {seen[-300:]!r}"
        chunk = conn.recv(4096)
        assert chunk, f"closed before {marker!r}: {seen[-300:]!r}"
        seen += chunk
    return seen


def serve_refused(tmp_path: Path, monitor: str) -> subprocess.CompletedProcess[str]:
    """``serve --monitor MONITOR``, which must exit by itself (a timeout fails the test)."""
    return subprocess.run(
        [*serve_command(a_config(tmp_path, free_port())), "--monitor", monitor],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )


def test_the_monitor_listens_on_loopback_port_50101_unless_told_otherwise() -> None:
    args = cli.build_parser().parse_args(["serve", "--monitor"])
    assert args.monitor == "127.0.0.1:50101"


def test_serve_with_a_monitor_listens_on_its_three_ports_on_that_host_only_and_stops_cleanly(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    port, monitor = free_port(), free_ports(3, ELSEWHERE)
    log = tmp_path / "serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                *serve_command(a_config(tmp_path, upstream.port, port)),
                "--monitor",
                f"{ELSEWHERE}:{monitor}",
            ],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(
            lambda: listening(port) and listening(monitor, ELSEWHERE),
            what="server and monitor",
        )
        assert listening(monitor + 1, ELSEWHERE), "the web UI listens on the same host"
        with socket.create_connection((ELSEWHERE, monitor), timeout=5) as conn:
            conn.sendall(TERMINAL_TYPE)
            read_until(conn, b"monitor >>> ")
            # The Python console opens its port only when asked for, and the monitor shows
            # it by connecting to that port on its own host: the banner is the proof.
            conn.sendall(b"console\r")
            read_until(conn, b"copyright")
            for offset in range(3):
                assert not listening(monitor + offset, "127.0.0.1"), f"port+{offset} on 127.0.0.1"
            # Stopped while the console session is still open.
            before = len(log.read_text())
            proc.terminate()
            assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"aiomonitor on {ELSEWHERE}:{monitor}" in log.read_text()
    # ...and stops without a traceback (issue 12, point 8). (A connection closed before its
    # telnet handshake does make prompt_toolkit print one, as the readiness probes above do.)
    assert "Traceback" not in log.read_text()[before:], log.read_text()[before:]


def test_serve_refuses_a_monitor_on_every_interface_with_exit_code_1_and_the_reason(
    tmp_path: Path,
) -> None:
    done = serve_refused(tmp_path, "0.0.0.0:50101")
    assert done.returncode == 1
    assert "--monitor 0.0.0.0:50101: 0.0.0.0 is not loopback" in done.stderr
    assert "a Python shell with every secret in reach" in done.stderr


def test_serve_with_a_monitor_port_taken_exits_with_the_reason_instead_of_hanging(
    tmp_path: Path,
) -> None:
    monitor = free_ports(3, ELSEWHERE)
    with socket.create_server((ELSEWHERE, monitor + 1)):  # the web UI's port
        done = serve_refused(tmp_path, f"{ELSEWHERE}:{monitor}")
    assert done.returncode == 1
    assert f"port {monitor + 1} (the web UI) cannot be used on {ELSEWHERE}" in done.stderr


@pytest.mark.parametrize(
    "address",
    [
        "0.0.0.0:50101",
        "[::]:50101",
        "10.1.2.3:50101",
        "192.0.2.1:50101",
        "[fe80::1]:50101",
        "ci.example.com:50101",
    ],
)
def test_an_address_that_is_not_loopback_is_refused_naming_it(address: str) -> None:
    with pytest.raises(StartupError) as refused:
        supervisor.monitor_address(address)
    assert str(refused.value).startswith(f"--monitor {address}: ")
    assert "is not loopback" in str(refused.value)


@pytest.mark.parametrize("host", ["127.0.0.1", ELSEWHERE, "::1", "localhost"])
def test_any_loopback_host_is_accepted(host: str) -> None:
    port = free_ports(3, *(("127.0.0.1", "::1") if host == "localhost" else (host,)))
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert supervisor.monitor_address(text) == (host, port)


def test_localhost_is_refused_when_it_resolves_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What /etc/hosts says cannot be changed here; what it could say is handed over instead.
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(StartupError) as refused:
        supervisor.monitor_address("localhost:50101")
    assert "localhost resolves to 192.0.2.7, which is not loopback" in str(refused.value)


def test_a_port_without_two_more_after_it_is_refused() -> None:
    with pytest.raises(StartupError, match="the port is at most 65533"):
        supervisor.monitor_address("127.0.0.1:65534")
