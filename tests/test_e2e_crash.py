"""End to end with ``python -m mail2alert serve`` as a real process: crashes, stops, bad starts."""

from __future__ import annotations

import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from mail2alert.testing import CaptureServer, free_port
from tests.helpers import (
    OutboxView,
    ServeProcess,
    compose,
    example_managers,
    field_value,
    processes_mentioning,
    send,
    serve_command,
    write_config,
)


@pytest.fixture
def port() -> int:
    """A free port for mail2alert to listen on."""
    return free_port()


@pytest.fixture
def config_path(tmp_path: Path, upstream: CaptureServer, port: int) -> Path:
    """The example's mail manager, listening on ``port``, delivering to ``upstream``."""
    return write_config(
        tmp_path / "configuration.yml",
        local=f"127.0.0.1:{port}",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=example_managers("mail"),
    )


@pytest.fixture
def serve(tmp_path: Path, config_path: Path, port: int) -> Iterator[ServeProcess]:
    """``mail2alert serve`` on ``config_path`` (not started); killed if a test leaves it."""
    process = ServeProcess(config_path, port, tmp_path / "serve.log")
    yield process
    process.close()


def run_serve(config_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``mail2alert serve`` to its end (for starts that must fail)."""
    return subprocess.run(
        serve_command(config_path),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=config_path.parent,
        check=False,
    )


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_after_kill_9_a_restart_delivers_every_accepted_message_exactly_once(
    tmp_path: Path, upstream: CaptureServer, serve: ServeProcess
) -> None:
    upstream.stop()
    serve.start()
    outbox = OutboxView(tmp_path / "data")
    sent: dict[str, str] = {}
    for i in range(6):
        message_id = f"<crash-{i}@test.example.com>"
        # Half are routed by the example's rule, half relayed as they are.
        sender = "go@example.com" if i % 2 else "someone@example.net"
        message = compose(subject="Server Backup Failed", sender=sender, message_id=message_id)
        reply = send(serve.port, message, mail_from=sender)
        sent[reply.queue_id] = message_id
    for queue_id in sent:
        outbox.wait_attempted(queue_id)

    assert serve.kill() == -9
    upstream.start()
    serve.start()

    for queue_id in sent:
        outbox.wait_state(queue_id, "done")
    assert serve.terminate() == 0
    by_message_id = Counter(field_value(m.data, "message-id") for m in upstream.messages)
    assert by_message_id == dict.fromkeys(sent.values(), 1)
    by_queue_id = Counter(
        next(q for q in sent if q.encode() in m.data.split(b"\r\n\r\n")[0])
        for m in upstream.messages
    )
    assert by_queue_id == dict.fromkeys(sent, 1)


def test_sigterm_ends_the_process_with_exit_code_0_and_the_outbox_intact(
    tmp_path: Path, upstream: CaptureServer, serve: ServeProcess
) -> None:
    upstream.stop()
    serve.start()
    queue_ids = [send(serve.port, compose(subject="Server Backup Failed")).queue_id for _ in "abc"]

    assert serve.terminate() == 0

    outbox = OutboxView(tmp_path / "data")
    assert outbox.integrity() == "ok"
    for queue_id in queue_ids:
        assert outbox.message(queue_id) is not None
        assert outbox.item(queue_id)["state"] == "pending"
    assert "mail2alert stopped" in serve.log


def test_a_port_already_in_use_fails_the_start_with_one_clear_line_and_no_process_left(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config_path = write_config(
            tmp_path / "configuration.yml",
            local=f"127.0.0.1:{port}",
            remote_port=upstream.port,
            data_dir=tmp_path / "data",
            managers=example_managers("mail"),
        )

        result = run_serve(config_path)

    assert result.returncode != 0
    (line,) = stderr_lines(result)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "in use" in line
    assert processes_mentioning(str(config_path)) == []


def test_an_invalid_config_exits_1_naming_the_file_and_line_of_the_problem(
    tmp_path: Path,
) -> None:
    config_path = tmp_path / "configuration.yml"
    config_path.write_text(
        "local-smtp: 127.0.0.1:0\nmanagers: []\nremote-smtp: localhost:not-a-port\n",
        encoding="utf-8",
    )

    result = run_serve(config_path)

    assert result.returncode == 1
    assert f"{config_path}:3: remote-smtp: expected host:port" in result.stderr
    assert processes_mentioning(str(config_path)) == []


def test_a_data_dir_that_cannot_be_written_fails_the_start_with_one_clear_line(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    # A file where a parent directory should be: not writable even for root.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("", encoding="utf-8")
    config_path = write_config(
        tmp_path / "configuration.yml",
        local=f"127.0.0.1:{free_port()}",
        remote_port=upstream.port,
        data_dir=blocker / "data",
        managers=example_managers("mail"),
    )

    result = run_serve(config_path)

    assert result.returncode != 0
    (line,) = stderr_lines(result)
    assert f"data-dir {str(blocker / 'data')!r}" in line
    assert "Not a directory" in line
    assert processes_mentioning(str(config_path)) == []
