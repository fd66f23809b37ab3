"""Hot reload: a valid new file takes over whole, an invalid one changes nothing."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from mail2alert import components
from mail2alert.app import Service
from mail2alert.components import Change, Component, ReloadRefused
from mail2alert.config import load
from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.settings import History
from mail2alert.testing import CaptureServer, free_port
from tests.helpers import (
    OutboxView,
    ServeProcess,
    example_managers,
    listening,
    running,
    send,
    wait_until,
    write_config,
)

BACKUP = gocd_stage_mail("Server Backup Completed Successfully", to="admin@example.com")


def mail_manager(*recipients: str) -> dict[str, Any]:
    manager = example_managers("mail")[0]
    manager["rules"][0]["actions"] = [f"mailto:{r}" for r in recipients]
    return manager


def configure(path: Path, upstream: CaptureServer, data_dir: Path, local: str, *to: str) -> Path:
    return write_config(
        path,
        remote_port=upstream.port,
        data_dir=data_dir,
        managers=[mail_manager(*to)],
        local=local,
    )


def test_a_valid_new_configuration_routes_the_next_message(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    path = configure(tmp_path / "c.yml", upstream, data_dir, "127.0.0.1:0", "old@example.com")
    with running(path) as service:
        send(service.port, BACKUP)
        assert upstream.wait_for(1)[0].rcpt_tos == ("old@example.com",)
        configure(path, upstream, data_dir, "127.0.0.1:0", "new@example.com")
        assert service.call(service.service.reload()) is True
        send(service.port, BACKUP)
        assert upstream.wait_for(2)[1].rcpt_tos == ("new@example.com",)
        assert service.service.reload_status.ok


def test_an_invalid_new_configuration_keeps_the_running_one_and_says_why(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = configure(tmp_path / "c.yml", upstream, data_dir, "127.0.0.1:0", "old@example.com")
    with running(path) as service:
        path.write_text(path.read_text().replace("mail.in_subject", "mail.in_subjekt"))
        with caplog.at_level(logging.ERROR):
            assert service.call(service.service.reload()) is False
        send(service.port, BACKUP)
        assert upstream.wait_for(1)[0].rcpt_tos == ("old@example.com",)
        status = service.service.reload_status
    assert not status.ok
    assert "is invalid (1 problem)" in status.message
    assert "unknown function 'mail.in_subjekt'" in caplog.text
    assert "keeping the running configuration" in caplog.text


def test_a_changed_file_is_reloaded_without_a_signal(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(components, "CONFIG_CHECK", 0.05)
    path = configure(tmp_path / "c.yml", upstream, data_dir, "127.0.0.1:0", "old@example.com")
    with running(path) as service:
        first = service.service.reload_status
        configure(path, upstream, data_dir, "127.0.0.1:0", "new@example.com")
        wait_until(lambda: service.service.reload_status is not first, what="a reload")
        send(service.port, BACKUP)
        assert upstream.wait_for(1)[0].rcpt_tos == ("new@example.com",)


def test_a_changed_listen_address_is_rebound(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    old_port, new_port = free_port(), free_port()
    path = configure(
        tmp_path / "c.yml", upstream, data_dir, f"127.0.0.1:{old_port}", "a@example.com"
    )
    with running(path) as service:
        configure(path, upstream, data_dir, f"127.0.0.1:{new_port}", "a@example.com")
        assert service.call(service.service.reload()) is True
        send(new_port, BACKUP)
        upstream.wait_for(1)
        assert not listening(old_port)


def test_a_listen_address_that_cannot_be_bound_keeps_everything_as_it_was(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    path = configure(tmp_path / "c.yml", upstream, data_dir, "127.0.0.1:0", "old@example.com")
    with running(path) as service:
        # The upstream's port is taken: binding it must fail.
        configure(path, upstream, data_dir, f"127.0.0.1:{upstream.port}", "new@example.com")
        assert service.call(service.service.reload()) is False
        send(service.port, BACKUP)
        assert upstream.wait_for(1)[0].rcpt_tos == ("old@example.com",)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_a_running_server(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, workers: int
) -> None:
    port = free_port()
    path = configure(tmp_path / "c.yml", upstream, data_dir, f"127.0.0.1:{port}", "old@example.com")
    path.write_text(path.read_text() + f"intake-workers: {workers}\n")
    server = ServeProcess(path, port, tmp_path / "serve.log").start()
    try:
        # The socket accepts before the processes are up; wait so every one gets the SIGHUP.
        wait_until(
            lambda: server.log.count("listening on") >= workers + (workers > 1),
            what="every process to be up",
        )
        configure(path, upstream, data_dir, f"127.0.0.1:{port}", "new@example.com")
        path.write_text(path.read_text() + f"intake-workers: {workers}\n")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: server.log.count("configuration reloaded") >= workers + (workers > 1),
            what="every process to reload",
        )
        queue_id = send(port, BACKUP).queue_id
        assert upstream.wait_for(1)[0].rcpt_tos == ("new@example.com",)
        assert OutboxView(data_dir).message(queue_id)["outcome"] == "deliver"
        assert server.terminate() == 0
        reloads = [line for line in server.log.splitlines() if "configuration reloaded" in line]
        # One line per process, each process named; the summary once.
        assert sum("reloaded from" in line for line in reloads) == 1
        workers_said = sorted(
            line.split("mail2alert.supervisor: ")[1].split(" (pid")[0]
            for line in reloads
            if "reloaded from" not in line
        )
        assert workers_said == [f"intake-{n}" for n in range(1, workers + 1)] * (workers > 1)
    finally:
        server.close()


def test_sighup_moves_every_intake_worker_to_a_changed_listen_address(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    old_port, new_port = free_port(), free_port()
    path = configure(
        tmp_path / "c.yml", upstream, data_dir, f"127.0.0.1:{old_port}", "a@example.com"
    )
    path.write_text(path.read_text() + "intake-workers: 2\n")
    server = ServeProcess(path, old_port, tmp_path / "serve.log").start()
    try:
        wait_until(lambda: server.log.count("listening on") >= 3, what="every process to be up")
        configure(path, upstream, data_dir, f"127.0.0.1:{new_port}", "a@example.com")
        path.write_text(path.read_text() + "intake-workers: 2\n")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: server.log.count("now listening on") >= 2, what="both workers to move")
        for _ in range(4):  # the kernel spreads connections over both workers
            send(new_port, BACKUP)
        upstream.wait_for(4)
        assert not listening(old_port)
        assert server.terminate() == 0
    finally:
        server.close()


def test_a_busy_new_listen_address_keeps_every_intake_worker_on_the_old_rules(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    """The main process binds a moved listener before any process switches: when the port is
    taken, no worker routes by the new rules, and one line (from the main process) says why."""
    old_port = free_port()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    path = configure(tmp_path / "c.yml", upstream, data_dir, f"127.0.0.1:{old_port}", "old@a.org")
    path.write_text(path.read_text() + "intake-workers: 2\n")
    server = ServeProcess(path, old_port, tmp_path / "serve.log").start()
    try:
        wait_until(lambda: server.log.count("listening on") >= 3, what="every process to be up")
        # Written whole, then moved in place: one change for the watch to see.
        staged = configure(
            tmp_path / "next.yml", upstream, data_dir, f"127.0.0.1:{busy_port}", "new@a.org"
        )
        staged.write_text(staged.read_text() + "intake-workers: 2\n")
        staged.replace(path)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in server.log, what="the reload to be refused")
        for _ in range(8):  # the kernel spreads connections over both workers
            send(old_port, BACKUP)
        assert {m.rcpt_tos for m in upstream.wait_for(8)} == {("old@a.org",)}
        assert server.terminate() == 0
        refused = [line for line in server.log.splitlines() if "reload failed" in line]
        assert len(refused) == 1
        assert f"cannot listen on 127.0.0.1:{busy_port}" in refused[0]
        assert "configuration reloaded" not in server.log
    finally:
        busy.close()
        server.close()


class Refusing(Component):
    """A component that cannot run any new configuration."""

    def __init__(self) -> None:
        self.aborted = 0

    async def prepare(self, change: Change) -> None:
        raise ReloadRefused("the refusing part cannot run it")

    async def abort(self) -> None:
        self.aborted += 1


def test_when_one_component_refuses_none_switches_and_what_others_acquired_is_released(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    old_port, new_port = free_port(), free_port()
    path = configure(tmp_path / "c.yml", upstream, data_dir, f"127.0.0.1:{old_port}", "old@a.org")

    refusing = Refusing()

    async def scenario() -> tuple[bool, str, tuple[str, ...], bool]:
        service = Service(load(path))
        service.add(refusing)
        await service.start()
        try:
            configure(path, upstream, data_dir, f"127.0.0.1:{new_port}", "new@a.org")
            switched = await service.reload()
            # Intake had bound the new port; the abort gave it back.
            new_port_free = not listening(new_port)
            actions = service.managers[0].rules[0].actions
            return switched, service.reload_status.message, actions, new_port_free
        finally:
            await service.stop()

    switched, why, actions, new_port_free = asyncio.run(scenario())
    assert switched is False
    assert why == "the refusing part cannot run it"
    assert actions == ("mailto:old@a.org",)
    assert new_port_free
    assert refusing.aborted == 0  # it refused: it had acquired nothing to give back


def test_a_changed_history_is_taken_by_the_running_dispatcher_without_stopping_delivery(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = configure(tmp_path / "c.yml", upstream, data_dir, "127.0.0.1:0", "a@example.com")
    with running(path) as service:
        (delivery,) = [c for c in service.service.components if isinstance(c, components.Delivery)]
        dispatcher = delivery.dispatcher
        assert dispatcher is not None
        path.write_text(path.read_text() + "history:\n  keep: 1d\n  max-messages: 10\n")
        with caplog.at_level(logging.INFO):
            assert service.call(service.service.reload()) is True
        send(service.port, BACKUP)
        upstream.wait_for(1)
    assert delivery.dispatcher is dispatcher
    assert dispatcher.history == History(86400.0, 10)
    assert "now delivering" not in caplog.text


def test_a_reload_asked_while_stopping_switches_nothing_and_starts_nothing_again(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    """SIGHUP in the sessions' grace period of a stop (a client in the middle of a
    transaction), with a moved listener: refused, and nothing listens once stopped."""
    old_port, new_port = free_port(), free_port()
    path = configure(tmp_path / "c.yml", upstream, data_dir, f"127.0.0.1:{old_port}", "a@x.test")

    async def scenario() -> tuple[bool, bool]:
        service = Service(load(path))
        await service.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", old_port)
        await reader.readline()
        writer.write(b"EHLO c.test\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writer.write(b"MAIL FROM:<a@b.test>\r\n")
        assert (await reader.readline()).startswith(b"250")  # in a transaction now
        stopping = asyncio.create_task(service.wait())
        service.request_stop()
        configure(path, upstream, data_dir, f"127.0.0.1:{new_port}", "b@x.test")
        switched = await service.reload()
        writer.close()
        await stopping
        return switched, await asyncio.to_thread(listening, new_port)

    assert asyncio.run(scenario()) == (False, False)


def test_a_reload_asked_while_starting_waits_until_everything_started(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP's handler is there before the components start, so that an early SIGHUP is not
    fatal: the reload it asks for runs once they all started, and moves the listener."""
    old_port, new_port = free_port(), free_port()
    path = configure(tmp_path / "c.yml", upstream, data_dir, f"127.0.0.1:{old_port}", "a@x.test")
    entered, gate = asyncio.Event(), asyncio.Event()
    real_start = components.Holds.start

    async def slow_start(self: components.Holds) -> None:
        entered.set()
        await gate.wait()
        await real_start(self)

    monkeypatch.setattr(components.Holds, "start", slow_start)

    async def scenario() -> tuple[bool, list[tuple[str, int]]]:
        service = Service(load(path))
        starting = asyncio.ensure_future(service.start())
        await entered.wait()
        configure(path, upstream, data_dir, f"127.0.0.1:{new_port}", "b@x.test")
        reloading = asyncio.ensure_future(service.reload())  # what SIGHUP runs
        await asyncio.sleep(0)
        assert not reloading.done()
        gate.set()
        await starting
        switched = await reloading
        addresses = list(service.addresses)
        await service.stop()
        return switched, addresses

    switched, addresses = asyncio.run(scenario())
    assert switched is True
    assert [port for _, port in addresses] == [new_port]


def test_a_changed_intake_workers_leaves_each_process_its_share_until_the_restart(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    """``intake-workers`` changes at the next restart: until then the one process running
    keeps the whole of ``max-sessions`` (4), not a quarter of it."""
    path = write_config(
        tmp_path / "c.yml",
        remote_port=upstream.port,
        data_dir=data_dir,
        managers=example_managers("mail"),
        local={"address": "127.0.0.1:0", "max-sessions": 4},
    )
    base = path.read_text()
    path.write_text(base + "intake-workers: 1\n")
    with running(path) as service:
        path.write_text(base + "intake-workers: 4\n")
        assert service.call(service.service.reload()) is True
        clients = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(3)]
        try:
            greetings = [c.makefile("rb").readline()[:3] for c in clients]
        finally:
            for client in clients:
                client.close()
    assert greetings == [b"220", b"220", b"220"]
